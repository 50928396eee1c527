"""The pipeline's own outputs, eager against optimized: what the user's callable returns, compared leaf by leaf.

Each module's runner is checked against eager on its own; errors that are within tolerance for one module can
still change what the pipeline returns (a greedy token, a label, a thresholded mask). So the callable is run over
the dataloader once eager and once optimized, with the same RNG seed (a pipeline that samples draws the same
numbers both ways), and what it returns is compared: integer, bool and string leaves exactly (uint8 images
quantised from floats within a rounding step or two), floating-point leaves within the loosest tolerance of the
runners in place. Leaves of types it cannot compare (a user's own class) are left out and counted.
"""

from __future__ import annotations

import cmath
import contextlib
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional

import torch

from navdeploy.candidates.verify import Comparison, compare

# Every compared pass starts from this seed (torch's CPU and CUDA generators), inside fork_rng: the user's
# generator state is what it was before the check.
_SEED = 20260
# At most this many leaves per pass are kept: a pipeline returning thousands of tensors per item is compared on
# its first ones.
_MAX_LEAVES = 4096


@dataclass(frozen=True)
class Tolerance:
    """How close floating-point leaves must be: torch.allclose's (atol, rtol); ``low``: a runner in place runs in
    reduced precision, so atol is relative to each output's largest magnitude (as the module check reads it)."""

    atol: float = 1e-4
    rtol: float = 1e-3
    low: bool = False


@dataclass
class OutputCheck:
    """The result. ``checked``: the outputs were compared (False: ``note`` says why not). ``ok``: every compared
    leaf matched; ``reason`` names the first that did not. ``leaves``: leaves compared; ``skipped``: leaves of types
    that cannot be compared; ``max_abs_err``: over floating-point leaves."""

    checked: bool = False
    ok: bool = True
    leaves: int = 0
    skipped: int = 0
    max_abs_err: float = 0.0
    reason: Optional[str] = None
    note: Optional[str] = None

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "OutputCheck":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class Leaves:
    """One pass's outputs as (path, value) leaves: tensors as CPU copies, arrays, numbers, strings, None."""

    items: list[tuple[str, Any]] = field(default_factory=list)
    skipped: int = 0


def _to_array(value: Any) -> Optional[Any]:
    """A numpy array for array-likes that are not tensors (numpy arrays, PIL images), else None."""
    try:
        import numpy as np
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return None
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("PIL.") and hasattr(value, "getbands"):
        return np.asarray(value)
    return None


def _walk(value: Any, path: str, out: Leaves, depth: int = 0) -> None:
    if len(out.items) >= _MAX_LEAVES or depth > 32:
        return
    if isinstance(value, torch.Tensor):
        out.items.append((path, value.detach().to("cpu", copy=True)))
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        out.items.append((path, value))
    elif (array := _to_array(value)) is not None:
        if array.dtype.kind in "biufc":
            out.items.append((path, torch.from_numpy(array.copy())))
        elif array.dtype.kind in "US":  # strings
            out.items.append((path, array.tolist()))
        else:  # objects: compared by identity, which would always differ
            out.skipped += 1
    elif isinstance(value, dict):  # HF ModelOutput and diffusers' BaseOutput are dicts too
        for k, v in value.items():
            _walk(v, f"{path}[{k!r}]", out, depth + 1)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _walk(v, f"{path}[{i}]", out, depth + 1)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            _walk(getattr(value, f.name), f"{path}.{f.name}", out, depth + 1)
    else:
        out.skipped += 1


def collect(func: Callable, samples: list[tuple[tuple, dict]]) -> Leaves:
    """Run ``func`` over the samples from the fixed seed and keep what it returns, as leaves."""
    out = Leaves()
    with seeded():
        for i, (args, kwargs) in enumerate(samples):
            _walk(func(*args, **kwargs), f"item {i}", out)
    return out


@contextlib.contextmanager
def seeded() -> Iterator[None]:
    """torch's generators from ``_SEED`` for the block, the caller's states restored afterwards."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() and torch.cuda.is_initialized() \
        else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(_SEED)
        yield


def _uint8_step(tol: Tolerance) -> int:
    """How many steps a uint8 leaf (an image quantised from floats) may differ by: one rounding step, more for
    reduced-precision runners (their tolerance times the 255 steps of the range)."""
    return max(1, math.ceil(255 * (tol.atol + tol.rtol))) if tol.low else 1


def _mismatch(path: str, e: Any, a: Any, tol: Tolerance, result: OutputCheck) -> Optional[str]:
    """Why leaf ``a`` differs from eager's ``e`` beyond what is allowed, else None."""
    if isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor):
        if tuple(e.shape) != tuple(a.shape):
            return f"{path}: shape {tuple(a.shape)}, eager {tuple(e.shape)}"
        if e.dtype != a.dtype:
            return f"{path}: dtype {a.dtype}, eager {e.dtype}"
        if e.dtype == torch.uint8:
            step = _uint8_step(tol)
            worst = int((a.int() - e.int()).abs().max()) if e.numel() else 0
            return None if worst <= step else f"{path}: uint8 values differ by up to {worst} (allowed {step})"
        if not (e.is_floating_point() or e.is_complex()):
            if torch.equal(e, a):
                return None
            differ = int((e != a).sum())
            return f"{path}: {differ} of {e.numel()} {str(e.dtype).removeprefix('torch.')} values differ from eager"
        comparison = compare([e], [a], tol.atol, tol.rtol, Comparison(), scale_atol=tol.low, where=f"{path}: ")
        result.max_abs_err = max(result.max_abs_err, comparison.max_abs_err)
        return comparison.reason
    if isinstance(e, (float, complex)) and isinstance(a, (float, complex)):
        if cmath.isnan(e) and cmath.isnan(a):
            return None
        result.max_abs_err = max(result.max_abs_err, abs(a - e))
        return None if abs(a - e) <= tol.atol + tol.rtol * abs(e) else f"{path}: {a!r}, eager {e!r}"
    if type(e) is not type(a):
        return f"{path}: a {type(a).__name__}, eager a {type(e).__name__}"
    return None if e == a else f"{path}: {a!r}, eager {e!r}"


def compare_leaves(expected: Leaves, actual: Leaves, tol: Tolerance) -> OutputCheck:
    """Every leaf of ``actual`` against ``expected`` (the same structure is expected: the paths must agree)."""
    result = OutputCheck(checked=True, skipped=expected.skipped)
    if [p for p, _ in expected.items] != [p for p, _ in actual.items]:
        gone = sorted({p for p, _ in expected.items} ^ {p for p, _ in actual.items})
        result.ok, result.reason = False, f"the outputs' structure differs from eager's (at {', '.join(gone[:3])})"
        return result
    for (path, e), (_, a) in zip(expected.items, actual.items):
        result.leaves += 1
        why = _mismatch(path, e, a, tol, result)
        if why is not None and result.ok:
            result.ok, result.reason = False, why
    if not expected.items:
        result.checked, result.note = False, (f"nothing to compare: the callable returns no tensors, arrays or "
                                              f"numbers ({expected.skipped} leaves of other types)")
    return result
