"""Classes named in a spec by ``module:qualname``, resolved only from modules already imported."""

from __future__ import annotations

import sys
from typing import Any, Optional


def class_path(cls: type) -> str:
    """``module:qualname`` of a class: how a spec names it."""
    return f"{cls.__module__}:{cls.__qualname__}"


def resolve_class(path: str) -> Optional[type]:
    """The class named by ``module:qualname`` if its module is already imported (never imports code)."""
    module_name, _, qualname = path.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj if isinstance(obj, type) else None
