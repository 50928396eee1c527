"""Candidate precisions: which ones a module gets, and how a module and its inputs are cast for one."""

from __future__ import annotations

import copy
from typing import Optional, Sequence

import torch

CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def candidate_precisions(module_precision: str, device: str, requested: Optional[Sequence[str]]) -> tuple[str, ...]:
    """The user's list, else: an fp32 module on CUDA is tried in fp32 and fp16 (as the reference text says for
    TensorRT); any other module only in its own precision (an int8 module stays int8)."""
    if requested:
        return tuple(requested)
    if module_precision == "fp32" and device == "cuda":
        return ("fp32", "fp16")
    return (module_precision,)


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
