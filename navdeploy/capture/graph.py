"""What is learned from the captured calls: a *graph* per input structure (calls whose specs and tensor
dtypes/ranks are equal share one exported model), its tensors' shape ranges and kept samples."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import NamedTuple, Optional, Sequence

import torch

from navdeploy.capture.aliases import returns_inputs
from navdeploy.capture.paths import tensor_paths
from navdeploy.capture.pytree import Spec

_MAX_CALL_KINDS = 4  # a pipeline mixes few; more would only lengthen the bind's warm-up


def call_kind(inputs: list[torch.Tensor]) -> str:
    """How a call meets inference mode: "I" under ``torch.inference_mode`` (else "N"), then per input "i" for an
    inference tensor (else "n")."""
    mode = "I" if torch.is_inference_mode_enabled() else "N"
    return mode + "".join("i" if t.is_inference() else "n" for t in inputs)


def tensors_of_kind(kind: str, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``inputs`` as a call of ``kind`` passes them (to be called in the mode ``kind[0]`` names)."""
    out = []
    for t, k in zip(inputs, kind[1:]):
        with torch.inference_mode(k == "i"):
            out.append(t.clone())
    return out


@dataclass
class TensorSpec:
    """What was seen of one flat input or output tensor across all calls of a graph."""

    dtype: str
    device: str
    min_shape: list[int]
    max_shape: list[int]
    opt_shape: list[int]

    def update(self, shape: list[int]) -> None:
        self.min_shape = [min(a, b) for a, b in zip(self.min_shape, shape)]
        self.max_shape = [max(a, b) for a, b in zip(self.max_shape, shape)]

    @property
    def dynamic_axes(self) -> list[int]:
        return [i for i, (lo, hi) in enumerate(zip(self.min_shape, self.max_shape)) if lo != hi]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        shape = list(t.shape)
        return cls(str(t.dtype).removeprefix("torch."), str(t.device), shape, list(shape), list(shape))


@dataclass
class Sample:
    """One captured call: flat input tensors and the eager flat output tensors."""

    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]


def batch_size_of(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> Optional[int]:
    """The common size of axis 0 of every input and output tensor with one, or None when there is none.

    0-d tensors (a diffusion UNet's timestep) have no batch axis and do not stop the others from batching."""
    batched_inputs = [t for t in inputs if t.dim() > 0]
    sizes = {t.shape[0] for t in batched_inputs + [t for t in outputs if t.dim() > 0]}
    if len(sizes) == 1 and batched_inputs and all(t.dim() > 0 for t in outputs):
        return sizes.pop()
    return None


def median_sample(samples: Sequence[Sample], batch: Optional[int]) -> Sample:
    """Of the ``samples`` at batch size ``batch`` (all of them when None or when none is), the one of median size:
    the larger of two middles, the first kept of equals."""
    if not samples:
        # A graph read back from a manifest has none until they are loaded (``workspace.samples.load_samples``).
        raise ValueError("no samples to choose from: this graph's captured samples were not loaded")
    pool = [s for s in samples if batch is not None and batch_size_of(s.inputs, s.outputs) == batch] or list(samples)
    order = sorted(range(len(pool)), key=lambda i: (sum(t.numel() for t in pool[i].inputs), i))
    return pool[order[len(order) // 2]]


class Refusal(NamedTuple):
    """Why a graph's runners cannot take a call's inputs: ``reason`` for the message, ``about`` what is refused
    without the values (one warning per ``about``), ``batch`` when the batch size is over the limit."""

    reason: str
    about: str
    batch: bool = False


@dataclass
class Graph:
    """All captured calls of one module that share an input structure."""

    key: str
    input_spec: Spec
    output_spec: Spec
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    batching: bool
    calls: int = 0
    samples: list[Sample] = field(default_factory=list)
    # How many captured calls had each batch size (calls whose tensors share one axis-0 size), in first-seen order:
    # the winner is the fastest over this mix, as the pipeline calls it.
    batch_counts: dict[int, int] = field(default_factory=dict)
    # How captured calls met inference mode, where not as plain tensors outside it: one string per distinct kind of
    # call, "I" (under torch.inference_mode) or "N", then per input "i" (an inference tensor) or "n". torch.compile
    # guards on the dispatch keys these make (HF generate is often called under inference_mode, with a mix), so
    # the bind warms the runner up with calls of each kind (:func:`call_kind`).
    call_kinds: list[str] = field(default_factory=list)
    # What ``accepts`` compares a call with, per max_batch_size: per input (dtype, on CUDA, min shape, max shape).
    _limits: dict[int, list[tuple]] = field(default_factory=dict, init=False, repr=False, compare=False)

    def to_json(self) -> dict:
        data = {
            "key": self.key, "input_spec": self.input_spec, "output_spec": self.output_spec,
            "inputs": [dataclasses.asdict(t) for t in self.inputs],
            "outputs": [dataclasses.asdict(t) for t in self.outputs],
            "batching": self.batching, "calls": self.calls,
            "batch_counts": {str(b): n for b, n in self.batch_counts.items()},
        }
        if self.call_kinds:  # only when set: the JSON of other graphs stays as it was
            data["call_kinds"] = list(self.call_kinds)
        return data

    @classmethod
    def from_json(cls, data: dict) -> "Graph":
        return cls(
            key=data["key"], input_spec=data["input_spec"], output_spec=data["output_spec"],
            inputs=[TensorSpec(**t) for t in data["inputs"]], outputs=[TensorSpec(**t) for t in data["outputs"]],
            batching=data["batching"], calls=data.get("calls", 0),
            batch_counts={int(b): int(n) for b, n in (data.get("batch_counts") or {}).items()},
            call_kinds=[str(k) for k in data.get("call_kinds") or []],
        )

    def note_call_kind(self, kind: str) -> None:
        """Remember how a captured call met inference mode (:func:`call_kind`; plain calls are not listed)."""
        if kind.strip("Nn") and kind not in self.call_kinds and len(self.call_kinds) < _MAX_CALL_KINDS:
            self.call_kinds.append(kind)

    @property
    def typical_batch(self) -> Optional[int]:
        """The batch size that carried most of the captured samples (calls × size; the first seen of equals): where
        the pipeline spends most of this graph's time, so where candidates are screened. None when the graph does
        not batch."""
        if not self.batching:
            return None
        if self.batch_counts:
            return max(self.batch_counts, key=lambda b: self.batch_counts[b] * b)
        return next((t.opt_shape[0] for t in self.inputs if t.opt_shape), None)

    @property
    def typical_sample(self) -> Sample:
        """The kept sample candidates are screened and profiled on (grown or cut to each profiled batch size), and
        whose shapes are the opt shapes: the median-sized one at :attr:`typical_batch` (:func:`median_sample`). The
        first kept sample is often the smallest (a prompt before the tokens generated from it, the shortest
        sequence of a batch mix), where a runner's per-call overhead decides and another runner wins than on the
        calls the pipeline spends its time on."""
        return median_sample(self.samples, self.typical_batch)

    def sample_for(self, batch_size: Optional[int]) -> Sample:
        """The kept sample candidates are timed on at ``batch_size`` (grown or cut to it by the caller): where the
        pipeline called this graph at that size, the median-sized kept sample of those calls, so each size of the
        call mix is timed at the shapes it came in (a BERT called at 2x12 and 4x32 tokens: its 2x12 call timed as
        2x32, where a frozen bf16 build loses less than at 12 tokens, let a bf16 build 1.19x slower over the
        pipeline's calls win); else :attr:`typical_sample`."""
        if self.batching and batch_size in (self.batch_counts or {}) and \
                any(batch_size_of(s.inputs, s.outputs) == batch_size for s in self.samples):
            return median_sample(self.samples, batch_size)
        return self.typical_sample

    @property
    def batch_weights(self) -> Optional[dict[int, int]]:
        """The captured calls per batch size, when the graph batches and more than one size was seen (else None:
        candidates are compared at :attr:`typical_batch`)."""
        return dict(self.batch_counts) if self.batching and len(self.batch_counts) > 1 else None

    @functools.cached_property
    def returns_inputs(self) -> bool:
        """Whether eager returns some of the call's own inputs (the HF cache it was given)."""
        return returns_inputs(self.output_spec)

    def dynamic_axes(self, max_batch_size: int) -> list[dict[int, tuple[int, int]]]:
        """Per input tensor: ``{axis: (min, max)}`` for every axis that varies (batch axis 0 when batching)."""
        result = []
        for t in self.inputs:
            axes = {a: (t.min_shape[a], t.max_shape[a]) for a in t.dynamic_axes}
            if self.batching and t.min_shape and max(max_batch_size, t.max_shape[0]) > 1:  # 1..1 is no axis
                axes[0] = (1, max(max_batch_size, t.max_shape[0]))
            result.append(axes)
        return result

    @functools.cached_property
    def input_paths(self) -> list[str]:
        """The argument each input tensor comes from: ``input_ids``, ``args[0]``, ``past_key_values.layers[0].keys``."""
        return tensor_paths(self.input_spec)

    def accepts(self, tensors: list[torch.Tensor], max_batch_size: int) -> Optional[Refusal]:
        """None when the runner built for this graph can take these inputs, else why it cannot. Runs on every call
        the route memo cannot hold (an HF cache's length grows each step): identity and tuple compares first, the
        reason only when they fail."""
        limits = self._limits.get(max_batch_size)
        if limits is None:
            limits = self._limits[max_batch_size] = [
                (spec.torch_dtype, torch.device(spec.device).type == "cuda", tuple(lo), tuple(hi))
                for spec, (lo, hi) in zip(self.inputs, self._bounds(max_batch_size))]
        if len(tensors) == len(limits):
            for t, (dtype, cuda, lo, hi) in zip(tensors, limits):
                if t.dtype is not dtype or t.is_cuda is not cuda or not (cuda or t.is_cpu):
                    break
                shape = t.shape
                if len(shape) != len(lo):
                    break
                for size, a, b in zip(shape, lo, hi):
                    if size < a or size > b:
                        break
                else:
                    continue
                break
            else:
                return None
        return self._refusal(tensors, max_batch_size)

    def _bounds(self, max_batch_size: int) -> list[tuple[list[int], list[int]]]:
        """Per input, the sizes its runners take: the captured range, axis 0 from 1 to the batch limit when the
        graph batches."""
        bounds = []
        for spec in self.inputs:
            lo, hi = list(spec.min_shape), list(spec.max_shape)
            if self.batching and lo:
                lo[0], hi[0] = 1, max(max_batch_size, hi[0])
            bounds.append((lo, hi))
        return bounds

    def _refusal(self, tensors: list[torch.Tensor], max_batch_size: int) -> Refusal:
        """Why the runners cannot take these inputs (``accepts`` found that they cannot)."""
        if len(tensors) != len(self.inputs):
            return Refusal(f"expected {len(self.inputs)} tensors, got {len(tensors)}", "tensor count")
        paths = self.input_paths
        for i, (t, spec, (low, high)) in enumerate(zip(tensors, self.inputs, self._bounds(max_batch_size))):
            name = f"input {paths[i]!r}" if i < len(paths) else f"input {i}"
            if str(t.dtype).removeprefix("torch.") != spec.dtype:
                return Refusal(f"{name}: dtype {t.dtype} differs from captured {spec.dtype}", f"{name} dtype")
            if t.device.type != torch.device(spec.device).type:
                return Refusal(f"{name}: device {t.device} differs from captured {spec.device}", f"{name} device")
            if t.dim() != len(spec.min_shape):
                return Refusal(f"{name}: rank {t.dim()} differs from captured rank {len(spec.min_shape)}",
                               f"{name} rank")
            for axis, (size, lo, hi) in enumerate(zip(t.shape, low, high)):
                if self.batching and axis == 0 and size > hi:
                    return Refusal(f"batch size {size} (axis 0 of {name}) is above {hi}, the largest its runners "
                                   f"take (max_batch_size={max_batch_size}, or the largest captured batch when "
                                   "larger)", "batch size", batch=True)
                if not lo <= size <= hi:
                    return Refusal(f"{name}: size {size} of axis {axis} is outside the captured range [{lo}, {hi}]",
                                   f"{name} axis {axis}")
        return Refusal("inputs not accepted", "inputs")  # not reached: accepts found a difference
