"""Triton model repositories: emit them from a workspace (Jinja templates), validate them the way Triton does,
and serve them with the tritonserver bundled in nvidia-pytriton."""

from navdeploy.triton.emit import export_model_repository, model_name, plan_repository
from navdeploy.triton.server import TritonServer, bundled_tritonserver, serve_repository
from navdeploy.triton.validate import Problem, errors, validate_repository

__all__ = ["export_model_repository", "plan_repository", "model_name", "validate_repository", "errors", "Problem",
           "TritonServer", "serve_repository", "bundled_tritonserver"]
