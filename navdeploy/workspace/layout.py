"""Where things are in a workspace:

    <workspace>/<module>/manifest.json          candidates, errors, metrics, selection per graph
    <workspace>/<module>/navdeploy.log          log of every optimize run of the module
    <workspace>/<module>/.lock, .lock.owner     held (flock) by the run optimizing the module; who holds it
    <workspace>/<module>/<graph>/samples.pt     captured inputs + eager outputs (tensors only, weights_only load)
    <workspace>/<module>/<graph>/checkpoint.json  the graph's candidate records so far, written after each one
    <workspace>/<module>/<graph>/<format>/      the exported artifact of one format in the module's precision
    <workspace>/<module>/<graph>/<format>-<precision>/  ... and in another precision (e.g. ``onnx-fp16``)

Nothing here is ever unpickled except ``samples.pt`` with ``weights_only=True``; a manifest or checkpoint
that is not what navdeploy writes is ignored with a warning, never trusted."""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger("navdeploy")


MANIFEST = "manifest.json"


LOG_FILE = "navdeploy.log"


def module_dir(workspace: Path, name: str) -> Path:
    """The folder of one module."""
    return workspace / name


def artifact_dir(fmt_value: str, precision: str, module_precision: str) -> str:
    """The artifact folder of a format in one precision: ``onnx`` in the module's own, ``onnx-fp16`` in another."""
    return fmt_value if precision == module_precision else f"{fmt_value}-{precision}"


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
