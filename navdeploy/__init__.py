"""navdeploy: optimize the PyTorch modules inside a Python pipeline in place, verify them, deploy them.

    import navdeploy as nav

    model = nav.Module(model, name="resnet")
    nav.optimize(model, [(1, torch.randn(1, 3, 224, 224))])
    # later, in a fresh process, after wrapping the same modules:
    nav.load_optimized()
"""

from navdeploy._version import __version__
from navdeploy.api import optimize
from navdeploy.config import LatencyBudget, MaxThroughput, MinLatency, OptimizeConfig
from navdeploy.errors import CaptureError, ConfigError, DataloaderError, NavdeployError, WorkspaceError
from navdeploy.formats.base import Format
from navdeploy.inplace.module import Module
from navdeploy.optimize.load import load_optimized
from navdeploy.optimize.status import ModuleStatus, OptimizeStatus
from navdeploy.serving import serve
from navdeploy.triton import export_model_repository

__all__ = [
    "Module", "optimize", "load_optimized", "serve", "OptimizeConfig", "Format", "MinLatency", "MaxThroughput",
    "LatencyBudget", "OptimizeStatus", "ModuleStatus", "NavdeployError", "ConfigError", "CaptureError",
    "DataloaderError", "WorkspaceError", "export_model_repository", "__version__",
]
