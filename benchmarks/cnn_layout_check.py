"""Which torch.compile settings make a ResNet-50 fp16 fast at batch 32 on CUDA (device machine)?

    python benchmarks/cnn_layout_check.py --out $OUT/cnn_layout.json

Inductor turns off its channels-last layout optimization for convolutions with symbolic shapes
(torch/_inductor/graph.py decide_layout_opt, pytorch#102670), and navdeploy compiles batching graphs with
dynamic=True. This script measures, outside navdeploy, eager and compiled variants at batch 1 and 32: dynamic vs
static shapes, forced layout optimization, freezing, a channels-last module copy. Each variant compiles in its
own process (several at once: compiling is CPU work); timing takes a file lock so only one variant is timed at a
time. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BATCH_SIZES = (1, 32)
GFLOP_PER_IMAGE = 2 * 4.09

# name -> (compile mode or None for eager, dynamic (None: torch's automatic dynamic shapes), extra inductor
# options, channels-last module)
VARIANTS = {
    "eager": (None, None, {}, False),
    "eager_channels_last": (None, None, {}, True),
    "compile_dynamic": ("default", True, {}, False),
    "compile_dynamic_force_layout": ("default", True, {"force_layout_optimization": True}, False),
    "graphs_dynamic": ("reduce-overhead", True, {}, False),
    "graphs_dynamic_force_layout": ("reduce-overhead", True, {"force_layout_optimization": True}, False),
    "graphs_dynamic_force_layout_freezing": ("reduce-overhead", True,
                                             {"force_layout_optimization": True, "freezing": True}, False),
    "graphs_dynamic_channels_last": ("reduce-overhead", True, {}, True),
    "graphs_automatic_channels_last": ("reduce-overhead", None, {}, True),
    "compile_automatic_channels_last": ("default", None, {}, True),
    "graphs_static": ("reduce-overhead", False, {}, False),
    "graphs_static_freezing": ("reduce-overhead", False, {"freezing": True}, False),
}


def run_variant(name: str, lock_path: Path) -> dict:
    import torch
    import torch._inductor
    import torchvision
    from bench_gpu import cuda_ms  # this folder is on sys.path when the script runs

    mode, dynamic, extra, channels_last = VARIANTS[name]
    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().cuda().half()
    inputs = {bs: torch.randn(bs, 3, 224, 224, device="cuda", dtype=torch.half) for bs in BATCH_SIZES}
    with torch.no_grad():
        reference = {bs: model(x).float() for bs, x in inputs.items()}
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    fn = model
    if mode is not None:
        # torch.compile takes mode or options, not both: spell the mode out as options.
        options = {**torch._inductor.list_mode_options(mode), **extra}
        fn = torch.compile(model, dynamic=dynamic, options=options or None)

    def call(x):
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()
        return fn(x)

    result: dict = {"variant": name}
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(3):  # compile, CUDA-graph warm-up and record, for each batch size
            for x in inputs.values():
                call(x)
        torch.cuda.synchronize()
        result["compile_s"] = time.perf_counter() - start
        result["max_abs_err"] = max(float((call(x).float() - reference[bs]).abs().max()) for bs, x in inputs.items())
        with open(lock_path, "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            result["ms"] = {str(bs): cuda_ms(lambda x=x: call(x)) for bs, x in inputs.items()}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset of: " + ", ".join(VARIANTS))
    parser.add_argument("--parallel", type=int, default=5, help="variants compiling at once")
    parser.add_argument("--deadline", type=float, default=480.0,
                        help="seconds after which unfinished variants are stopped")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant, print its JSON
    parser.add_argument("--lock", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print("RESULT " + json.dumps(run_variant(args.variant, args.lock)), flush=True)
        return

    lock = Path(tempfile.gettempdir()) / f"cnn_layout_check.{os.getpid()}.lock"
    pending = args.variants.split(",")
    running: dict[str, subprocess.Popen] = {}
    results: dict[str, dict] = {}
    stop_at = time.monotonic() + args.deadline
    while pending or running:
        while pending and len(running) < args.parallel:
            name = pending.pop(0)
            running[name] = subprocess.Popen([sys.executable, __file__, "--out", str(args.out), "--variant", name,
                                              "--lock", str(lock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                             text=True)
        time.sleep(1)
        for name, proc in list(running.items()):
            if proc.poll() is None and time.monotonic() < stop_at:
                continue
            if proc.poll() is None:
                proc.kill()
            out, err = proc.communicate()
            line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
            results[name] = json.loads(line[7:]) if line else {"variant": name, "error": (err or "no output")[-600:]}
            del running[name]
            print(f"{name}: {results[name]}", flush=True)

    eager = results.get("eager", {}).get("ms", {})
    print(f"\n{'variant':40} {'b1 ms':>8} {'b32 ms':>8} {'b1 x':>6} {'b32 x':>6} {'TFLOP/s b32':>11} {'compile s':>9}")
    for name, r in results.items():
        ms = r.get("ms")
        if not ms:
            print(f"{name:40} failed: {r.get('error', '')[-200:]!r}")
            continue
        b1, b32 = ms["1"], ms["32"]
        x1, x32 = eager.get("1", 0) / b1, eager.get("32", 0) / b32
        r["tflops_b32"] = 32 * GFLOP_PER_IMAGE / b32
        print(f"{name:40} {b1:8.3f} {b32:8.3f} {x1:6.2f} {x32:6.2f} {r['tflops_b32']:11.1f} "
              f"{r.get('compile_s', 0):9.1f}")
    import torch

    args.out.write_text(json.dumps({"command": " ".join(sys.argv), "torch": torch.__version__,
                                    "gpu": torch.cuda.get_device_name(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
