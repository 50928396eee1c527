"""Where the time of a bound module's call goes on CUDA: eager, the selected runner called directly, the handler,
and the nav.Module call, each timed with CUDA events over a loop, then a cProfile of the bound calls.

    python benchmarks/bound_overhead_check.py [--model unet|resnet50|bert] [--out result.json]

The module is cast to fp16 before wrapping (its precision is read from the weights) and optimized with eager and
TorchCompileCUDAGraphs only, so the run is short. Needs a CUDA GPU (and diffusers for the UNet).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import MODELS, cuda_ms

import navdeploy as nav


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="unet", choices=sorted(MODELS))
    parser.add_argument("--out")
    args = parser.parse_args()
    build, batch_sizes = MODELS[args.model]
    model, sample, _ = build()
    model = model.half()
    bs = batch_sizes[0]
    a, k = sample(bs)
    a = tuple(t.half() if t.is_floating_point() else t for t in a)
    wrapped = nav.Module(model, name=f"overhead_{args.model}")
    config = nav.OptimizeConfig(workspace=tempfile.mkdtemp(), runners=("TorchCUDA", "TorchCompileCUDAGraphs"),
                                batch_sizes=(bs,), max_batch_size=bs, timeout_s=300)
    with torch.no_grad():
        status = nav.optimize(lambda *x, **y: wrapped(*x, **y), [(bs, (*a, k))], config)
    handler = wrapped.nav_state.handler
    result = {"model": args.model, "precision": wrapped.precision, "inferred": wrapped.precision_inferred,
              "selected": status.selected(), "optimized": wrapped.is_optimized}
    with torch.no_grad():
        result["eager_ms"] = cuda_ms(lambda: model(*a, **k))
        if handler is not None:
            key, tensors, _ = handler._graph_key(a, k)
            run = handler.graphs[key][1]
            result["runner_ms"] = cuda_ms(lambda: run(tensors))
            result["handler_ms"] = cuda_ms(lambda: handler(model.forward, a, k))
        result["module_call_ms"] = cuda_ms(lambda: wrapped(*a, **k))
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(200):
            wrapped(*a, **k)
        torch.cuda.synchronize()
        profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(25)
    result["profile_top"] = text.getvalue().splitlines()[:60]
    print(json.dumps({k: v for k, v in result.items() if k != "profile_top"}, indent=1))
    print("\n".join(result["profile_top"]))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
