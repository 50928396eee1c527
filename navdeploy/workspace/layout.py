"""Where things are in a workspace:

    <workspace>/.navdeploy-workspace            the marker: this folder is a navdeploy workspace (written by optimize)
    <workspace>/reports/                        HTML reports
    <workspace>/inductor_cache/<module>/        torch.compile's and AOTInductor's cache of a module (unless the user
                                                set one; workspaces of earlier versions have one cache for all)
    <workspace>/<module>/manifest.json          candidates, errors, metrics, selection per graph
    <workspace>/<module>/navdeploy.log          log of every optimize run of the module
    <workspace>/<module>/.lock, .lock.owner     held (flock) by the run optimizing the module; who holds it
    <workspace>/<module>/<graph>/samples.pt     captured inputs + eager outputs (tensors only, weights_only load)
    <workspace>/<module>/<graph>/checkpoint.json  the graph's candidate records so far, written after each one
    <workspace>/<module>/<graph>/<format>/      the exported artifact of one format in the module's precision
    <workspace>/<module>/<graph>/<format>-<precision>/  ... and in another precision (e.g. ``onnx-fp16``)

navdeploy unpickles nothing here except ``samples.pt`` with ``weights_only=True`` (inductor reads its own cache,
on reload only from a private copy that matched the manifest's checksum); a manifest or checkpoint that is not what
navdeploy writes is ignored with a warning, never trusted."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("navdeploy")


MANIFEST = "manifest.json"


WORKSPACE_MARKER = ".navdeploy-workspace"


# Folders navdeploy itself creates at the top of a workspace, besides the module folders.
OWN_FOLDERS = ("reports", "inductor_cache")


LOG_FILE = "navdeploy.log"


def module_dir(workspace: Path, name: str) -> Path:
    """The folder of one module."""
    return workspace / name


def artifact_dir(fmt_value: str, precision: str, module_precision: str) -> str:
    """The artifact folder of a format in one precision: ``onnx`` in the module's own, ``onnx-fp16`` in another."""
    return fmt_value if precision == module_precision else f"{fmt_value}-{precision}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def plain_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be one folder name inside a workspace (empty, ``..``, a path, absolute), or None."""
    if not name or name in (".", ".."):
        return "is not a name"
    if os.path.isabs(name) or "/" in name or "\\" in name or "\0" in name:
        return "is a path, not a name"
    return None
