"""AOTInductor: the graph's shared ExportedProgram compiled ahead of time into a ``.pt2`` package with a shared
library. On CUDA it is tried only where a one-Linear package works (``inductor_probe.aoti_cuda_problem``)."""

import contextlib
import logging
import os

import torch

from navdeploy.formats.aoti_compile import wrapper_beside_kernels
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
from navdeploy.formats.matmuls import mostly_wide_matmuls
from navdeploy.formats.package_folder import extracting_in_worker_folder

log = logging.getLogger("navdeploy")


# Inductor's freezing folds the weights into the graph as constants and prepacks them for oneDNN. On the 2-core CPU
# that made fp32 calls 12-61% faster where the matmuls are at least this wide (the bench's ViT, 192 wide; BERT
# encoders 256 to 768 wide, MiniLM's shape at 384: 5.4 -> 3.0 ms a call at batch 1; a GPT-2 256 wide), but 37% slower
# at 128 wide (a small BERT at batch 1) and 2x slower on the SD text encoder, 32 wide; the small SD UNet (convolutions,
# 32-64 wide) was within 4% (benchmarks/aoti_freezing_check.py, benchmarks/results/aoti_freezing_cpu.json). The
# width sits between the widest that lost (128) and the narrowest that won (192). In bf16 every matmul and
# convolution runs in oneDNN either way, and prepacking made every module measured faster, 128-wide BERT and the SD
# text encoder included (0.59-0.91 of the plain build; aoti_freezing_cpu_bf16.json), so bf16 builds always freeze.
FREEZE_MIN_WIDTH = 192

# The wrapper (AOTInductor's runtime and the code that calls the kernels; the kernels themselves build at -O3) is
# g++'s longest step of a CPU build, and most of it is optimizing the runtime's inline code. At -Og instead of
# torch's -O1 its g++ step takes 0.5-0.9 s less (example CNN 4.65/4.84 -> 4.19/3.93 s, a small BERT 4.99/5.10 ->
# 4.23/4.38 s) and calls take as long (230.3 against 231.7 us, 429.9 against 430.0 us: medians of ten alternating
# rounds; benchmarks/aoti_wrapper_opt_check.py, results/aoti_wrapper_opt_cpu.json). -Og keeps torch's precompiled
# header valid (-O0 would not: it undefines __OPTIMIZE__). A level the user set in the environment is kept.
CPU_WRAPPER_OPT_LEVEL = "Og"
_WRAPPER_OPT_ENV = "AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL"


def freezes(module: torch.nn.Module, precision: str = "fp32") -> bool:
    """Whether the CPU build of ``module`` (already cast to ``precision``) freezes its weights: always in bf16,
    otherwise where most matmul weights are at least ``FREEZE_MIN_WIDTH`` wide (``mostly_wide_matmuls``)."""
    return precision == "bf16" or mostly_wide_matmuls(module, FREEZE_MIN_WIDTH)


def _has_wrapper_opt_level() -> bool:
    """Whether this torch has the wrapper's optimization level as a config (torch 2.8 on; an unknown key raises)."""
    return hasattr(torch._inductor.config.aot_inductor, "compile_wrapper_opt_level")


def _export(ctx: BuildContext) -> None:
    # The runtime input check (enabled at load) otherwise rejects size 1 on dims exported with min=1.
    configs = {"aot_inductor.check_lowerbound": False}
    if ctx.device == "cpu":
        warm_cpu_isa()
        configs["freezing"] = freezes(ctx.module, ctx.precision)
        if _WRAPPER_OPT_ENV not in os.environ and _has_wrapper_opt_level():
            configs["aot_inductor.compile_wrapper_opt_level"] = CPU_WRAPPER_OPT_LEVEL
        if configs["freezing"]:
            log.info("AOTInductor freezes the weights (constants prepacked for oneDNN): %s",
                     "a bf16 build" if ctx.precision == "bf16"
                     else f"most matmul weights are at least {FREEZE_MIN_WIDTH} wide")
    program = export_program(ctx)
    with wrapper_beside_kernels(ctx.compiling) if ctx.device == "cpu" else contextlib.nullcontext():
        torch._inductor.aoti_compile_and_package(program, package_path=str(ctx.path / "model.pt2"),
                                                 inductor_configs=configs)


def _load(ctx: LoadContext) -> RunFn:
    # Without this AOTInductor runs inputs of the wrong shape and reads out of bounds; with it, it raises
    # and navdeploy falls back to eager. Read by the AOTI runtime, so it must be set before loading.
    os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")
    if ctx.device == "cpu":
        # Loading a CPU package runs Inductor's ISA probe; in the machine cache it takes ~1 s, in the module's
        # fresh inductor cache (the bind at the end of optimize) ~7 s.
        warm_cpu_isa()
    with extracting_in_worker_folder():
        runner = torch._inductor.aoti_load_package(str(ctx.artifact))
    # The check above compares every stride, also of size-1 axes, which a live call may carry from a view (a
    # decoder's K/V cache after one token) where the captured samples, cloned, did not.
    boxed_run = getattr(getattr(runner, "loader", None), "boxed_run", None)
    if boxed_run is not None:
        # The package's flat entry point: the graph takes and returns flat tensors, so the pytree specs the
        # package's __call__ parses and applies on every call (~18 us of a 0.15 ms CNN call) change nothing.
        return lambda inputs: boxed_run([canonical_strides(t) for t in inputs])
    return lambda inputs: as_list(runner(*[canonical_strides(t) for t in inputs]))


FORMAT = FormatSpec(Format.TORCH_AOTI, artifact="model.pt2", export=_export,
                    triton=TritonMapping("pytorch", "torch_aoti", io_names="INPUT__N", python_preference=3))
RUNNERS = [
    # Built first: it won 4 of 7 real CPU modules (benchmarks/results/pipelines_cpu.json).
    RunnerSpec("AOTInductorCPU", Format.TORCH_AOTI, "cpu", _load, search_rank=10, prepare_loading=warm_cpu_isa,
               prepacks=freezes),
    RunnerSpec("AOTInductorCUDA", Format.TORCH_AOTI, "cuda", _load, search_rank=20, is_available=aoti_cuda_problem),
]
