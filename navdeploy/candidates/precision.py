"""Candidate precisions: which ones a module gets, and how a module and its inputs are cast for one."""

from __future__ import annotations

import copy
import functools
from typing import Optional, Sequence

import torch

from navdeploy.formats.base import RunnerSpec
from navdeploy.formats.matmuls import mostly_matmuls, mostly_wide_matmuls

CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def candidate_precisions(module_precision: str, device: str, requested: Optional[Sequence[str]]) -> tuple[str, ...]:
    """The user's list, else: an fp32 module on CUDA is tried in fp32 and fp16 (as the reference text says for
    TensorRT); any other module only in its own precision (an int8 module stays int8)."""
    if requested:
        return tuple(requested)
    if module_precision == "fp32" and device == "cuda":
        return ("fp32", "fp16")
    return (module_precision,)


# bf16 pays where the matmuls are compute-bound. On the 2-core CPU machine, frozen bf16 AOTInductor builds against the
# best fp32 build (aoti_freezing_cpu.json, aoti_freezing_cpu_bf16.json): BERT 128 wide 1.20x slower at 1x12 tokens
# (0.47 ms fp32) but 0.74 at 8x20 (1.9 ms); 256 wide and wider 0.50-0.74 at every shape, also at 0.4-0.7 ms a call
# (BERT 256, a GPT-2 256 wide); the SD text encoder (32 wide, 0.15 ms) 3.4x slower. So the copies are tried for a
# graph whose best build takes FOLLOW_UP_MIN_MS or more a call, or whose matmuls are mostly FOLLOW_UP_WIDE wide.
FOLLOW_UP_MIN_MS = 1.0
FOLLOW_UP_WIDE = 192


def follow_up_min_ms(module: torch.nn.Module) -> float:
    """How slow a graph's best build must be for the follow-up precisions to be tried on ``module``: 0 where most
    of its matmul weights are ``FOLLOW_UP_WIDE`` wide or wider, else ``FOLLOW_UP_MIN_MS``."""
    return 0.0 if mostly_wide_matmuls(module, FOLLOW_UP_WIDE) else FOLLOW_UP_MIN_MS


# Eager's own call time from which the follow-up copies are tried beside the module's own candidates, before any
# build says how fast the best one is: FOLLOW_UP_MIN_MS times this factor. CPU builds ran 2.2-3.9x faster than eager
# on the bench's graphs, so the guess that the best build will take FOLLOW_UP_MIN_MS or more is sometimes wrong, and
# then costs time: on the bench's GPT-2 with its cache (eager 2.44 ms, the best fp32 build 0.57-0.78 ms) the copies
# built beside took the optimize from 43 to 58 s. They also won there (AOTInductor bf16 0.71 against fp32 0.78 ms at
# batch 2), as on the GPT-2 without cache (0.57 against 0.64; ONNX Runtime, which the search picked without the
# copies, 0.81), so a wrong guess is not wasted; where right, on the BERT (eager 2.80 ms, best 1.27), it saved 6 s.
EARLY_FOLLOW_UP_FACTOR = 2.0


def follow_ups_early(eager_ms: Optional[float], min_ms: float) -> bool:
    """Whether the follow-up copies of a graph are known to be tried before any other build is measured: always
    where its matmuls are wide (``min_ms`` 0), else when eager takes ``EARLY_FOLLOW_UP_FACTOR`` x ``min_ms`` or more
    a call (``eager_ms``)."""
    return min_ms == 0 or (eager_ms is not None and eager_ms >= EARLY_FOLLOW_UP_FACTOR * min_ms)


def follow_up_precisions(module_precision: str, device: str, requested: Optional[Sequence[str]]) -> tuple[str, ...]:
    """Precisions the search tries after the module's own one, for graphs whose best build is still slow or whose
    matmuls are wide (``follow_up_min_ms``): bf16 for an fp32 module on a CPU that computes bf16
    (``cpu_computes_bf16``), unless the user named the precisions (``OptimizeConfig(precisions=("fp32",))`` keeps
    fp32 only)."""
    if requested or device != "cpu" or module_precision != "fp32" or not cpu_computes_bf16():
        return ()
    return ("bf16",)


def eager_copy_predicts(runner: RunnerSpec, module: torch.nn.Module, precision: str) -> bool:
    """Whether eager's copy of ``module`` in a follow-up ``precision`` predicts ``runner``'s copy there (the search
    skips the copies when eager's is clearly slower: ``search.low_precision_skip_reason``). Not for a build that
    prepacks the matmul weights (``RunnerSpec.prepacks``: a frozen AOTInductor build) of a module that is mostly
    matmuls: eager's bf16 linear layers reorder their weights into oneDNN's layout on every call, a frozen build once.
    On the bench's BERT (128 wide, 4x32 tokens) eager bf16 read 3-11% slower than eager fp32 while the frozen
    AOTInductor bf16 build was 21% faster than AOTInductor fp32; on the SD UNet (convolutions) eager's copy did
    predict the compiled ones."""
    prepacks = runner.prepacks is not None and runner.prepacks(module, precision)
    return not (prepacks and mostly_matmuls(module))


@functools.cache
def cpu_computes_bf16() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX): oneDNN's bf16 matmuls then run ~2.8x the fp32
    rate (512x768 @ 768x3072 on 2 Zen 4 cores: 383 against 137 GFLOP/s). Elsewhere bf16 is emulated."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    try:
        return any(check() for check in checks if check is not None)
    except RuntimeError:  # a torch build without these probes
        return False


def eager_rounds_to_tf32(module: torch.nn.Module, device: str) -> bool:
    """Whether eager "fp32" on this device already rounds to TF32: cuDNN convolutions do by default
    (``torch.backends.cudnn.allow_tf32``), matmuls when the float32 matmul precision is not "highest". Two
    correct fp32 builds of such a module then differ by TF32 rounding (2.6e-4 on a two-conv CNN on the H200,
    torch.compile against eager), so they are checked with the tf32 tolerance. Set ``allow_tf32 = False`` for a
    strict fp32 check."""
    if device != "cuda":
        return False
    has_conv = any(isinstance(m, torch.nn.modules.conv._ConvNd) for m in module.modules())
    return (has_conv and torch.backends.cudnn.allow_tf32) or torch.get_float32_matmul_precision() != "highest"


def tolerance_precision(precision: str, module: torch.nn.Module, device: str) -> str:
    """The precision whose tolerance a candidate of ``precision`` is checked with (see eager_rounds_to_tf32)."""
    return "tf32" if precision == "fp32" and eager_rounds_to_tf32(module, device) else precision


def candidate_name(runner: str, precision: str, module_precision: str) -> str:
    """``runner`` in the module's own precision, ``runner[fp16]`` in another."""
    return runner if precision == module_precision else f"{runner}[{precision}]"


def needs_cast(precision: str, module_precision: str) -> bool:
    """Whether a candidate runs a float-cast copy of the module (int8 modules are never re-cast)."""
    return precision != module_precision and precision in CAST_DTYPES and module_precision != "int8"


def copy_module(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy of the module whose forward hooks are the user's own objects, not copies: a hook that is a
    bound method or a callable object (a feature extractor, say) keeps filling the user's state when the copy
    runs. Plain functions are shared by deepcopy anyway."""
    memo = {id(hook): hook for m in module.modules() for hooks in (m._forward_hooks, m._forward_pre_hooks)
            for hook in hooks.values()}
    return copy.deepcopy(module, memo)


def cast_module(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    """A copy of the module with floating-point weights in ``precision``; the user's module is left alone."""
    return copy_module(module).to(CAST_DTYPES[precision])


def cast_inputs(inputs: list[torch.Tensor], precision: str) -> list[torch.Tensor]:
    """Floating-point inputs in ``precision``; integer and bool inputs unchanged."""
    dtype = CAST_DTYPES[precision]
    return [t.to(dtype) if t.is_floating_point() else t for t in inputs]
