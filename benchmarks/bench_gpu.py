"""GPU benchmark (device machine, one H100): eager fp32, eager fp16, every navdeploy candidate and the selected
one, for a ResNet-50-sized CNN (batch 1 and 32), a BERT-base-sized encoder and a small Stable-Diffusion UNet,
plus nav.optimize wall time.

    python benchmarks/bench_gpu.py --models resnet50,bert,unet --out $OUT/gpu.json

Models are built from code/configs with random weights (nothing is downloaded). Prints a table per model and
writes JSON. Targets (ratios from one run): selected within 3% of the fastest correct candidate measured
independently; ResNet-50 fp16 optimized >= 5x eager fp16 at batch 1 and >= 3x at batch 32.
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
import navdeploy as nav  # noqa: E402
from navdeploy.binding import bind  # noqa: E402

RESNET50_GFLOP_PER_IMAGE = 2 * 4.09  # 4.09 GMACs per 224x224 image
BF16_MATMUL_CEILING_TFLOPS = 798.0  # measured on the H100 of the device tool (KINDS.md, 8192^3 bf16 matmul)


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
        return (torch.randint(0, 30000, (bs, 128), device="cuda"),), {"attention_mask": torch.ones(bs, 128, dtype=torch.long, device="cuda")}

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


def bench_model(name: str, workspace: Path, timeout_s: float, runners) -> dict:
    build, batch_sizes = MODELS[name]
    model32, sample, _ = build()
    captured = batch_sizes[0]
    args, kwargs = sample(captured)[0], sample(captured)[1]
    result: dict = {"model": name, "parameters": sum(p.numel() for p in model32.parameters()), "batch_sizes": batch_sizes}
    with torch.no_grad():
        result["eager_fp32_ms"] = {bs: cuda_ms(lambda a=sample(bs): model32(*a[0], **a[1])) for bs in batch_sizes}
    model16 = model32.half()
    del model32

    def half(values):
        return tuple(v.half() if torch.is_tensor(v) and v.is_floating_point() else v for v in values)

    with torch.no_grad():
        result["eager_fp16_ms"] = {}
        for bs in batch_sizes:
            a, k = sample(bs)
            a = half(a)
            k = {key: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for key, v in k.items()}
            result["eager_fp16_ms"][bs] = cuda_ms(lambda: model16(*a, **k))
    wrapped = nav.Module(model16, name=f"bench_{name}", precision="fp16")
    config = nav.OptimizeConfig(workspace=workspace, batch_sizes=batch_sizes, max_batch_size=max(batch_sizes),
                                profile_time_s=1.0, timeout_s=timeout_s, runners=runners)
    data = [(captured, (*half(args), kwargs))] if kwargs else [(captured, half(args))]
    start = time.perf_counter()
    status = nav.optimize(wrapped, data, config)
    result["optimize_s"] = time.perf_counter() - start
    graph = status.modules[f"bench_{name}"].graphs[0]
    result["selected"] = graph.selected
    result["candidates"] = {
        c["name"]: {"status": c["status"], "error": c["error"], "max_abs_err": c["max_abs_err"],
                    "p50_ms": {(m["batch_size"] or captured): m["p50_ms"] for m in c["profile"]},
                    "times": c.get("times")} for c in graph.candidates}
    ok = {n: c for n, c in result["candidates"].items() if c["status"] == "ok"}
    result["optimized_ms"], result["speedup_vs_eager_fp16"], result["selected_vs_best"] = {}, {}, {}
    with torch.no_grad():
        for bs in batch_sizes:
            a, k = sample(bs)
            a = half(a)
            k = {key: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for key, v in k.items()}
            ms = cuda_ms(lambda: wrapped(*a, **k))  # the swapped module, measured here, outside navdeploy
            result["optimized_ms"][bs] = ms
            result["speedup_vs_eager_fp16"][bs] = result["eager_fp16_ms"][bs] / ms
            best = min((c["p50_ms"].get(bs) for c in ok.values() if c["p50_ms"].get(bs)), default=None)
            result["selected_vs_best"][bs] = ms / best if best else None
    # Every correct candidate measured independently, the same way as the swapped module: rebind the module with
    # that candidate selected (from a copy of the manifest) and time it with CUDA events.
    folder = workspace / f"bench_{name}"
    manifest = json.loads((folder / "manifest.json").read_text())
    result["independent_ms"] = {}
    for cand in ok:
        trial = json.loads(json.dumps(manifest))
        trial["graphs"][graph.key]["selected"] = cand
        if not bind(wrapped, folder, trial):
            continue
        a, k = sample(captured)
        a = half(a)
        k = {key: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for key, v in k.items()}
        with torch.no_grad():
            result["independent_ms"][cand] = cuda_ms(lambda: wrapped(*a, **k))
    if result["independent_ms"]:
        best = min(result["independent_ms"].values())
        result["independent_fastest"] = min(result["independent_ms"], key=result["independent_ms"].get)
        result["selected_vs_fastest_independent"] = result["independent_ms"].get(graph.selected, float("nan")) / best
    bind(wrapped, folder, manifest)
    # The selected runner again, bound fresh from the manifest (as load_optimized does), at every batch size.
    result["optimized_rebound_ms"] = {}
    with torch.no_grad():
        for bs in batch_sizes:
            a, k = sample(bs)
            a = half(a)
            k = {key: (v.half() if torch.is_tensor(v) and v.is_floating_point() else v) for key, v in k.items()}
            result["optimized_rebound_ms"][bs] = cuda_ms(lambda: wrapped(*a, **k))
    if name == "resnet50" and 32 in batch_sizes:
        result["tflops_b32"] = 32 * RESNET50_GFLOP_PER_IMAGE / result["optimized_ms"][32]  # GFLOP/ms = TFLOP/s
        result["tflops_ceiling_bf16"] = BF16_MATMUL_CEILING_TFLOPS
    return result


def print_table(r: dict) -> None:
    print(f"\n== {r['model']} ({r['parameters'] / 1e6:.1f} M params) optimize {r['optimize_s']:.0f} s, selected {r['selected']}")
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
        cells = ", ".join(f"{n} {ms:.3f}" for n, ms in sorted(r["independent_ms"].items(), key=lambda x: x[1]))
        print(f"independent, batch {r['batch_sizes'][0]} (ms): {cells}")
        print(f"selected / fastest independent: {r['selected_vs_fastest_independent']:.3f} (target <= 1.03)")
    if r.get("optimized_rebound_ms"):
        print("selected runner rebound from the manifest (ms): "
              + ", ".join(f"b{b} {ms:.3f} ({r['eager_fp16_ms'][b] / ms:.2f}x eager fp16)" for b, ms in r["optimized_rebound_ms"].items()))
    if "tflops_b32" in r:
        print(f"achieved {r['tflops_b32']:.1f} TFLOP/s at batch 32 (bf16 matmul ceiling ~{r['tflops_ceiling_bf16']:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50,bert,unet")
    parser.add_argument("--out", default="gpu.json")
    parser.add_argument("--timeout", type=float, default=240.0, help="per-candidate timeout, seconds")
    parser.add_argument("--runners", default="", help="comma-separated runner names (default: all)")
    parser.add_argument("--workspace", default=None, help="navdeploy workspace (default: a new temporary folder)")
    args = parser.parse_args()
    runners = tuple(r for r in args.runners.split(",") if r) or None
    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "python": platform.python_version(),
           "command": "python benchmarks/bench_gpu.py " + " ".join(sys.argv[1:])}
    results = {"environment": env, "models": []}
    workspace = Path(args.workspace) if args.workspace else Path(tempfile.mkdtemp(prefix="navdeploy-gpu-"))
    for name in args.models.split(","):
        try:
            r = bench_model(name, workspace, args.timeout, runners)
            results["models"].append(r)
            print_table(r)
        except Exception as exc:  # noqa: BLE001 - one model failing must not lose the others' figures
            results["models"].append({"model": name, "error": f"{type(exc).__name__}: {exc}"})
            print(f"\n== {name}: FAILED {type(exc).__name__}: {exc}")
        Path(args.out).write_text(json.dumps(results, indent=2, default=str))
    print(json.dumps({"environment": env}, default=str))


if __name__ == "__main__":
    os.environ.setdefault("NAVDEPLOY_CONSOLE_OUTPUT", "simple")
    main()
