"""GPU benchmark (device machine: one H100 or H200): eager fp32, eager fp16, every navdeploy candidate and the selected
one, for a ResNet-50-sized CNN (batch 1 and 32), a BERT-base-sized encoder and a small Stable-Diffusion UNet,
plus nav.optimize wall time.

    python benchmarks/bench_gpu.py --models resnet50,bert,unet --out $OUT/gpu.json

Candidates are built by --build-workers worker processes side by side (default 4; profiling still runs with no
build in flight), so that the three models fit in one 10-minute device call.

Models are built from code/configs with random weights (nothing is downloaded). Prints a table per model and
writes JSON. Every correct candidate is also bound on its own from the manifest (as load_optimized binds) and
timed at every batch size; the selected one is the optimized module itself (bound by nav.optimize from its
manifest), or bound again with --rebind-selected. Targets (ratios
from one run): selected within 3% of the fastest correct candidate measured independently; ResNet-50 fp16
optimized >= 5x eager fp16 at batch 1 and >= 3x at batch 32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import navdeploy as nav
from navdeploy.inplace.binding import bind
from navdeploy.workspace.manifest import read_manifest
from navdeploy.workspace.records import Manifest

RESNET50_GFLOP_PER_IMAGE = 2 * 4.09  # 4.09 GMACs per 224x224 image
BF16_MATMUL_CEILING_TFLOPS = 798.0  # an H100/H200's measured bf16 matmul rate (769-798 TFLOP/s, 8192^3)


def cuda_ms(fn, warmup: int = 10, iters: int = 50, repeats: int = 5) -> float:
    """Median over repeats of the mean per-call time between CUDA events, in ms."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)


def resnet50():
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.resnet50(weights=None).eval().cuda()
    return model, lambda bs: ((torch.randn(bs, 3, 224, 224, device="cuda"),), {}), {}


def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig()).eval().cuda()

    def sample(bs):
        ids = torch.randint(0, 30000, (bs, 128), device="cuda")
        return (ids,), {"attention_mask": torch.ones(bs, 128, dtype=torch.long, device="cuda")}

    return model, sample, {}


def unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                                 block_out_channels=(128, 256, 256), cross_attention_dim=256,
                                 down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                                 attention_head_dim=8).eval().cuda()

    def sample(bs):
        return ((torch.randn(bs, 4, 32, 32, device="cuda"), torch.tensor(10, device="cuda"),
                 torch.randn(bs, 77, 256, device="cuda")), {"return_dict": False})

    return model, sample, {}


MODELS = {"resnet50": (resnet50, (1, 32)), "bert": (bert, (1, 8)), "unet": (unet, (2,))}


def bench_model(name: str, workspace: Path, timeout_s: float, runners, profile_time_s: float,
                rebind_selected: bool, build_workers: int, checkpoint=lambda result: None) -> dict:
    build, batch_sizes = MODELS[name]
    model32, sample, _ = build()
    captured = batch_sizes[0]
    result: dict = {"model": name, "parameters": sum(p.numel() for p in model32.parameters()),
                    "batch_sizes": batch_sizes}

    def time_call(module, call: tuple[tuple, dict]) -> float:
        a, k = call
        with torch.no_grad():
            return cuda_ms(lambda: module(*a, **k))

    def sample16(bs: int) -> tuple[tuple, dict]:
        """The model's sample at batch ``bs`` with float tensors in fp16."""
        args, kwargs = sample(bs)
        half = (lambda v: v.half() if torch.is_tensor(v) and v.is_floating_point() else v)
        return tuple(half(v) for v in args), {key: half(v) for key, v in kwargs.items()}

    def time_at(module, bs: int) -> float:
        return time_call(module, sample16(bs))

    phase_start = time.perf_counter()
    result["eager_fp32_ms"] = {}
    for bs in batch_sizes:
        result["eager_fp32_ms"][bs] = time_call(model32, sample(bs))
    model16 = model32.half()  # in place: the fp32 copy is gone from here on
    result["eager_fp16_ms"] = {bs: time_at(model16, bs) for bs in batch_sizes}
    wrapped = nav.Module(model16, name=f"bench_{name}", precision="fp16")
    config = nav.OptimizeConfig(workspace=workspace, batch_sizes=batch_sizes, max_batch_size=max(batch_sizes),
                                profile_time_s=profile_time_s, timeout_s=timeout_s, runners=runners,
                                build_workers=build_workers, keep_artifacts=True)  # every candidate is bound below
    args, kwargs = sample16(captured)
    data = [(captured, (*args, kwargs))] if kwargs else [(captured, args)]
    start = time.perf_counter()
    result["bench_phases_s"] = {"build_and_eager": start - phase_start}
    status = nav.optimize(wrapped, data, config)
    result["optimize_s"] = time.perf_counter() - start
    result["bench_phases_s"]["optimize"] = result["optimize_s"]
    result["build_workers"] = build_workers
    phase_start = time.perf_counter()
    graph = status.modules[f"bench_{name}"].graphs[0]
    result["selected"] = graph.selected
    result["candidates"] = {
        c.name: {"status": c.status, "error": c.error, "max_abs_err": c.max_abs_err,
                 "p50_ms": {(m.batch_size or captured): m.p50_ms for m in c.profile},
                 "times": c.times, "window": c.window.to_json() if c.window else None} for c in graph.candidates}
    # The candidates' own steps added up (export, load, verify, profile; not the waits for the timing gate),
    # against optimize's wall time. An upper bound on a one-worker run's candidate time, not a measurement of
    # one: steps that ran side by side shared the CPU cores and the GPU, and worker starts, the parent's bind
    # and the report are left out. Compare with a --build-workers 1 run for what side by side saved.
    result["candidates_serial_s"] = sum(sum(v for v in c.times.values() if v)
                                        for c in graph.candidates if not c.cached)
    checkpoint(result)  # the candidates' figures survive a kill in the phases below
    ok = {n: c for n, c in result["candidates"].items() if c["status"] == "ok"}
    # The swapped module right after optimize, measured here, outside navdeploy.
    result["optimized_ms"] = {bs: time_at(wrapped, bs) for bs in batch_sizes}
    checkpoint(result)
    result["speedup_vs_eager_fp16"] = {bs: result["eager_fp16_ms"][bs] / ms
                                       for bs, ms in result["optimized_ms"].items()}
    result["selected_vs_best"] = {}
    for bs, ms in result["optimized_ms"].items():
        best = min((c["p50_ms"].get(bs) for c in ok.values() if c["p50_ms"].get(bs)), default=None)
        result["selected_vs_best"][bs] = ms / best if best else None
    # Every correct candidate measured independently, the same way as the swapped module: bind the module to
    # that candidate from a copy of the manifest (as load_optimized binds) and time it at every batch size. The
    # selected one's figures are the swapped module's above (optimize bound it from its manifest); rebinding it
    # too (--rebind-selected, the "rebound" figures) costs two more compiles per model.
    folder = workspace / f"bench_{name}"
    manifest = read_manifest(folder)
    result["independent_ms_by_batch"] = {}
    others = [cand for cand in ok if cand != graph.selected or rebind_selected]
    for cand in sorted(others, key=lambda n: n == graph.selected):
        trial = Manifest.from_json(manifest.to_json())  # a copy: the manifest on disk is left as it is
        trial.graphs[graph.key].selected = cand
        if bind(wrapped, folder, trial):
            result["independent_ms_by_batch"][cand] = {bs: time_at(wrapped, bs) for bs in batch_sizes}
    if graph.selected in ok and not rebind_selected:
        result["independent_ms_by_batch"][graph.selected] = result["optimized_ms"]
    result["bench_phases_s"]["independent"] = time.perf_counter() - phase_start
    result["independent_ms"] = {cand: by_bs[captured] for cand, by_bs in result["independent_ms_by_batch"].items()}
    if result["independent_ms"]:
        best = min(result["independent_ms"].values())
        result["independent_fastest"] = min(result["independent_ms"], key=result["independent_ms"].get)
        result["selected_vs_fastest_independent"] = result["independent_ms"].get(graph.selected, float("nan")) / best
    if rebind_selected:
        result["optimized_rebound_ms"] = result["independent_ms_by_batch"].get(graph.selected, {})
    if name == "resnet50" and 32 in batch_sizes:
        result["tflops_b32"] = 32 * RESNET50_GFLOP_PER_IMAGE / result["optimized_ms"][32]  # GFLOP/ms = TFLOP/s
        result["tflops_ceiling_bf16"] = BF16_MATMUL_CEILING_TFLOPS
    return result


def print_table(r: dict) -> None:
    print(f"\n== {r['model']} ({r['parameters'] / 1e6:.1f} M params) optimize {r['optimize_s']:.0f} s with "
          f"{r['build_workers']} build worker(s) (candidates' steps added up: {r['candidates_serial_s']:.0f} s), "
          f"selected {r['selected']}")
    bss = r["batch_sizes"]
    print(f"{'candidate':36} {'status':8} " + " ".join(f"{'b' + str(b) + ' ms':>9}" for b in bss) + "  error")
    print(f"{'eager fp32 (bench)':36} {'':8} " + " ".join(f"{r['eager_fp32_ms'][b]:9.3f}" for b in bss))
    print(f"{'eager fp16 (bench)':36} {'':8} " + " ".join(f"{r['eager_fp16_ms'][b]:9.3f}" for b in bss))
    for n, c in r["candidates"].items():
        cells = " ".join(f"{c['p50_ms'].get(b, float('nan')):9.3f}" for b in bss)
        print(f"{n:36} {c['status']:8} {cells}  {(c['error'] or '')[:70]}")
    print(f"{'optimized module (bench)':36} {'':8} " + " ".join(f"{r['optimized_ms'][b]:9.3f}" for b in bss))
    print("speedup vs eager fp16: " + ", ".join(f"b{b} {r['speedup_vs_eager_fp16'][b]:.2f}x" for b in bss)
          + " | selected/best: " + ", ".join(f"b{b} {v:.3f}" for b, v in r["selected_vs_best"].items() if v))
    if r.get("independent_ms"):
        for b in bss:
            by_bs = {n: ms[b] for n, ms in r["independent_ms_by_batch"].items()}
            cells = ", ".join(f"{n} {ms:.3f}" for n, ms in sorted(by_bs.items(), key=lambda x: x[1]))
            print(f"independent, batch {b} (ms): {cells}")
        print(f"selected / fastest independent: {r['selected_vs_fastest_independent']:.3f} (target <= 1.03)")
    if r.get("optimized_rebound_ms"):
        print("selected runner rebound from the manifest (ms): "
              + ", ".join(f"b{b} {ms:.3f} ({r['eager_fp16_ms'][b] / ms:.2f}x eager fp16)"
                          for b, ms in r["optimized_rebound_ms"].items()))
    if "tflops_b32" in r:
        print(f"achieved {r['tflops_b32']:.1f} TFLOP/s at batch 32 "
              f"(bf16 matmul ceiling ~{r['tflops_ceiling_bf16']:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,bert,unet")
    parser.add_argument("--out", default="gpu.json")
    parser.add_argument("--timeout", type=float, default=240.0, help="per-candidate timeout, seconds")
    parser.add_argument("--runners", default="", help="comma-separated runner names (default: all)")
    parser.add_argument("--profile-time", type=float, default=0.5, help="nav.optimize's profile_time_s")
    parser.add_argument("--rebind-selected", action="store_true",
                        help="also bind the selected candidate again from the manifest and time it (two more compiles)")
    parser.add_argument("--build-workers", type=int, default=4,
                        help="worker processes building candidates side by side (profiling stays alone)")
    parser.add_argument("--workspace", default=None, help="navdeploy workspace (default: a new temporary folder)")
    args = parser.parse_args()
    runners = tuple(r for r in args.runners.split(",") if r) or None
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:])}
    results = {"environment": env, "models": []}
    workspace = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="navdeploy-gpu-"))
    # One inductor cache for the whole run, as nav.optimize and load_optimized use: binding a compile candidate
    # again for the independent figures then compiles from the cache its worker filled, not from scratch.
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(workspace / "inductor_cache"))
    run_start = time.perf_counter()

    in_progress: dict = {}

    def save(partial: dict | None = None) -> None:
        """The JSON so far, with a model still in progress marked as such (a kill loses only what is left)."""
        in_progress.clear()
        in_progress.update(partial or {})
        models = results["models"] + ([{**partial, "partial": True}] if partial else [])
        Path(args.out).write_text(json.dumps({**results, "models": models}, indent=2, default=str))

    for name in args.models.split(","):
        try:
            r = bench_model(name, workspace, args.timeout, runners, args.profile_time, args.rebind_selected,
                            args.build_workers, checkpoint=save)
            results["models"].append(r)
            print_table(r)
        except Exception as exc:  # noqa: BLE001 - one model failing must not lose the others' figures
            results["models"].append({**in_progress, "model": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"\n== {name}: FAILED {type(exc).__name__}: {exc}")
        results["wall_s"] = time.perf_counter() - run_start
        print(f"[{results['wall_s']:.0f} s since start]", flush=True)
        save()
    print(json.dumps({"environment": env}, default=str))


if __name__ == "__main__":
    os.environ.setdefault("NAVDEPLOY_CONSOLE_OUTPUT", "simple")
    main()
