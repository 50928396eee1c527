"""Where the Jinja templates are: the top-level ``templates/`` folder, shipped in the wheel as
``navdeploy.templates``."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def templates_dir() -> Path:
    """The folder of the shipped templates (installed package data, or ``templates/`` of a source checkout)."""
    spec = importlib.util.find_spec("navdeploy.templates")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            if (Path(location) / "config.pbtxt.j2").is_file():
                return Path(location)
    return Path(__file__).resolve().parent.parent / "templates"  # a checkout on sys.path, not installed
