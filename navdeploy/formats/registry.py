"""The registry of formats and runners. A new backend is one module in this folder with a FORMAT and
RUNNERS, listed here; nothing in the orchestration changes."""

from __future__ import annotations

import threading
from typing import Iterable

from navdeploy.formats import aoti, compile, eager, exported_program, onnx, tensorrt, torch_tensorrt, torchscript
from navdeploy.formats.base import Format, FormatSpec, RunnerSpec

# Order matters only for display and for which format is exported first.
_MODULES = [eager, compile, torchscript, exported_program, aoti, onnx, tensorrt, torch_tensorrt]

FORMATS: dict[Format, FormatSpec] = {m.FORMAT.format: m.FORMAT for m in _MODULES if hasattr(m, "FORMAT")}
RUNNERS: dict[str, RunnerSpec] = {r.name: r for m in _MODULES for r in m.RUNNERS}
EAGER_RUNNER = {"cpu": "TorchCPU", "cuda": "TorchCUDA"}


def known_runner_names() -> set[str]:
    """Every runner name navdeploy knows, installed or not."""
    return set(RUNNERS)


def runners_for(device: str, formats=None, names=None) -> list[RunnerSpec]:
    """Runners for a device, filtered by format and name; the eager baseline always comes first. With no names,
    the runners tried by default (not the opt-in ones)."""
    chosen = [r for r in RUNNERS.values() if r.device == device and (formats is None or r.format in formats)
              and (r.name in names if names is not None else r.by_default)]
    eager = RUNNERS[EAGER_RUNNER[device]]
    return [eager] + [r for r in chosen if r is not eager]



def start_availability_checks(runners: Iterable[RunnerSpec]) -> None:
    """Start the availability checks of ``runners`` (``RunnerSpec.is_available``) in background threads, so that a
    slow one (AOTInductor's probe on CUDA builds and loads a package in a child process, ~95 s on a fresh H200)
    runs while the pipeline is captured and the first candidates build; the search later takes the answer, or
    waits for it. Each check keeps its own answer."""
    for runner in {r.name: r for r in runners if r.is_available is not None}.values():
        threading.Thread(target=runner.unavailable_reason, name=f"navdeploy-probe-{runner.name}",
                         daemon=True).start()
