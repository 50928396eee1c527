"""How long the leaders' profiles in turns take on a real-size CNN, and what they read.

A ResNet-18 (transformers' ResNetConfig with basic blocks 2-2-2-2, random weights, 224px, batch 1) is optimized with
TorchScript and ONNX Runtime (and their bf16 copies where the CPU computes bf16), every screened candidate made a
leader (``search.SCREEN_MARGIN`` patched for this process), so the full profiles are taken in rounds that take
turns (``optimize.module._profile_together``). Prints the rounds' seconds (from the module's log) and each
candidate's figures with the calls they rest on; writes the same as JSON with the command and the machine.

    python benchmarks/profile_rounds_check.py --out benchmarks/results/profile_rounds_cpu.json
    PYTHONPATH=/tmp/old python benchmarks/profile_rounds_check.py ...   # an older tree (a git worktree), to compare
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import datetime
from pathlib import Path


def _seconds(stamp: str) -> float:
    hours, minutes, rest = stamp.split(":")
    seconds, millis = rest.split(",")
    return int(hours) * 3600 + int(minutes) * 60 + int(seconds) + int(millis) / 1000


def rounds_seconds(log: str) -> float | None:
    """Seconds from the event before the first "rounds in turns" line to it: the rounds of the first leaders."""
    previous = None
    for line in log.splitlines():
        if not line.startswith("20"):
            continue
        stamp = line[11:23]
        if "rounds in turns" in line and previous is not None:
            return _seconds(stamp) - _seconds(previous)
        previous = stamp
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args()

    import torch
    from transformers import ResNetConfig, ResNetForImageClassification

    import navdeploy as nav
    from navdeploy.candidates import search as search_module

    search_module.SCREEN_MARGIN = 100.0  # every screened candidate leads: their profiles go in turns
    torch.manual_seed(0)
    model = ResNetForImageClassification(ResNetConfig(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512],
                                                      layer_type="basic")).eval()
    module = nav.Module(model, name="resnet18")
    generator = torch.Generator().manual_seed(1)
    data = [(1, torch.rand(1, 3, 224, 224, generator=generator)) for _ in range(2)]
    with tempfile.TemporaryDirectory(prefix="navdeploy-rounds-") as workspace, torch.no_grad():
        config = nav.OptimizeConfig(workspace=workspace, runners=("TorchCPU", "TorchScriptCPU", "OnnxCPU"),
                                    pipeline_repeats=0)
        status = nav.optimize(lambda x: module(pixel_values=x).logits, data, config)
        rounds_s = rounds_seconds((Path(workspace) / "resnet18" / "navdeploy.log").read_text())
    candidates = [{"name": c.name, "status": c.status,
                   "profile": [{"batch_size": p.batch_size, "p50_ms": p.p50_ms, "calls": p.iterations}
                               for p in c.profile]} for c in status.modules["resnet18"].graphs[0].candidates]
    print(f"rounds in turns: {rounds_s:.1f} s" if rounds_s is not None else "no rounds in turns")
    for c in candidates:
        print(c["name"], c["status"], [(p["batch_size"], round(p["p50_ms"], 2), p["calls"]) for p in c["profile"]])
    print(f"module: {status.modules['resnet18'].seconds:.1f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "command": " ".join([os.path.basename(sys.executable), *sys.argv]), "date": datetime.now().isoformat(),
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__},
            "navdeploy": nav.__file__, "rounds_s": rounds_s, "module_s": status.modules["resnet18"].seconds,
            "candidates": candidates}, indent=2))
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
