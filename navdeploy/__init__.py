"""navdeploy: optimize the PyTorch modules inside a Python pipeline in place, verify them, deploy them.

    import navdeploy as nav

    model = nav.Module(model, name="resnet")
    nav.optimize(model, [(1, torch.randn(1, 3, 224, 224))])
    # later, in a fresh process, after wrapping the same modules:
    nav.load_optimized()
"""

__version__ = "0.1.0"

from navdeploy.config import Format, LatencyBudget, MaxThroughput, MinLatency, OptimizeConfig  # noqa: E402
from navdeploy.errors import (CaptureError, ConfigError, DataloaderError, NavdeployError,  # noqa: E402
                              WorkspaceError)
from navdeploy.module import Module  # noqa: E402
from navdeploy.optimize import ModuleStatus, OptimizeStatus, load_optimized, optimize  # noqa: E402
from navdeploy.triton import export_model_repository  # noqa: E402
from navdeploy.serving import serve  # noqa: E402

__all__ = [
    "Module", "optimize", "load_optimized", "serve", "OptimizeConfig", "Format", "MinLatency", "MaxThroughput",
    "LatencyBudget", "OptimizeStatus", "ModuleStatus", "NavdeployError", "ConfigError", "CaptureError",
    "DataloaderError", "WorkspaceError", "export_model_repository", "__version__",
]
