"""The pipeline's own outputs, eager against optimized: what the user's callable returns, compared leaf by leaf.

Each module's runner is checked against eager on its own; errors that are within tolerance for one module can
still change what the pipeline returns (a greedy token, a label, a thresholded mask). So the callable is run over
the dataloader once eager and once optimized, with the same RNG seed (a pipeline that samples draws the same
numbers both ways; so do Python's and numpy's global generators, and the samples' own ``torch.Generator``s are
rewound), and what it returns is compared: integer, bool and string leaves exactly (in a leaf of 10,000 values or
more, a mask or a map, 0.1% may differ: near-ties), uint8 images within the tolerance's share of the 255 steps (at
least one), floating-point leaves within the loosest tolerance of the runners in place. Leaves of types it cannot
compare (a user's own class) are left out and counted.
"""

from __future__ import annotations

import cmath
import contextlib
import dataclasses
import math
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from navdeploy.candidates.verify import Comparison, compare
from navdeploy.config import DEFAULT_TOLERANCES

# Every compared pass starts from this seed (torch's CPU and CUDA generators, Python's and numpy's); the user's
# generator states are restored afterwards (``seeded``).
_SEED = 20260
# At most this many leaves per pass are kept: a pipeline returning thousands of tensors per item is compared on
# its first ones.
_MAX_LEAVES = 4096


@dataclass(frozen=True)
class Tolerance:
    """How close floating-point leaves must be: torch.allclose's (atol, rtol); ``low``: a runner in place runs in
    reduced precision, so atol is relative to each output's largest magnitude (as the module check reads it)."""

    atol: float = DEFAULT_TOLERANCES["fp32"][0]
    rtol: float = DEFAULT_TOLERANCES["fp32"][1]
    low: bool = False

    @staticmethod
    def loosest(tolerances: Iterable["Tolerance"]) -> "Tolerance":
        """The largest atol and rtol of ``tolerances``, low when any is (fp32's when there are none)."""
        tols = list(tolerances) or [Tolerance()]
        return Tolerance(max(t.atol for t in tols), max(t.rtol for t in tols), any(t.low for t in tols))


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
    np = _numpy()
    if np is None:
        return None
    if isinstance(value, np.ndarray):
        return value
    if type(value).__module__.startswith("PIL.") and hasattr(value, "getbands"):
        return np.asarray(value)
    return None


def _array_leaf(array: Any) -> Optional[Any]:
    """A numpy array as a leaf: numbers as a tensor (native byte order), strings as a list; None for what cannot be
    compared (objects compare by identity, so they would always differ; dtypes torch cannot hold)."""
    if array.dtype.kind in "US":
        return array.tolist()
    if array.dtype.kind not in "biufc":
        return None
    try:
        return torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=True))
    except TypeError:  # float128 and the like
        return None


def _walk(value: Any, path: str, out: Leaves, depth: int = 0) -> None:
    if len(out.items) >= _MAX_LEAVES or depth > 32:
        return
    if isinstance(value, torch.Tensor):
        out.items.append((path, value.detach().to("cpu", copy=True)))
    elif value is None or isinstance(value, (bool, int, float, complex, str, bytes)):
        out.items.append((path, value))
    elif type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "shape", None) == ():
        out.items.append((path, value.item()))  # a numpy scalar (np.float32, np.int64, np.bool_)
    elif (array := _to_array(value)) is not None:
        leaf = _array_leaf(array)
        if leaf is None:
            out.skipped += 1
        else:
            out.items.append((path, leaf))
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


class SampleGenerators:
    """The ``torch.Generator`` objects the samples carry (a diffusers call's ``generator=``), with their states when
    found: every compared pass starts them from there, as each pass would otherwise draw further along."""

    def __init__(self, samples: list[tuple[tuple, dict]]) -> None:
        found: dict[int, torch.Generator] = {}

        def find(value: Any, depth: int) -> None:
            if isinstance(value, torch.Generator):
                found[id(value)] = value
            elif depth < 3 and isinstance(value, (list, tuple)):
                for v in value:
                    find(v, depth + 1)
            elif depth < 3 and isinstance(value, dict):
                for v in value.values():
                    find(v, depth + 1)

        for args, kwargs in samples:
            find(args, 0)
            find(kwargs, 0)
        self.states = [(g, g.get_state()) for g in found.values()]

    def rewind(self) -> None:
        for generator, state in self.states:
            generator.set_state(state)


def collect(func: Callable, samples: list[tuple[tuple, dict]], generators: Optional[SampleGenerators] = None) -> Leaves:
    """Run ``func`` over the samples from the fixed seed (and the samples' generators rewound) and keep what it
    returns, as leaves."""
    out = Leaves()
    with seeded():
        if generators is not None:
            generators.rewind()
        for i, (args, kwargs) in enumerate(samples):
            _walk(func(*args, **kwargs), f"item {i}", out)
    return out


@contextlib.contextmanager
def seeded() -> Iterator[None]:
    """torch's CPU generator (and CUDA's, once initialised), Python's ``random`` and numpy's global generator from
    ``_SEED`` for the block; the caller's states are restored afterwards. Only the generators restored are seeded."""
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    devices = list(range(torch.cuda.device_count())) if cuda else []
    python_state = random.getstate()
    np = _numpy()
    numpy_state = np.random.get_state() if np is not None else None
    try:
        with torch.random.fork_rng(devices=devices):
            torch.default_generator.manual_seed(_SEED)
            if cuda:
                torch.cuda.manual_seed_all(_SEED)
            random.seed(_SEED)
            if np is not None:
                np.random.seed(_SEED)
            yield
    finally:
        random.setstate(python_state)
        if np is not None:
            np.random.set_state(numpy_state)


def _numpy() -> Optional[Any]:
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy comes with torch's usual installs
        return None
    return numpy


def _uint8_step(tol: Tolerance) -> int:
    """How many steps a uint8 leaf (an image quantised from floats) may differ by: the tolerance times the 255
    steps of the range, at least one rounding step."""
    return max(1, math.ceil(255 * (tol.atol + tol.rtol)))


# In an integer, bool or uint8 leaf this large (a mask, a segmentation map, an image) this share of its values may
# differ: a near-tie flips with kernels that only reorder sums. A smaller leaf (tokens, labels) must be exact.
_MAP_ELEMENTS = 10_000
_MAP_SHARE = 1e-3


def _discrete(path: str, e: torch.Tensor, a: torch.Tensor, bad: torch.Tensor, what: str) -> Optional[str]:
    """Why a discrete leaf differs beyond what is allowed (``bad``: the values that differ too much), else None."""
    count = int(bad.sum())
    allowed = int(e.numel() * _MAP_SHARE) if e.numel() >= _MAP_ELEMENTS else 0
    if count <= allowed:
        return None
    share = f" (allowed {allowed}: {_MAP_SHARE:.1%} of a leaf this large)" if allowed else ""
    return f"{path}: {count} of {e.numel()} {str(e.dtype).removeprefix('torch.')} values {what}{share}"


def _mismatch(path: str, e: Any, a: Any, tol: Tolerance, result: OutputCheck) -> Optional[str]:
    """Why leaf ``a`` differs from eager's ``e`` beyond what is allowed, else None."""
    if isinstance(e, torch.Tensor) and isinstance(a, torch.Tensor):
        if tuple(e.shape) != tuple(a.shape):
            return f"{path}: shape {tuple(a.shape)}, eager {tuple(e.shape)}"
        if e.dtype != a.dtype:
            return f"{path}: dtype {a.dtype}, eager {e.dtype}"
        if e.numel() == 0:
            return None
        if e.dtype == torch.uint8:
            step, diff = _uint8_step(tol), (a.int() - e.int()).abs()
            return _discrete(path, e, a, diff > step, f"differ by more than {step} (up to {int(diff.max())})")
        if e.is_complex():
            e, a = torch.view_as_real(e), torch.view_as_real(a)
        if not e.is_floating_point():
            return _discrete(path, e, a, e != a, "differ from eager")
        comparison = compare([e], [a], tol.atol, tol.rtol, Comparison(), scale_atol=tol.low, where=f"{path}: ")
        result.max_abs_err = max(result.max_abs_err, comparison.max_abs_err)
        return comparison.reason
    if isinstance(e, (float, complex)) and isinstance(a, (float, complex)):
        if e == a or (cmath.isnan(e) and cmath.isnan(a)):  # inf == inf too
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
        where = f"at {', '.join(gone[:3])}" if gone else "the same leaves in another order"
        result.ok, result.reason = False, f"the outputs' structure differs from eager's ({where})"
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
