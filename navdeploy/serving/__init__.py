"""Serving: the Python pipeline behind PyTriton, its wrapped modules running their selected runners in-process.
``serve.py`` starts it; ``specs``, ``codec``, ``handle``, ``signals``, ``bounds`` and ``guard`` are its parts."""

from navdeploy.serving.bounds import captured_max_shapes
from navdeploy.serving.handle import ServerHandle
from navdeploy.serving.serve import load_callable, serve, serve_from_spec
from navdeploy.serving.specs import Tensor, infer_specs
from navdeploy.triton.server import free_ports

__all__ = ["Tensor", "ServerHandle", "serve", "serve_from_spec", "infer_specs", "free_ports", "load_callable",
           "captured_max_shapes"]
