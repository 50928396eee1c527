"""Model Navigator 0.14's inplace optimize of navdeploy's example CNN, on CPU: the peer side of
``benchmarks/bench_search.py``. Runs in Model Navigator's own venv (it pins numpy<2 and its own onnx):

    /tmp/mn014/bin/python benchmarks/mn014_cnn.py --out /tmp/mn.json

The same model (``examples/image_classifier.build_classifier``, copied here: navdeploy is not installed in that
venv), the same dataloader, a fresh cache folder (``MODEL_NAVIGATOR_DEFAULT_CACHE_DIR``), ``target_device=CPU``
(Model Navigator's default is CUDA, and it tolerates no CUDA call on a CPU machine). Timed around
``nav.optimize``, as navdeploy's side is.
"""

from __future__ import annotations

import argparse
import json
import os
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    os.environ["MODEL_NAVIGATOR_DEFAULT_CACHE_DIR"] = tempfile.mkdtemp(prefix="mn014-cache-")
    import model_navigator as nav
    import torch

    model = nav.Module(build_classifier(), name="classifier")
    dataloader = [(1, torch.randn(1, 3, 64, 64)) for _ in range(4)]
    config = nav.OptimizeConfig(target_device=nav.DeviceKind.CPU)
    start = time.perf_counter()
    nav.optimize(model, dataloader, config)
    seconds = time.perf_counter() - start
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))  # the optimized module answers
    with open(args.out, "w") as out:
        json.dump({"optimize_s": seconds, "model_navigator": nav.__version__, "torch": torch.__version__,
                   "python": sys.version.split()[0]}, out, indent=2)
    print(f"Model Navigator {nav.__version__}: optimize {seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
