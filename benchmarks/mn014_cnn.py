"""Model Navigator 0.14's inplace optimize of navdeploy's example CNN, on CPU: the peer side of
``benchmarks/bench_search.py``. Runs in Model Navigator's own venv (it pins numpy<2 and its own onnx):

    /tmp/mn014/bin/python benchmarks/mn014_cnn.py --out /tmp/mn.json

The same model (``examples/image_classifier.build_classifier``, copied here: navdeploy is not installed in that
venv), the same dataloader, a fresh cache folder (``MODEL_NAVIGATOR_DEFAULT_CACHE_DIR``), ``target_device=CPU``
(Model Navigator's default is CUDA). Timed around ``nav.optimize``, as navdeploy's side is.

Model Navigator 0.14's torch runners call ``torch.cuda.synchronize()`` around every timed call even with
``target_device=CPU``, which raises on a CPU build of torch, so no torch runner could be profiled. This script
makes that call a no-op where torch has no CUDA, in its own process and in the profiling processes Model Navigator
starts (a ``sitecustomize`` on their ``PYTHONPATH``). Its ``optimize`` ends by loading the winners with
``load_optimized(activate_runners=False)``, whose ``device`` defaults to ``"cuda"``, which fails on a CPU
(``Runner `OnnxCPU` not supported on DeviceKind.CUDA``) after the whole search; this script makes that default
``"cpu"`` (:func:`_load_on_cpu`). Nothing else of Model Navigator is changed.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time


def build_classifier():
    """examples/image_classifier.py's CNN, layer for layer, with the same seed."""
    import torch
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()


# Loaded by every Python process of the run: once torch.cuda is imported, its synchronize does nothing when
# torch has no CUDA (a CPU build): there is nothing to wait for.
_NO_CUDA_SYNC = """
import importlib.abc
import importlib.machinery
import sys


class _NoCudaSync(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "torch.cuda":
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        run = spec.loader.exec_module

        def exec_module(module):
            run(module)
            if not module.is_available():
                module.synchronize = lambda device=None: None

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _NoCudaSync())
"""


def _no_cuda_sync() -> None:
    folder = tempfile.mkdtemp(prefix="mn014-site-")
    atexit.register(shutil.rmtree, folder, True)  # Model Navigator's children, which read it, end before this
    with open(os.path.join(folder, "sitecustomize.py"), "w") as site:
        site.write(_NO_CUDA_SYNC)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (folder, os.environ.get("PYTHONPATH")) if p)
    exec(compile(_NO_CUDA_SYNC, "sitecustomize.py", "exec"), {})  # this process started before it existed


def _load_on_cpu(nav) -> None:
    """``nav.Module.load_optimized``'s default device is "cuda"; on this CPU machine it is "cpu"."""
    from model_navigator.inplace.wrapper import Module

    original = Module.load_optimized

    def load_optimized(self, *args, device="cpu", **kwargs):
        return original(self, *args, device=device, **kwargs)

    Module.load_optimized = load_optimized


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="mn014-cache-")
    atexit.register(shutil.rmtree, cache, True)
    os.environ["MODEL_NAVIGATOR_DEFAULT_CACHE_DIR"] = cache
    _no_cuda_sync()
    import model_navigator as nav
    import torch

    _load_on_cpu(nav)

    model = nav.Module(build_classifier(), name="classifier")
    dataloader = [(1, torch.randn(1, 3, 64, 64)) for _ in range(4)]
    config = nav.OptimizeConfig(target_device=nav.DeviceKind.CPU)
    start = time.perf_counter()
    nav.optimize(model, dataloader, config)
    seconds = time.perf_counter() - start
    model.load_optimized()  # optimize left its runners inactive; the optimized module answers once loaded
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
    with open(args.out, "w") as out:
        json.dump({"optimize_s": seconds, "model_navigator": nav.__version__, "torch": torch.__version__,
                   "python": sys.version.split()[0]}, out, indent=2)
    print(f"Model Navigator {nav.__version__}: optimize {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
