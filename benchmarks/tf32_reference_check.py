"""Why fp32 candidates of a conv module are checked at the tf32 tolerance on CUDA (navdeploy/candidates/precision.py).

Compiles the two-conv CNN of tests/test_gpu_candidates.py::test_parallel_builds_on_the_gpu_profile_alone with
torch.compile and prints the max abs error against eager, with cuDNN's TF32 on (torch's default) and off.
Usage (on a CUDA machine): python benchmarks/tf32_reference_check.py [--out result.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from navdeploy.config import DEFAULT_TOLERANCES


def max_error(allow_tf32: bool) -> float:
    torch.backends.cudnn.allow_tf32 = allow_tf32
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).cuda().eval()
    x = torch.randn(1, 3, 16, 16, device="cuda")
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model)(x)
    return float((eager - compiled).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", help="write the JSON result here too")
    args = parser.parse_args()
    result = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
              "max_abs_err_tf32_on": max_error(True), "max_abs_err_tf32_off": max_error(False),
              "fp32_tolerance": list(DEFAULT_TOLERANCES["fp32"]), "tf32_tolerance": list(DEFAULT_TOLERANCES["tf32"])}
    print(f"{'cuDNN TF32':<12}{'max abs err, compiled vs eager':>32}")
    print(f"{'on':<12}{result['max_abs_err_tf32_on']:>32.3g}")
    print(f"{'off':<12}{result['max_abs_err_tf32_off']:>32.3g}")
    print(json.dumps(result))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
