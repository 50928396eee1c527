"""torch.compile (inductor) of the eager module, in several modes. Nothing is written: compiled graphs land
in the inductor cache, which navdeploy points into the workspace so reloads compile from cache."""

import itertools
import logging
from typing import Any, Callable, Optional

import torch

from navdeploy.candidates.precision import copy_module
from navdeploy.formats.base import (
    Format,
    LoadContext,
    RunFn,
    RunnerSpec,
    RunnerTriton,
    as_list,
    canonical_strides,
)
from navdeploy.formats.inductor_probe import warm_cpu_isa

log = logging.getLogger("navdeploy")


def channels_last_copy(module: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module whose 2-D convolution weights are channels-last, or the module itself when it has no
    2-D convolutions or cannot be copied.

    Inductor picks channels-last for convolutions only when their shapes are static (its layout optimization is
    off under symbolic shapes, pytorch#102670), and the batch axis becomes symbolic once a second batch size is
    seen. Channels-last weights make cuDNN run the convolutions in NHWC, which tensor cores need: on the H100
    ResNet-50 fp16 batch 32 under CUDA graphs takes 1.6 ms with them, 5.2 ms without
    (benchmarks/results/cnn_layout_check_h100.json).
    A copy, because the user's module stays the eager reference (its forward hooks stay the user's objects);
    only conv weights change layout, as other 4-D tensors may be viewed in ways channels-last strides do not
    allow."""
    if not any(isinstance(m, torch.nn.Conv2d) for m in module.modules()):
        return module
    try:
        copied = copy_module(module)
    except Exception as exc:  # noqa: BLE001 - it holds something uncopyable (a lock, a handle): compile it as it is
        log.info("compiling the module in its own layout: it cannot be copied to channels-last (%s)", exc)
        return module
    for conv in copied.modules():
        if isinstance(conv, torch.nn.Conv2d):
            conv.weight.data = conv.weight.data.contiguous(memory_format=torch.channels_last)
    return copied


def compile_target(ctx: LoadContext) -> tuple[torch.nn.Module, Optional[bool]]:
    """The module to compile and torch.compile's ``dynamic`` for one runner.

    CUDA, fp16/bf16: a channels-last copy of conv modules. Not fp32: fp32 convolutions run TF32 in cuDNN by
    default, and an NHWC algorithm rounds differently (3e-4 on a small CNN on the H100), past the fp32 tolerance.
    CPU: one compile with every axis dynamic instead of a recompile per profiled batch size. CUDA: torch's
    automatic dynamic shapes (a static first compile; a recompile makes only the axes that changed symbolic): a
    compile with every axis symbolic takes over 150 s on a small diffusion UNet and gives slower kernels."""
    if ctx.device == "cpu":
        varies = ctx.graph.batching or any(t.dynamic_axes for t in ctx.graph.inputs)
        return ctx.module, (True if varies else None)
    half = ctx.precision in ("fp16", "bf16")
    return (channels_last_copy(ctx.module) if half else ctx.module), None


def own_frame(module: torch.nn.Module) -> Callable[..., Any]:
    """``module``'s call as a function with a code object of its own, to give to torch.compile.

    Dynamo keeps compiled code and the recompile count per code object, and automatic-dynamic state per
    (file, line, *name*). Compiling modules directly shares ``FlatModule.forward`` between every candidate, graph
    and module of a process, and its 8 recompiles (``recompile_limit``) run out: the 9th different module runs
    uncompiled, with only a warning (a benchmark binding every candidate of three models gets there). A copy
    under the same name still shares the shape history: a new module whose first call comes after another's
    second compiles with every axis symbolic (slow kernels; a compile past 150 s for a diffusion UNet). The name
    takes no part in Inductor's cache key, so compiled graphs are still found across processes."""

    def call(*tensors: torch.Tensor) -> Any:
        return module(*tensors)

    call.__code__ = call.__code__.replace(co_name=f"navdeploy_compiled_{next(_FRAMES)}")  # its own code and name
    return call


_FRAMES = itertools.count()


def _eager_layout(t: torch.Tensor) -> torch.Tensor:
    """A channels-last output (from a channels-last copy) in the contiguous layout eager gives, so that code
    calling ``.view()`` on it keeps working; any other tensor as it is."""
    if t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last):
        return t.contiguous()
    return t


def _loader(mode: str):
    def load(ctx: LoadContext) -> RunFn:
        if ctx.device == "cpu":
            warm_cpu_isa()  # before the first call compiles
        module, dynamic = compile_target(ctx)
        compiled = torch.compile(own_frame(module), mode=None if mode == "default" else mode, dynamic=dynamic)
        relayout = module is not ctx.module

        def call(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            # Dynamo guards on every stride, also of size-1 axes, which a live call may carry from a view (a
            # decoder's one-token K/V cache) where the samples it was warmed up with did not: a recompile.
            return as_list(compiled(*[canonical_strides(t) for t in inputs]))

        if mode != "reduce-overhead":
            if not relayout:
                return call
            return lambda inputs: [_eager_layout(t) for t in call(inputs)]

        def hand_out(t: torch.Tensor) -> torch.Tensor:
            # CUDA graphs replay into static buffers that the next replay overwrites: hand out copies.
            relaid = _eager_layout(t) if relayout else t
            return relaid if relaid is not t else t.clone()  # a relayout is a copy already

        def run_graphs(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            torch.compiler.cudagraph_mark_step_begin()
            return [hand_out(t) for t in call(inputs)]

        return run_graphs

    return load


RUNNERS = [
    # AOTInductor's kernels behind a Python wrapper and guards: built when AOTInductor did not verify. On CUDA also
    # TorchCompileCUDAGraphs' kernels without the graph replay, which only removes launch overhead: built when
    # neither verified (each is a full compile, minutes for a diffusion UNet).
    RunnerSpec("TorchCompileCPU", Format.TORCH, "cpu", _loader("default"), search_rank=60,
               twin_of=("AOTInductorCPU",), prepare_loading=warm_cpu_isa),
    RunnerSpec("TorchCompileCUDA", Format.TORCH, "cuda", _loader("default"), search_rank=60,
               twin_of=("TorchCompileCUDAGraphs", "AOTInductorCUDA")),
    # It benchmarks kernel choices on the GPU while it compiles, so it builds alone. Opt-in: on ResNet-50 fp16 it
    # does not finish within 280 s on the H200 (benchmarks/results/gpu_h200_autotune.json), time the defaults
    # would spend per precision while every other build waits.
    RunnerSpec("TorchCompileCUDAMaxAutotune", Format.TORCH, "cuda", _loader("max-autotune-no-cudagraphs"),
               builds_alone=True, by_default=False, search_rank=70),
    # Built first on CUDA: it won every module of the GPU benchmarks (benchmarks/results/README.md).
    RunnerSpec("TorchCompileCUDAGraphs", Format.TORCH, "cuda", _loader("reduce-overhead"),
               triton=RunnerTriton(cuda_graphs=True), search_rank=10),
]
