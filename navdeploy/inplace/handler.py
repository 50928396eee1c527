"""The handler of an optimized module: routes each call to the runner of its graph, and anything the
runner was not built for to eager."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Optional

import torch

from navdeploy.candidates.verify import conform
from navdeploy.capture.aliases import LiveCall
from navdeploy.capture.graph import Graph
from navdeploy.capture.pytree import describe, flatten_call, spec_key, unflatten
from navdeploy.errors import CaptureError
from navdeploy.formats.base import RunFn
from navdeploy.inplace.staleness import WeightsWatch

_CONSTANTS = (str, int, float, bool, type(None))
_MEMO_LIMIT = 4096
_COVER_HINT = " Re-run nav.optimize with a dataloader covering these inputs to optimize them too."


def _flat_call(args: tuple, kwargs: dict) -> tuple[Optional[tuple], list[torch.Tensor]]:
    """A flat call's signature ((dtype, rank, on CUDA) of each tensor, the value of each constant) and its
    tensors; (None, []) when the call nests containers or holds a tensor on a device other than CPU or CUDA.
    Runs on every call of an optimized module: cheap attributes only (``t.device`` builds an object)."""
    names = sorted(kwargs) if kwargs else ()
    signature: list = []
    tensors: list[torch.Tensor] = []
    for value in (*args, *(kwargs[k] for k in names)):
        if isinstance(value, torch.Tensor):
            if not (value.is_cpu or value.is_cuda):
                return None, []
            signature.append((value.dtype, value.dim(), value.is_cuda))
            tensors.append(value)
        elif isinstance(value, _CONSTANTS):
            signature.append((type(value), value))
        else:
            return None, []
    return (len(args), tuple(names), tuple(signature)), tensors


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
        self._accepted: dict[tuple, Optional[str]] = {}
        # Per graph: the (dtype, device type) eager returned for each output, resolved once.
        self._kinds = {key: [(spec.torch_dtype, torch.device(spec.device).type) for spec in graph.outputs]
                       for key, (graph, _) in graphs.items()}

    def _conform(self, key: str, graph: Graph, outputs: list[torch.Tensor]) -> list[torch.Tensor]:
        """Runner outputs in the dtype and device eager returned (``conform``, with the kinds resolved once)."""
        kinds = self._kinds[key]
        if all(t.dtype is dtype and t.device.type == device for t, (dtype, device) in zip(outputs, kinds)):
            return outputs
        return conform(outputs, graph.outputs)

    def _fallback(self, reason: str, fn: Callable, args: tuple, kwargs: dict, hint: str = _COVER_HINT) -> Any:
        kind = reason.split(":")[0]
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"navdeploy: module {self.name!r} runs eagerly for this call: {reason}.{hint}",
                          RuntimeWarning, stacklevel=4)
        return fn(*args, **kwargs)

    def _graph_key(self, args: tuple, kwargs: dict) -> tuple[Optional[str], list[torch.Tensor], Optional[tuple]]:
        """The graph key, flat tensors and cheap signature of a call. Flat calls (tensors and constants only, the
        common case) skip hashing the full spec: their key is memoised by the signature (None for other calls)."""
        signature, flat = _flat_call(args, kwargs)
        key = self._keys.get(signature) if signature is not None else None
        if key is not None:
            return key, flat, signature
        spec, tensors = flatten_call(args, kwargs, self.name)
        key = spec_key(spec, tensors)
        if signature is not None:
            self._keys[signature] = key
        return key, tensors, signature

    def _accepts(self, graph: Graph, tensors: list[torch.Tensor], signature: Optional[tuple]) -> Optional[str]:
        """``graph.accepts``, memoised for flat calls by signature (dtype, rank, device) and shapes: a server
        sees the same few shapes again and again."""
        if signature is None:
            return graph.accepts(tensors, self.max_batch_size)
        memo = (signature, *(t.shape for t in tensors))
        if memo not in self._accepted:
            if len(self._accepted) >= _MEMO_LIMIT:  # shapes without end (every sequence length): stop memoising
                return graph.accepts(tensors, self.max_batch_size)
            self._accepted[memo] = graph.accepts(tensors, self.max_batch_size)
        return self._accepted[memo]

    def __call__(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            key, tensors, signature = self._graph_key(args, kwargs)
        except CaptureError as exc:
            return self._fallback(f"uncapturable input: {exc}", fn, args, kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            return self._fallback("new input structure: not seen while optimizing", fn, args, kwargs)
        graph, run = entry
        reason = self._accepts(graph, tensors, signature)
        if reason is not None:
            return self._fallback(f"input outside the optimized range: {reason}", fn, args, kwargs)
        if self.watch is not None:
            reason = self.watch.reason(tensors)
            if reason is not None:
                return self._fallback(reason, fn, args, kwargs, hint="")
        try:
            if torch.is_grad_enabled():  # nothing here requires grad (the watch said so): record no graph either
                with torch.no_grad():
                    outputs = self._conform(key, graph, run(tensors))
            else:
                outputs = self._conform(key, graph, run(tensors))
        except Exception as exc:  # noqa: BLE001 - never crash the user's pipeline on a runner error
            return self._fallback(f"runner error: {type(exc).__name__}: {exc}", fn, args, kwargs)
        # What eager returns of the call's own inputs (an HF cache) is returned itself, in its new state.
        call = LiveCall(graph.input_spec, args, kwargs, tensors) if graph.returns_inputs else None
        if self.output_mapping is not None:
            structured = unflatten(graph.output_spec, outputs, rebuild_classes=False, call=call)
            try:
                return self.output_mapping(structured)
            except Exception as exc:
                # The user's function: a clear error, never a silent eager fallback that would hide the bug.
                exc.add_note(f"navdeploy: raised by the output_mapping of module {self.name!r}, called with the "
                             f"optimized runner's output {describe(structured)} (HF ModelOutputs and dataclasses "
                             "arrive as plain dicts).")
                raise
        return unflatten(graph.output_spec, outputs, call=call)
