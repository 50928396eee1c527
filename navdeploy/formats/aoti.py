"""AOTInductor: the graph's shared ExportedProgram compiled ahead of time into a ``.pt2`` package with a shared
library. On CUDA it is tried only where a one-Linear package works (``inductor_probe.aoti_cuda_problem``)."""

import os

import torch

from navdeploy.formats.base import (
    BuildContext,
    Format,
    FormatSpec,
    LoadContext,
    RunFn,
    RunnerSpec,
    TritonMapping,
    as_list,
    canonical_strides,
)
from navdeploy.formats.exported_program import export_program
from navdeploy.formats.inductor_probe import aoti_cuda_problem, warm_cpu_isa


def _export(ctx: BuildContext) -> None:
    if ctx.device == "cpu":
        warm_cpu_isa()
    # The runtime input check (enabled at load) otherwise rejects size 1 on dims exported with min=1.
    torch._inductor.aoti_compile_and_package(export_program(ctx), package_path=str(ctx.path / "model.pt2"),
                                             inductor_configs={"aot_inductor.check_lowerbound": False})


def _load(ctx: LoadContext) -> RunFn:
    # Without this AOTInductor runs inputs of the wrong shape and reads out of bounds; with it, it raises
    # and navdeploy falls back to eager. Read by the AOTI runtime, so it must be set before loading.
    os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
    if ctx.device == "cpu":
        # Loading a CPU package runs Inductor's ISA probe; in the machine cache it takes ~1 s, in the module's
        # fresh inductor cache (the bind at the end of optimize) ~7 s.
        warm_cpu_isa()
    runner = torch._inductor.aoti_load_package(str(ctx.artifact))
    # The check above compares every stride, also of size-1 axes, which a live call may carry from a view (a
    # decoder's K/V cache after one token) where the captured samples, cloned, did not.
    return lambda inputs: as_list(runner(*[canonical_strides(t) for t in inputs]))


FORMAT = FormatSpec(Format.TORCH_AOTI, artifact="model.pt2", export=_export,
                    triton=TritonMapping("pytorch", "torch_aoti", io_names="INPUT__N", python_preference=3))
RUNNERS = [
    # Built first: it won 4 of 7 real CPU modules (benchmarks/results/pipelines_cpu.json).
    RunnerSpec("AOTInductorCPU", Format.TORCH_AOTI, "cpu", _load, search_rank=10, prepare_loading=warm_cpu_isa),
    RunnerSpec("AOTInductorCUDA", Format.TORCH_AOTI, "cuda", _load, search_rank=20, is_available=aoti_cuda_problem),
]
