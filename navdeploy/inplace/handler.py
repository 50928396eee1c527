"""The handler of an optimized module: routes each call to the runner of its graph, and anything the
runner was not built for to eager."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch

from navdeploy.candidates.verify import conform
from navdeploy.capture.graph import Graph
from navdeploy.capture.pytree import describe, flatten_call, spec_key, unflatten
from navdeploy.errors import CaptureError
from navdeploy.formats.base import RunFn
from navdeploy.inplace.staleness import WeightsWatch

_CONSTANTS = (str, int, float, bool, type(None))
_COVER_HINT = " Re-run nav.optimize with a dataloader covering these inputs to optimize them too."


def _flat_signature(args: tuple, kwargs: dict) -> Optional[tuple]:
    """(dtype, rank, device) of each tensor and the value of each constant, or None when a call nests containers."""
    signature: list = []
    for value in (*args, *(kwargs[k] for k in sorted(kwargs))):
        if isinstance(value, torch.Tensor):
            signature.append((value.dtype, value.dim(), value.device.type))
        elif isinstance(value, _CONSTANTS):
            signature.append((type(value), value))
        else:
            return None
    return (len(args), tuple(sorted(kwargs)), tuple(signature))


class OptimizedHandler:
    """Routes a call to the runner of its graph; anything the runner was not built for runs eagerly."""

    def __init__(self, name: str, graphs: dict[str, tuple[Graph, RunFn]], max_batch_size: int,
                 output_mapping: Optional[Callable], watch: Optional[WeightsWatch] = None):
        self.name = name
        self.watch = watch  # None: nothing to check (the runner runs the live module itself)
        self.graphs = graphs
        self.max_batch_size = max_batch_size
        self.output_mapping = output_mapping
        self._warned: set[str] = set()
        self._keys: dict[tuple, str] = {}

    def _fallback(self, reason: str, fn: Callable, args: tuple, kwargs: dict, hint: str = _COVER_HINT) -> Any:
        kind = reason.split(":")[0]
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"navdeploy: module {self.name!r} runs eagerly for this call: {reason}.{hint}",
                          RuntimeWarning, stacklevel=4)
        return fn(*args, **kwargs)

    def _graph_key(self, args: tuple, kwargs: dict) -> tuple[Optional[str], list[torch.Tensor]]:
        """The graph key and flat tensors of a call. Flat calls (tensors and constants only, the common case)
        skip hashing the full spec: their key is memoised by a cheap signature."""
        signature = _flat_signature(args, kwargs)
        if signature is not None and signature in self._keys:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]
            return self._keys[signature], tensors
        spec, tensors = flatten_call(args, kwargs, self.name)
        key = spec_key(spec, tensors)
        if signature is not None:
            self._keys[signature] = key
        return key, tensors

    def __call__(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            key, tensors = self._graph_key(args, kwargs)
        except CaptureError as exc:
            return self._fallback(f"uncapturable input: {exc}", fn, args, kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            return self._fallback("new input structure: not seen while optimizing", fn, args, kwargs)
        graph, run = entry
        reason = graph.accepts(tensors, self.max_batch_size)
        if reason is not None:
            return self._fallback(f"input outside the optimized range: {reason}", fn, args, kwargs)
        if self.watch is not None:
            reason = self.watch.reason(tensors)
            if reason is not None:
                return self._fallback(reason, fn, args, kwargs, hint="")
        try:
            with torch.no_grad():
                outputs = conform(run(tensors), graph.outputs)
        except Exception as exc:  # noqa: BLE001 - never crash the user's pipeline on a runner error
            return self._fallback(f"runner error: {type(exc).__name__}: {exc}", fn, args, kwargs)
        if self.output_mapping is not None:
            structured = unflatten(graph.output_spec, outputs, rebuild_classes=False)
            try:
                return self.output_mapping(structured)
            except Exception as exc:
                # The user's function: a clear error, never a silent eager fallback that would hide the bug.
                exc.add_note(f"navdeploy: raised by the output_mapping of module {self.name!r}, called with the "
                             f"optimized runner's output {describe(structured)} (HF ModelOutputs and dataclasses "
                             "arrive as plain dicts).")
                raise
        return unflatten(graph.output_spec, outputs)
