"""AOTInductor CPU builds with the wrapper at -O1 (torch's default) against -Og (navdeploy's): build time, and the
call time of the two packages, A/B in one process.

    python benchmarks/aoti_wrapper_opt_check.py [--rounds 2] [--out benchmarks/results/aoti_wrapper_opt_cpu.json]

Each build runs in a fresh process with a fresh inductor cache (Inductor's ISA probe runs before the clock starts;
torch's precompiled headers stay in torch's default cache, as in a user's runs), the two levels alternating. The g++
step of the wrapper is timed on its own. Then both packages of a model are loaded in this process and timed in
alternating rounds (medians of 300 calls per round, median of the rounds).
"""

from __future__ import annotations

import argparse
import atexit
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
LEVELS = ("O1", "Og")


def model_and_inputs(name: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if name == "cnn":  # examples/image_classifier.py's network
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)).eval()
        return model, (torch.randn(1, 3, 64, 64),), {}
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=1000, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                        intermediate_size=512, max_position_embeddings=128, num_labels=3)  # bench_search's BERT
    model = BertForSequenceClassification(config).eval()
    return model, (), {"input_ids": torch.randint(1, 1000, (1, 12)),
                       "attention_mask": torch.ones(1, 12, dtype=torch.long)}


def child_build(name: str, level: str, package: str) -> dict:
    """Build ``name``'s package with the wrapper at ``level``; the build's seconds and its wrapper g++ step."""
    import torch
    import torch._inductor.codecache  # fixes the precompiled-header folder at torch's default

    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="aoti-wrapper-opt-")
    atexit.register(shutil.rmtree, cache, True)  # this build's inductor cache: the package holds what is timed
    from torch._inductor import cpu_vec_isa

    cpu_vec_isa.pick_vec_isa()  # the ISA probe: navdeploy keeps it in its machine cache
    model, args, kwargs = model_and_inputs(name)
    with torch.no_grad():
        program = torch.export.export(model, args, kwargs)
    wrapper_s: list[float] = []
    run = subprocess.run

    def timed_run(cmd, *a, **k):
        start = time.perf_counter()
        try:
            return run(cmd, *a, **k)
        finally:
            if "wrapper.cpp" in (cmd if isinstance(cmd, str) else " ".join(map(str, cmd))):
                wrapper_s.append(time.perf_counter() - start)

    subprocess.run = timed_run
    start = time.perf_counter()
    torch._inductor.aoti_compile_and_package(program, package_path=package, inductor_configs={
        "aot_inductor.compile_wrapper_opt_level": level})
    return {"build_s": time.perf_counter() - start, "wrapper_gxx_s": sum(wrapper_s)}


def call_times(packages: dict[str, str], name: str, rounds: int = 10, calls: int = 300) -> dict[str, list[float]]:
    import torch

    _, args, kwargs = model_and_inputs(name)
    flat = list(args) + list(kwargs.values())
    runs = {level: torch._inductor.aoti_load_package(path).loader.boxed_run for level, path in packages.items()}
    medians: dict[str, list[float]] = {level: [] for level in runs}
    with torch.no_grad():
        for run in runs.values():
            for _ in range(100):
                run(list(flat))  # boxed_run takes its list
        for _ in range(rounds):
            for level, run in runs.items():
                times = []
                for _ in range(calls):
                    start = time.perf_counter()
                    run(list(flat))
                    times.append(time.perf_counter() - start)
                medians[level].append(statistics.median(times) * 1e6)
    return medians


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="cnn,bert")
    parser.add_argument("--rounds", type=int, default=2, help="builds per level and model, alternating")
    parser.add_argument("--out", default=str(HERE / "results" / "aoti_wrapper_opt_cpu.json"))
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "LEVEL", "PACKAGE"))
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child_build(*args.child)))
        return 0
    import torch

    results: dict = {"command": " ".join(["python benchmarks/aoti_wrapper_opt_check.py", *sys.argv[1:]]),
                     "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                 "torch": torch.__version__, "load_average": os.getloadavg()},
                     "models": {}}
    folder = Path(tempfile.mkdtemp(prefix="aoti-wrapper-opt-packages-"))
    print(f"{'model':6} {'level':5} {'build s':>16} {'wrapper g++ s':>16} {'call us (median of rounds)':>28}")
    for name in [m for m in args.models.split(",") if m]:
        builds: dict[str, list[dict]] = {level: [] for level in LEVELS}
        for r in range(args.rounds):
            for level in (LEVELS if r % 2 == 0 else LEVELS[::-1]):
                package = str(folder / f"{name}-{level}-{r}.pt2")
                done = subprocess.run([sys.executable, __file__, "--child", name, level, package],
                                      capture_output=True, text=True, check=True)
                builds[level].append(json.loads(done.stdout.strip().splitlines()[-1]))
        calls = call_times({level: str(folder / f"{name}-{level}-0.pt2") for level in LEVELS}, name)
        results["models"][name] = {"builds": builds, "call_us_round_medians": calls}
        for level in LEVELS:
            b = builds[level]
            build_s = " / ".join(f"{x['build_s']:.2f}" for x in b)
            wrapper_s = " / ".join(f"{x['wrapper_gxx_s']:.2f}" for x in b)
            print(f"{name:6} {level:5} {build_s:>16} {wrapper_s:>16} "
                  f"{statistics.median(calls[level]):>20.1f} [{min(calls[level]):.0f}-{max(calls[level]):.0f}]")
    results["machine"]["load_average_after"] = os.getloadavg()
    shutil.rmtree(folder, ignore_errors=True)  # the packages this run built
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("wrote", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
