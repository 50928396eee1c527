"""AOTInductor CPU builds with the wrapper compiled whole (torch's way) against in two parts with the interface from
the machine cache (``navdeploy/formats/aoti_interface.py``), with and without the model class's base instantiated in
the interface's object (``split`` / ``split_plain``): build seconds, A/B.

    python benchmarks/aoti_wrapper_split_check.py [--rounds 3] [--out benchmarks/results/aoti_wrapper_split_cpu.json]

Each build runs in a fresh process with a fresh inductor cache, as navdeploy's CPU builds run (the wrapper beside
the kernels, the wrapper at -Og; Inductor's ISA probe runs before the clock starts), the arms alternating. The
machine cache holds the interface's object before the first timed build (one build ahead, untimed), as it does on a
machine after its first build. Every package is loaded and checked against eager on the export's inputs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ARMS = ("whole", "split_plain", "split")


def model_and_inputs(name: str):
    sys.path.insert(0, str(HERE))
    from aoti_wrapper_opt_check import model_and_inputs as models

    return models(name)


def child(name: str, arm: str) -> dict:
    """One build of ``name`` for ``arm``: its seconds, and whether the package's outputs are eager's."""
    import torch

    from navdeploy.formats import aoti_interface
    from navdeploy.formats.aoti_compile import wrapper_beside_kernels
    from navdeploy.formats.inductor_probe import warm_cpu_isa

    folder = tempfile.mkdtemp(prefix="aoti-wrapper-split-")
    try:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, "inductor")
        warm_cpu_isa()
        model, args, kwargs = model_and_inputs(name)
        with torch.no_grad():
            program = torch.export.export(model, args, kwargs)
            expected = model(*args, **kwargs)
        if arm == "whole":
            aoti_interface._split = lambda command, instantiate=True: None  # torch's one-piece compile
        elif arm == "split_plain":
            aoti_interface._base_failed = True  # the split of session 30: the base instantiated in every model part
        configs = {"aot_inductor.compile_wrapper_opt_level": "Og"}
        spans: list[tuple[float, float]] = []  # every compiler command's start and end, the headers' included
        run = subprocess.run

        def timed(cmd, *a, **k):
            begin = time.perf_counter()
            try:
                return run(cmd, *a, **k)
            finally:
                if "-o" in (cmd.split() if isinstance(cmd, str) else [str(w) for w in cmd]):
                    spans.append((begin, time.perf_counter()))

        subprocess.run = timed
        start = time.perf_counter()
        with wrapper_beside_kernels():
            path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(folder, "m.pt2"),
                                                            inductor_configs=configs)
        seconds = time.perf_counter() - start
        out = torch._inductor.aoti_load_package(path)(*args, **kwargs)
        got = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (list, tuple)) else out
        want = expected.logits if hasattr(expected, "logits") else expected
        return {"build_s": seconds, "cxx_s": spans[-1][1] - spans[0][0],
                "max_abs_diff": float((got - want).abs().max())}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def run_child(name: str, arm: str) -> dict:
    done = subprocess.run([sys.executable, __file__, "--child", name, "--arm", arm], capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode != 0 or not lines:
        raise SystemExit(f"{name} {arm} failed:\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", default="cnn,bert")
    parser.add_argument("--out", default=str(HERE / "results" / "aoti_wrapper_split_cpu.json"))
    parser.add_argument("--child")
    parser.add_argument("--arm", choices=ARMS)
    args = parser.parse_args()
    if args.child:
        print("RESULT " + json.dumps(child(args.child, args.arm)), flush=True)
        return
    results: dict = {"command": " ".join([Path(sys.executable).name, *sys.argv]), "machine": platform.node(),
                     "cpus": os.cpu_count(), "models": {}}
    for name in args.models.split(","):
        for arm in ARMS[1:]:  # the interfaces' objects into the machine cache, as after a machine's first build
            run_child(name, arm)
        runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
        for round_ in range(args.rounds):
            for arm in ARMS if round_ % 2 == 0 else ARMS[::-1]:
                runs[arm].append(run_child(name, arm))
                print(f"{name} round {round_ + 1} {arm}: build {runs[arm][-1]['build_s']:.2f} s, "
                      f"C++ {runs[arm][-1]['cxx_s']:.2f} s", flush=True)
        results["models"][name] = {arm: {"median_build_s": statistics.median(r["build_s"] for r in runs[arm]),
                                         "median_cxx_s": statistics.median(r["cxx_s"] for r in runs[arm]),
                                         "build_s": [r["build_s"] for r in runs[arm]],
                                         "cxx_s": [r["cxx_s"] for r in runs[arm]],
                                         "max_abs_diff": max(r["max_abs_diff"] for r in runs[arm])} for arm in ARMS}
    print("medians, build s (its C++ steps s)")
    print(f"{'model':6} " + " ".join(f"{arm:>22}" for arm in ARMS))
    for name, arms in results["models"].items():
        print(f"{name:6} " + " ".join(f"{arms[arm]['median_build_s']:>13.2f} ({arms[arm]['median_cxx_s']:.2f})"
                                      for arm in ARMS))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
