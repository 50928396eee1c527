"""torch.compile (inductor) of the eager module, in several modes. Nothing is written: compiled graphs land
in the inductor cache, which navdeploy points into the workspace so reloads compile from cache."""

import copy
import logging

import torch

from navdeploy.config import Format
from navdeploy.formats.base import LoadContext, RunFn, RunnerSpec, as_list

log = logging.getLogger("navdeploy")


def channels_last_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module with channels-last weights when it has 2-D convolutions, else the module itself.

    Inductor picks channels-last for convolutions only when shapes are static (its layout optimization is off
    under dynamic shapes, pytorch#102670), and navdeploy compiles batching graphs dynamically. Channels-last
    weights make cuDNN run the convolutions in NHWC, which tensor cores need: on the H100 ResNet-50 fp16 batch 32
    went from 5.2 to 1.6 ms under CUDA graphs (benchmarks/results/cnn_layout_check_h100.json). A copy, because
    the user's module stays the eager reference."""
    if not any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
        return module
    try:
        copied = copy.deepcopy(module)
    except Exception as exc:  # noqa: BLE001 - it holds something uncopyable (a lock, a handle): compile it as it is
        log.info("compiling the module in its own layout: it cannot be copied to channels-last (%s)", exc)
        return module
    return copied.to(memory_format=torch.channels_last)


def _loader(mode: str):
    def load(ctx: LoadContext) -> RunFn:
        # Half precisions only: fp32 convolutions run TF32 in cuDNN by default, and an NHWC algorithm rounds
        # differently (3e-4 on a small CNN on the H100), past the fp32 tolerance.
        half = ctx.precision in ("fp16", "bf16")
        module = channels_last_copy(ctx.module) if ctx.device == "cuda" and half else ctx.module
        # Outputs of a channels-last module are channels-last too: hand them out in the eager layout (contiguous),
        # so that code calling .view() on them keeps working.
        layout = torch.contiguous_format if module is not ctx.module else torch.preserve_format
        # CPU: one dynamic compile instead of a recompile per profiled batch size. CUDA: torch's automatic dynamic
        # shapes (a static first compile; a recompile makes only the axes that changed symbolic), because a compile
        # with every axis symbolic ran past 150 s on a small diffusion UNet and gives slower kernels.
        varies = ctx.graph.batching or any(t.dynamic_axes for t in ctx.graph.inputs)
        dynamic = True if varies and ctx.device == "cpu" else None
        compiled = torch.compile(module, mode=None if mode == "default" else mode, dynamic=dynamic)
        if mode != "reduce-overhead":
            if layout is torch.preserve_format:
                return lambda inputs: as_list(compiled(*inputs))
            return lambda inputs: [t.contiguous() for t in as_list(compiled(*inputs))]

        def run_graphs(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            # CUDA graphs replay into static buffers that the next replay overwrites: hand out copies.
            torch.compiler.cudagraph_mark_step_begin()
            return [t.clone(memory_format=layout) for t in as_list(compiled(*inputs))]

        return run_graphs

    return load


RUNNERS = [
    RunnerSpec("TorchCompileCPU", Format.TORCH, "cpu", _loader("default")),
    RunnerSpec("TorchCompileCUDA", Format.TORCH, "cuda", _loader("default")),
    RunnerSpec("TorchCompileCUDAMaxAutotune", Format.TORCH, "cuda", _loader("max-autotune-no-cudagraphs")),
    RunnerSpec("TorchCompileCUDAGraphs", Format.TORCH, "cuda", _loader("reduce-overhead")),
]
