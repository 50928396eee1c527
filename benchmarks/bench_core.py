"""Core benchmark on this CPU machine, in one run: optimize wall time of the example CNN
(``examples/image_classifier.py``: first run in a new workspace, cache-hit re-run), peak RSS, eager vs
selected-runner latency at batch 1 and 8, and the per-call overhead of nav.Module.

    python benchmarks/bench_core.py [--out benchmarks/results/core_cpu.json] [--build-workers N] [--thorough]

The first run is cold for the workspace; the machine cache (Inductor's ISA probe) is as the machine has it
(``machine_cache_warm`` in the JSON). Prints a table and writes JSON. Compare ratios measured in one run: these
machines are shared and noisy. ``benchmarks/bench_search.py`` compares the search with the exhaustive one and with
Model Navigator 0.14.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

import navdeploy as nav
from navdeploy.candidates.profile import measure

TARGETS = {"cache_hit_rerun_s": 2.0, "passthrough_overhead_us": 5.0, "cold_optimize_s": 10.0,
           "optimized_overhead_us": 5.0, "staleness_check_us_100_params": 2.0}

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
from image_classifier import build_classifier  # noqa: E402 - the example's CNN, the issue's reference model


def per_call_us(fn, x, calls: int = 20000, repeats: int = 5) -> float:
    """Median over repeats of the mean time per call, in microseconds."""
    results = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn(x)
        results.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(results)


def staleness_check_us() -> float:
    """What the bound-runner check (weights changed? training? autograd?) costs per call on a module with 100
    parameter tensors, under no_grad as inference runs."""
    from navdeploy.inplace.staleness import WeightsWatch
    from navdeploy.inplace.state import ModuleState

    module = nn.Sequential(*[nn.Linear(4, 4) for _ in range(50)]).eval()  # 50 weights + 50 biases
    watch = WeightsWatch(module, ModuleState("bench_watch", None, None, None, None, "fp32"))
    x = torch.randn(1, 4)
    with torch.no_grad():
        return per_call_us(lambda t: watch.reason([t]), x)


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "core_cpu.json"))
    parser.add_argument("--build-workers", type=int, default=1, help="OptimizeConfig.build_workers")
    parser.add_argument("--thorough", action="store_true", help="OptimizeConfig.thorough: the exhaustive search")
    args = parser.parse_args()
    workspace = Path(tempfile.mkdtemp(prefix="navdeploy-bench-"))
    from navdeploy.workspace.machine_cache import machine_cache_root

    machine_cache_warm = any(machine_cache_root().glob("inductor-cpu-isa-*/*/*.so"))
    raw = build_classifier()
    params = sum(p.numel() for p in raw.parameters())
    model = nav.Module(raw, name="bench_cnn")
    data = [(1, torch.randn(1, 3, 64, 64)) for _ in range(4)]  # as the example optimizes it
    config = nav.OptimizeConfig(workspace=workspace, build_workers=args.build_workers, thorough=args.thorough)

    start = time.perf_counter()
    status = nav.optimize(model, data, config)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    again = nav.optimize(model, data, config)
    rerun_s = time.perf_counter() - start
    graph = status.modules["bench_cnn"].graphs[0]
    cached = all(c.cached for c in again.modules["bench_cnn"].graphs[0].candidates if c.status != "skipped")

    latency = {}
    with torch.no_grad():
        for bs in (1, 8):
            x = torch.randn(bs, 3, 64, 64)
            eager = measure(lambda x=x: raw(x), bs, "cpu", 1.0)
            optimized = measure(lambda x=x: model(x), bs, "cpu", 1.0)
            latency[bs] = {"eager_p50_ms": eager.p50_ms, "optimized_p50_ms": optimized.p50_ms,
                           "speedup": eager.p50_ms / optimized.p50_ms}

        # Wrapper overhead: a module that does almost nothing, so the difference is navdeploy's own cost.
        ident = nn.Identity()
        x = torch.randn(1, 4)
        direct_us = per_call_us(ident, x)
        passthrough = nav.Module(nn.Identity(), name="bench_identity")
        passthrough_us = per_call_us(passthrough, x)
        runner = model.nav_state.handler.graphs[graph.key][1] if model.is_optimized else None
        xs = torch.randn(1, 3, 64, 64)
        runner_us = per_call_us(lambda t: runner([t]), xs, calls=2000) if runner else None
        routed_us = per_call_us(model, xs, calls=2000) if runner else None
        staleness_us = staleness_check_us()

    result = {
        "command": " ".join(["python benchmarks/bench_core.py", *sys.argv[1:]]),
        "build_workers": args.build_workers,
        "thorough": args.thorough,
        "machine_cache_warm": machine_cache_warm,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": torch.get_num_threads(),
                    "python": platform.python_version(), "torch": torch.__version__},
        "model": {"name": "examples/image_classifier.py", "parameters": params, "input": [1, 3, 64, 64]},
        "optimize_first_run_s": first_s,
        "optimize_cache_hit_rerun_s": rerun_s,
        "cache_hit_all_cached": cached,
        "peak_rss_mib_parent": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "peak_rss_mib_children": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
        "selected": graph.selected,
        "candidates": {c.runner: {"status": c.status, "p50_ms_b1": c.shown_p50_ms(), "error": c.error,
                                  "times": {k: v for k, v in c.times.items() if v is not None}}
                       for c in graph.candidates},
        "module_s": status.modules["bench_cnn"].seconds,
        "latency": latency,
        "overhead_us": {"direct_call": direct_us, "passthrough_call": passthrough_us,
                        "passthrough_overhead": passthrough_us - direct_us,
                        "runner_direct": runner_us, "optimized_call": routed_us,
                        "optimized_overhead": (routed_us - runner_us) if runner else None,
                        "staleness_check_100_params": staleness_us},
        "targets": TARGETS,
    }
    table = Table(title=f"navdeploy core benchmark ({params} parameter CNN, CPU)")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    mode = "thorough" if args.thorough else "default search"
    table.add_row(f"optimize, first run ({mode}, {args.build_workers} build worker(s))", f"{first_s:.1f} s",
                  f"<= {TARGETS['cold_optimize_s']:.0f} s")
    table.add_row("optimize, cache-hit re-run", f"{rerun_s:.2f} s", f"< {TARGETS['cache_hit_rerun_s']} s")
    table.add_row("peak RSS parent / children", f"{result['peak_rss_mib_parent']:.0f} / "
                  f"{result['peak_rss_mib_children']:.0f} MiB", "")
    table.add_row("selected runner", str(graph.selected), "")
    for bs, row in latency.items():
        table.add_row(f"batch {bs}: eager / optimized p50",
                      f"{row['eager_p50_ms']:.3f} / {row['optimized_p50_ms']:.3f} ms ({row['speedup']:.2f}x)",
                      ">= 1x (within noise)")
    table.add_row("nav.Module overhead, pass-through", f"{passthrough_us - direct_us:.2f} µs/call",
                  f"< {TARGETS['passthrough_overhead_us']} µs")
    if runner:
        table.add_row("nav.Module overhead, optimized (routing, checks included)",
                      f"{routed_us - runner_us:.2f} µs/call", f"< {TARGETS['optimized_overhead_us']} µs")
    table.add_row("bound-runner check, 100 parameter tensors", f"{staleness_us:.2f} µs/call",
                  f"< {TARGETS['staleness_check_us_100_params']} µs")
    Console().print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
