"""Correctness of a candidate: its outputs against the eager reference, sample by sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch

from navdeploy.capture.graph import TensorSpec


@dataclass
class Comparison:
    """The worst error seen over every output of every sample, and whether it is within tolerance."""

    ok: bool = True
    max_abs_err: float = 0.0
    max_rel_err: float = 0.0
    reason: Optional[str] = None

    def fail(self, reason: str) -> None:
        if self.ok:
            self.ok, self.reason = False, reason


def conform(outputs: list[torch.Tensor], specs: list[TensorSpec]) -> list[torch.Tensor]:
    """Runner outputs cast to the dtype and device eager returned (no-op when they already match)."""
    result = []
    for t, spec in zip(outputs, specs):
        if str(t.dtype).removeprefix("torch.") != spec.dtype or t.device.type != torch.device(spec.device).type:
            t = t.to(device=spec.device, dtype=spec.torch_dtype)
        result.append(t)
    return result


LOW_PRECISIONS = ("fp16", "bf16", "int8")


# atol for an output whose every value is smaller than atol: this fraction of its largest magnitude (a wrong
# output, zeros say, is off by about that magnitude; fp32 reorderings by ~1e-6 of it, fp16/bf16 by ~1e-3-1e-2).
_SMALL_OUTPUT_FP32 = 1e-2
_SMALL_OUTPUT_LOW_PRECISION = 1e-1


def compare(expected: list[torch.Tensor], actual: list[torch.Tensor], atol: float, rtol: float,
            result: Comparison, verify_func: Optional[Callable] = None, where: str = "",
            scale_atol: bool = False) -> Comparison:
    """Fold one sample's comparison into ``result`` (torch.allclose semantics: |a-e| <= atol + rtol*|e|).

    With ``scale_atol`` (low-precision candidates) atol is relative to the output's largest magnitude: an fp16
    value of 60 is only representable to 0.03, so a fixed atol would reject every correct fp16 kernel."""
    if len(expected) != len(actual):
        result.fail(f"{where}returned {len(actual)} outputs, eager returned {len(expected)}")
        return result
    for i, (e, a) in enumerate(zip(expected, actual)):
        if tuple(e.shape) != tuple(a.shape):
            result.fail(f"{where}output {i}: shape {tuple(a.shape)} differs from eager {tuple(e.shape)}")
            continue
        if e.numel() == 0:
            continue
        e64, a64 = e.detach().to("cpu", torch.float64), a.detach().to("cpu", torch.float64)
        if not torch.isfinite(a64).all() and not torch.equal(torch.isfinite(a64), torch.isfinite(e64)):
            result.fail(f"{where}output {i}: non-finite values where eager has finite ones")
        diff = (a64 - e64).abs().nan_to_num(0.0)
        abs_err = float(diff.max())
        rel_err = float((diff / e64.abs().clamp_min(1e-12)).nan_to_num(0.0).max())
        result.max_abs_err = max(result.max_abs_err, abs_err)
        result.max_rel_err = max(result.max_rel_err, rel_err)
        magnitude = e64.abs().nan_to_num(0.0)
        largest = float(magnitude.max())
        eff_atol = atol * max(1.0, largest) if scale_atol else atol
        scaled = ""
        if 0.0 < largest < eff_atol:
            # Every value is below atol (a randomly initialised model's logits can be ~1e-5): atol alone would pass
            # any output, zeros included, so it is taken relative to the output's largest magnitude instead.
            eff_atol = largest * (_SMALL_OUTPUT_LOW_PRECISION if scale_atol else _SMALL_OUTPUT_FP32)
            scaled = f" (atol scaled to the output's largest magnitude {largest:.3g}: every value is below atol)"
        if bool((diff > eff_atol + rtol * magnitude).any()):
            result.fail(f"{where}output {i}: max abs error {abs_err:.3g} exceeds atol={eff_atol:.3g} + "
                        f"rtol={rtol:g}*|eager|{scaled}")
    if verify_func is not None and result.ok and not verify_func(expected, actual):
        result.fail(f"{where}verify_func returned False")
    return result
