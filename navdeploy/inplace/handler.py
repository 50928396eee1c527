"""The handler of an optimized module: routes each call to the runner of its graph, and anything the
runner was not built for to eager.

Every call of an optimized module pays for this routing, so the common case is one dict lookup: a flat call
(tensors and constants, no containers) is keyed by its signature and shapes (``_flat_key``), and the key's *route*
(the runner, or why the call runs eagerly) is memoised. Other calls (nested containers, HF cache objects) are
flattened as a pytree on every call."""

from __future__ import annotations

import pickle
import warnings
from typing import Any, Callable, NamedTuple, Optional

import torch

from navdeploy.candidates.verify import conform
from navdeploy.capture.aliases import LiveCall
from navdeploy.capture.graph import Graph
from navdeploy.capture.match import CallMatcher, call_matcher
from navdeploy.capture.paths import call_difference
from navdeploy.capture.pytree import Spec, describe, flatten_call, spec_key, unflatten
from navdeploy.errors import CaptureError
from navdeploy.formats.base import RunFn
from navdeploy.inplace.staleness import WeightsWatch

_CONSTANTS = (str, int, float, bool, type(None))
_MEMO_LIMIT = 4096
_KNOWN_LIMIT = 4  # structures of container calls checked before flattening: a decoder's prefill and decode step
_COVER_HINT = " Re-run nav.optimize with a dataloader covering these inputs to optimize them too."
_BATCH_HINT = (" Call it in smaller batches, or raise OptimizeConfig(max_batch_size=...) and re-run nav.optimize to "
               "build runners for larger ones.")
_Tensor = torch.Tensor
_SINGLE = {"t": "tensor", "i": 0}  # the output spec of a module that returns one tensor


class _Route(NamedTuple):
    """Where the calls of one input structure and shape go: the runner of graph ``key``, or eagerly for ``reason``
    (with ``key`` None; warned about once per ``about``, followed by ``hint``; both None: a graph eager won, run
    eagerly without a word). ``kinds``: the (dtype, on CUDA) eager
    returned for each output, checked until the runner returned them once (then empty); ``single``: the output is
    one bare tensor (returned as it is, no pytree to rebuild)."""

    key: Optional[str]
    reason: Optional[str]
    kinds: tuple = ()
    single: bool = False
    about: str = ""
    hint: str = _COVER_HINT


def _flat_key(args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> Optional[tuple]:
    """The memo key of a flat call (its arity, keyword names, and for each value: a tensor's dtype, shape and device,
    a constant's ``_constant_key``), with its tensors appended to ``tensors``; None when a value is neither (a
    container, a cache object). Runs on every call of an optimized module: cheap attributes only."""
    if kwargs:
        names = sorted(kwargs)
        values: Any = (*args, *[kwargs[name] for name in names])
        key = [len(args), *names]
    else:
        values, key = args, [len(args)]
    for value in values:
        if isinstance(value, _Tensor):
            key += (value.dtype, value.shape, value.device)
            tensors.append(value)
        elif isinstance(value, _CONSTANTS):
            key += _constant_key(value)
        else:
            return None
    return tuple(key)


def _constant_key(value: Any) -> tuple:
    """A constant's part of a memo key: its type and value, and for a float zero its sign (-0.0 == 0.0 and they
    hash alike, so one dict key would serve both, but they are different constants of the traced graph)."""
    return (type(value), value, repr(value)) if isinstance(value, float) and not value else (type(value), value)


def _tensor_kinds(tensors: list[torch.Tensor]) -> tuple:
    """What spec_key reads of each tensor (dtype, rank, device type), read cheaply for CPU and CUDA tensors."""
    return tuple((t.dtype, t.dim(), "cuda" if t.is_cuda else "cpu" if t.is_cpu else t.device.type) for t in tensors)


def _flat_call(args: tuple, kwargs: dict) -> tuple[Optional[tuple], list[torch.Tensor]]:
    """A flat call's signature ((dtype, rank, on CUDA) of each tensor, the value of each constant) and its
    tensors; (None, []) when the call nests containers or holds a tensor on a device other than CPU or CUDA."""
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
            signature.append(_constant_key(value))
        else:
            return None, []
    return (len(args), tuple(names), tuple(signature)), tensors


class OptimizedHandler:
    """Routes a call to the runner of its graph; anything the runner was not built for runs eagerly."""

    def __init__(self, name: str, graphs: dict[str, tuple[Graph, RunFn]], max_batch_size: int,
                 output_mapping: Optional[Callable], watch: Optional[WeightsWatch] = None,
                 eager_keys: frozenset[str] | set[str] = frozenset()):
        self.name = name
        # Graphs eager won: their calls run the module's own forward, quietly (a runner that calls the module
        # through a flat signature would rebuild and flatten a decoder's cache around it, slower than eager).
        self.eager_keys = frozenset(eager_keys)
        self.watch = watch  # None: nothing to check (the runner runs the live module itself)
        self.graphs = graphs
        self.max_batch_size = max_batch_size
        self.output_mapping = output_mapping
        self._warned: set[str] = set()
        self._keys: dict[tuple, str] = {}
        self._spec_keys: dict[tuple, str] = {}
        self._unknown: dict[str, _Route] = {}  # graph key of a structure not captured -> its route (explained once)
        self._routes: dict[tuple, _Route] = {}
        # Container calls' structures of captured graphs, most recently matched first: (key, spec, its compiled
        # matcher, tensor kinds).
        self._known: list[tuple[str, Spec, CallMatcher, tuple]] = []

    def release(self) -> None:
        """Calls no longer come here (another handler or eager took over): what the watch changed is given back."""
        if self.watch is not None:
            self.watch.release()

    def _fallback(self, reason: str, fn: Callable, args: tuple, kwargs: dict, hint: str = _COVER_HINT,
                  about: str = "") -> Any:
        """Run the call eagerly; warn once per kind of reason (``about``, else the reason's text before its first
        colon): a range warning per input and axis, a structure warning per structure."""
        kind = about or reason.split(":")[0]
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"navdeploy: module {self.name!r} runs eagerly for this call: {reason}.{hint}",
                          RuntimeWarning, stacklevel=4)
        return fn(*args, **kwargs)

    def _graph_key(self, args: tuple, kwargs: dict) -> tuple[Optional[str], list[torch.Tensor], Optional[Spec]]:
        """The graph key, flat tensors and flatten spec of a call (the spec None when the key came from the memo).
        Flat calls (tensors and constants only, the common case) skip hashing the full spec: their key is memoised
        by their signature."""
        signature, flat = _flat_call(args, kwargs)
        key = self._keys.get(signature) if signature is not None else None
        if key is not None:
            return key, flat, None
        if signature is None:
            # A call with containers (an HF cache): first checked against the structures of the last calls (a
            # decoder's every step has its previous step's), which builds nothing.
            for i, (key, spec, match, kinds) in enumerate(self._known):
                tensors = match(args, kwargs)
                if tensors is not None and _tensor_kinds(tensors) == kinds:
                    if i:
                        self._known.insert(0, self._known.pop(i))
                    return key, tensors, spec
        spec, tensors = flatten_call(args, kwargs, self.name)
        if signature is not None:
            key = self._keys[signature] = spec_key(spec, tensors)
            return key, tensors, spec
        # Else its key is memoised by the spec's pickle and the tensors' kinds, an exact in-process stand-in for
        # spec_key's sorted JSON and hash (~5 us against ~45 us for a decoder step's cache).
        kinds = _tensor_kinds(tensors)
        memo = (pickle.dumps(spec, 5), kinds)
        key = self._spec_keys.get(memo)
        if key is None:
            key = spec_key(spec, tensors)
            if len(self._spec_keys) < _MEMO_LIMIT:
                self._spec_keys[memo] = key
        if key in self.graphs or key in self.eager_keys:
            self._known = [(key, spec, call_matcher(spec), kinds), *self._known[:_KNOWN_LIMIT - 1]]
        return key, tensors, spec

    def _route(self, args: tuple, kwargs: dict) -> tuple[_Route, list[torch.Tensor]]:
        """The route of a call the memo does not hold, and its flat tensors."""
        try:
            key, tensors, spec = self._graph_key(args, kwargs)
        except CaptureError as exc:
            return _Route(None, f"uncapturable input: {exc}"), []
        entry = self.graphs.get(key)
        if entry is None and key in self.eager_keys:
            return _Route(None, None), tensors
        if entry is None:
            route = self._unknown.get(key)
            if route is None:
                route = self._new_structure(spec, tensors, args, kwargs)
                if len(self._unknown) < _MEMO_LIMIT:
                    self._unknown[key] = route
            return route, tensors
        graph, _ = entry
        refusal = graph.accepts(tensors, self.max_batch_size)
        if refusal is not None:
            return _Route(None, f"input outside the optimized range: {refusal.reason}", about=refusal.about,
                          hint=_BATCH_HINT if refusal.batch else _COVER_HINT), tensors
        kinds = tuple((spec.torch_dtype, torch.device(spec.device).type == "cuda") for spec in graph.outputs)
        return _Route(key, None, kinds, graph.output_spec == _SINGLE), tensors

    def _new_structure(self, spec: Optional[Spec], tensors: list[torch.Tensor], args: tuple, kwargs: dict) -> _Route:
        """The route of a call whose structure was not captured, saying how it differs from the nearest captured
        one (a keyword left out, another constant, another dtype)."""
        if spec is None:  # its key came from the memo of flat calls
            spec, tensors = flatten_call(args, kwargs, self.name)
        how = call_difference(spec, tensors, [(g.input_spec, g.inputs) for g, _ in self.graphs.values()])
        return _Route(None, f"new input structure: not seen while optimizing ({how})", about=f"structure: {how}")

    def __call__(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        tensors: list[torch.Tensor] = []
        memo = _flat_key(args, kwargs, tensors)
        route = self._routes.get(memo) if memo is not None else None
        if route is None:
            route, tensors = self._route(args, kwargs)
            if memo is not None and len(self._routes) < _MEMO_LIMIT:  # shapes without end: stop memoising
                self._routes[memo] = route
        key, reason, kinds, single, about, hint = route
        if key is None:
            if self.watch is not None:
                self.watch.reason(tensors)  # a training call gets the parameters their own counters back first
            if reason is None:  # a graph eager won
                return fn(*args, **kwargs)
            return self._fallback(reason, fn, args, kwargs, hint, about)
        graph, run = self.graphs[key]
        watch = self.watch
        if watch is not None:
            reason = watch.reason(tensors)
            if reason is not None:
                return self._fallback(reason, fn, args, kwargs, hint="")
        try:
            if torch.is_grad_enabled():  # nothing here requires grad (the watch said so): record no graph either
                with torch.no_grad():
                    outputs = run(tensors)
            else:
                outputs = run(tensors)
            if kinds:  # outputs in the dtype and device eager returned
                for t, (dtype, cuda) in zip(outputs, kinds):
                    if t.dtype is not dtype or t.is_cuda is not cuda:
                        outputs = conform(outputs, graph.outputs)
                        break
                else:  # a runner's output dtypes and devices are fixed for the same input kinds and shapes
                    if memo in self._routes:
                        self._routes[memo] = route._replace(kinds=())
        except Exception as exc:  # noqa: BLE001 - never crash the user's pipeline on a runner error
            return self._fallback(f"runner error: {type(exc).__name__}: {exc}", fn, args, kwargs)
        # What eager returns of the call's own inputs (an HF cache) is returned itself, in its new state.
        call = LiveCall(graph.input_spec, args, kwargs, tensors) if graph.returns_inputs else None
        if self.output_mapping is None:
            return outputs[0] if single and call is None else unflatten(graph.output_spec, outputs, call=call)
        structured = unflatten(graph.output_spec, outputs, rebuild_classes=False, call=call)
        try:
            return self.output_mapping(structured)
        except Exception as exc:
            # The user's function: a clear error, never a silent eager fallback that would hide the bug.
            exc.add_note(f"navdeploy: raised by the output_mapping of module {self.name!r}, called with the "
                         f"optimized runner's output {describe(structured)} (HF ModelOutputs and dataclasses "
                         "arrive as plain dicts).")
            raise
