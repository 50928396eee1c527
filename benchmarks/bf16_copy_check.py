"""Does eager's bf16 copy predict the compiled bf16 builds on a CPU that computes bf16? (OWN_PRECISION_SKIP_MARGIN)

    python benchmarks/bf16_copy_check.py --out benchmarks/results/bf16_copy_check.json [--only sd_vae_decoder ...]

The search decides from eager's bf16 copy, screened in turns with eager fp32, whether to build the compiled bf16
copies at all (``search.low_precision_skip_reason``) and whether the module's own fp32 builds are worth building
beside copies that verified (``search.own_precision_skip_reason``). This script measures, per model (random weights,
real architectures from diffusers and transformers configs), eager fp32 against eager bf16 in turns in this process,
and AOTInductor fp32 against AOTInductor bf16 as navdeploy builds and profiles them (``thorough=True``, profiled in
turns), and prints the two ratios side by side. Prints a table and writes JSON with the command and machine.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "examples"), str(ROOT / "benchmarks")]
import bench_pipelines  # noqa: E402 - the pipelines bench's models, from its folder


class Logits(torch.nn.Module):
    """An image classifier's logits from a tensor argument."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixels).logits


class UNetSample(torch.nn.Module):
    """The SD UNet's predicted noise from tensor arguments."""

    def __init__(self, unet: torch.nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.unet(sample, timestep, text).sample


@functools.cache
def _sd_pipeline():
    """The pipelines bench's tiny SD pipeline (its smaller UNet, the example's VAE)."""
    return bench_pipelines.SDGuidance().build()["pipe"]


def _sd_unet() -> tuple[torch.nn.Module, tuple]:
    return UNetSample(_sd_pipeline().unet.eval()), (torch.randn(2, 4, 16, 16), torch.tensor([10, 10]),
                                                    torch.randn(2, 77, 32))


def _sd_vae_decoder() -> tuple[torch.nn.Module, tuple]:
    return _sd_pipeline().vae.decoder.eval(), (torch.randn(1, 4, 16, 16),)


def _classifier(make: Callable[[], torch.nn.Module]) -> Callable[[], tuple[torch.nn.Module, tuple]]:
    return lambda: (Logits(make().eval()).eval(), (torch.randn(1, 3, 224, 224),))


def _models() -> dict[str, Callable[[], tuple[torch.nn.Module, tuple]]]:
    import transformers as T

    return {
        "sd_unet": _sd_unet,
        "sd_vae_decoder": _sd_vae_decoder,
        "resnet18": _classifier(lambda: bench_pipelines.ResNetClassifier().build()["model"]),
        "resnet50": _classifier(lambda: T.ResNetForImageClassification(T.ResNetConfig())),
        "mobilenet_v2": _classifier(lambda: T.MobileNetV2ForImageClassification(T.MobileNetV2Config())),
    }


def eager_in_turns(model: torch.nn.Module, args: tuple, rounds: int = 5, calls: int = 10) -> dict[str, float]:
    """Median ms a call of eager fp32 and of its bf16 copy, in ``rounds`` that take turns."""
    copy_bf16 = copy.deepcopy(model).to(torch.bfloat16)
    args_bf16 = tuple(a.to(torch.bfloat16) if a.is_floating_point() else a for a in args)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    with torch.no_grad():
        for _ in range(2):
            model(*args)
            copy_bf16(*args_bf16)
        for _ in range(rounds):
            for name, fn, inputs in (("fp32", model, args), ("bf16", copy_bf16, args_bf16)):
                start = time.perf_counter()
                for _ in range(calls):
                    fn(*inputs)
                times[name].append((time.perf_counter() - start) / calls * 1e3)
    return {name: sorted(values)[len(values) // 2] for name, values in times.items()}


def compiled(name: str, model: torch.nn.Module, args: tuple, workspace: Path) -> dict:
    """navdeploy's AOTInductor builds in fp32 and bf16, every one built and profiled (``thorough=True``)."""
    import navdeploy as nav

    wrapped = nav.Module(model, name=name)
    config = nav.OptimizeConfig(workspace=workspace, runners=("TorchCPU", "AOTInductorCPU"), thorough=True,
                                pipeline_repeats=0)
    start = time.perf_counter()
    with torch.no_grad():
        status = nav.optimize(lambda *a: wrapped(*a), [(args[0].shape[0], args)], config)
    seconds = time.perf_counter() - start
    records = status.modules[name].graphs[0].candidates
    return {"optimize_s": seconds, "p50_ms": {r.name: r.shown_p50_ms() for r in records},
            "status": {r.name: r.status for r in records}}


def _ratio(ms: dict, copy_name: str, own: str) -> float | None:
    return ms[copy_name] / ms[own] if ms.get(copy_name) and ms.get(own) else None


def rows(only: list[str], workspace: Path) -> Iterator[dict]:
    for name, make in _models().items():
        if only and name not in only:
            continue
        torch.manual_seed(0)
        model, args = make()
        eager = eager_in_turns(model, args)
        built = compiled(name, model, args, workspace / name)
        yield {"model": name, "eager_ms": eager, "eager_bf16_over_fp32": eager["bf16"] / eager["fp32"], **built,
               "aoti_bf16_over_fp32": _ratio(built["p50_ms"], "AOTInductorCPU[bf16]", "AOTInductorCPU")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON file to write")
    parser.add_argument("--only", nargs="*", default=[], help="models to measure (default: all)")
    args = parser.parse_args()
    from navdeploy.candidates.precision import cpu_computes_bf16

    if not cpu_computes_bf16():
        print("this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): navdeploy tries no bf16 copies here")
        return 1
    results = []
    with tempfile.TemporaryDirectory(prefix="bf16_copy_check_") as tmp:
        print(f"{'model':16s} {'eager fp32':>11s} {'eager bf16/fp32':>16s} {'AOTI bf16/fp32':>15s}")
        for row in rows(args.only, Path(tmp)):
            results.append(row)
            aoti = row["aoti_bf16_over_fp32"]
            print(f"{row['model']:16s} {row['eager_ms']['fp32']:9.2f}ms {row['eager_bf16_over_fp32']:16.2f} "
                  f"{aoti if aoti is None else format(aoti, '15.2f')}", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({
                "command": " ".join([Path(sys.executable).name, *sys.argv]),
                "machine": bench_pipelines.machine("cpu"),
                "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
