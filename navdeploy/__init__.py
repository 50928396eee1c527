"""navdeploy: optimize the PyTorch modules inside a Python pipeline in place, verify them, deploy them.

    import navdeploy as nav

    model = nav.Module(model, name="resnet")
    nav.optimize(model, [(1, torch.randn(1, 3, 224, 224))])
    # later, in a fresh process, after wrapping the same modules:
    nav.load_optimized()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from navdeploy._version import __version__

if TYPE_CHECKING:  # what the names below are, for type checkers and editors
    from navdeploy.api import optimize
    from navdeploy.config import LatencyBudget, MaxThroughput, MinLatency, OptimizeConfig
    from navdeploy.errors import CaptureError, ConfigError, DataloaderError, NavdeployError, WorkspaceError
    from navdeploy.formats.base import Format
    from navdeploy.inplace.module import Module
    from navdeploy.optimize.load import load_optimized
    from navdeploy.optimize.status import ModuleStatus, OptimizeStatus
    from navdeploy.serving import serve
    from navdeploy.triton import export_model_repository

# The public names, each imported from its module on first use: navdeploy's workers import navdeploy.candidates,
# which imports this package first, and need none of the API (serving, Triton, the report); importing it all took
# ~0.3 s of every worker's start on the 2-core machine.
_PUBLIC = {
    "optimize": "navdeploy.api", "OptimizeConfig": "navdeploy.config", "LatencyBudget": "navdeploy.config",
    "MaxThroughput": "navdeploy.config", "MinLatency": "navdeploy.config", "NavdeployError": "navdeploy.errors",
    "ConfigError": "navdeploy.errors", "CaptureError": "navdeploy.errors", "DataloaderError": "navdeploy.errors",
    "WorkspaceError": "navdeploy.errors", "Format": "navdeploy.formats.base", "Module": "navdeploy.inplace.module",
    "load_optimized": "navdeploy.optimize.load", "ModuleStatus": "navdeploy.optimize.status",
    "OptimizeStatus": "navdeploy.optimize.status", "serve": "navdeploy.serving",
    "export_model_repository": "navdeploy.triton",
}


# ``nav.optimize`` is the function, not the subpackage of the same name: the subpackage is imported now (its
# __init__ is empty), so that the import system binds it here once, before this line, and never again when a
# submodule of it is imported later; the name then falls through to __getattr__ below, as the others do.
importlib.import_module("navdeploy.optimize")
globals().pop("optimize", None)  # absent where the subpackage was loaded before (a reload)


def __getattr__(name: str) -> Any:
    """``nav.<name>`` for a public name: imported from its module the first time, then kept here."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'navdeploy' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({name for name in globals() if name.startswith("__")} | set(__all__))


__all__ = [
    "Module", "optimize", "load_optimized", "serve", "OptimizeConfig", "Format", "MinLatency", "MaxThroughput",
    "LatencyBudget", "OptimizeStatus", "ModuleStatus", "NavdeployError", "ConfigError", "CaptureError",
    "DataloaderError", "WorkspaceError", "export_model_repository", "__version__",
]
