"""What routing one decoder step with an HF KV cache costs navdeploy, per call, on the CPU.

An optimized decoder module's every ``generate`` step passes a ``DynamicCache`` in and gets it back: the handler
checks the call against the structure of the previous step (``capture/match.py``; the first call of a
structure is flattened into a spec and a list of tensors instead, and its graph key memoised by the spec's pickle),
runs the runner, and writes the returned tensors back into the cache object. This times those steps alone (no
runner) for caches of GPT-2-shaped layers, as the number of layers grows; a step's routing is the match and the
rebuild (``total``), the first call of a structure flattens and pickles instead of matching:

    python benchmarks/cache_call_overhead.py [--layers 4,12,32] [--out benchmarks/results/cache_call_cpu.json]

Each figure is the median over rounds of the mean time per call; the JSON holds every round.
"""

from __future__ import annotations

import argparse
import json
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def _per_call_us(fn, calls: int, rounds: int) -> dict:
    for _ in range(calls // 10):
        fn()
    runs = []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        runs.append((time.perf_counter() - start) / calls * 1e6)
    return {"median_us": statistics.median(runs), "min_us": min(runs), "max_us": max(runs), "rounds_us": runs}


def measure(layers: int, calls: int, rounds: int) -> dict:
    from transformers import DynamicCache, GPT2Config

    from navdeploy.capture.match import call_matcher, match_call
    from navdeploy.capture.pytree import flatten, flatten_call, unflatten

    cache = DynamicCache(config=GPT2Config(n_layer=layers))
    for i in range(layers):
        cache.update(torch.randn(2, 12, 10, 64), torch.randn(2, 12, 10, 64), i)
    # A GPT-2 decode step's keyword arguments as generate passes them.
    kwargs = {"input_ids": torch.ones(2, 1, dtype=torch.long), "past_key_values": cache,
              "attention_mask": torch.ones(2, 11, dtype=torch.long), "position_ids": torch.ones(2, 1, dtype=torch.long),
              "use_cache": True, "return_dict": True, "cache_position": torch.tensor([10])}
    spec, tensors = flatten_call((), kwargs, "decoder")
    output = {"logits": torch.randn(2, 1, 100), "past_key_values": cache}
    out_spec, out_tensors = flatten(output, outputs=True)
    match = call_matcher(spec)  # the handler compiles a structure's matcher once
    steps = {
        "match the previous step's structure": lambda: match((), kwargs),
        "rebuild the output (cache included)": lambda: unflatten(out_spec, out_tensors, rebuild_classes=False),
        "first call: flatten": lambda: flatten_call((), kwargs, "decoder"),
        "first call: memo key (pickle)": lambda: pickle.dumps(spec, 5),
    }
    assert match_call(spec, (), kwargs) is not None and match((), kwargs) is not None
    result = {name: _per_call_us(fn, calls, rounds) for name, fn in steps.items()}
    return {"layers": layers, "tensors_in": len(tensors), "steps": result,
            "total_median_us": sum(result[name]["median_us"] for name in list(steps)[:2])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default="4,12,32")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_call_cpu.json"))
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    import navdeploy

    rows = [measure(int(n), args.calls, args.rounds) for n in args.layers.split(",")]
    table = Table(title="navdeploy: routing cost of one decoder step with a DynamicCache (no runner), CPU")
    table.add_column("layers", justify="right")
    table.add_column("tensors", justify="right")
    for name in rows[0]["steps"]:
        table.add_column(f"{name} µs", justify="right")
    table.add_column("total µs (match + rebuild)", justify="right")
    for row in rows:
        cells = [f"{s['median_us']:.1f} [{s['min_us']:.1f}-{s['max_us']:.1f}]" for s in row["steps"].values()]
        table.add_row(str(row["layers"]), str(row["tensors_in"]), *cells, f"{row['total_median_us']:.1f}")
    Console(width=160).print(table)
    import transformers

    result = {"command": " ".join(["python benchmarks/cache_call_overhead.py", *sys.argv[1:]]),
              "machine": {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
                          "python": platform.python_version(), "torch": torch.__version__,
                          "transformers": transformers.__version__, "navdeploy": navdeploy.__version__},
              "calls_per_round": args.calls, "rounds": args.rounds, "rows": rows}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
