"""Records a module's eager calls while ``nav.optimize`` runs the callable: groups them into graphs and
keeps samples of each."""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

from navdeploy.capture.aliases import cache_paths, counters, held_tensors, input_aliases, mark_changed
from navdeploy.capture.graph import Graph, Sample, TensorSpec, batch_size_of, call_kind
from navdeploy.capture.pytree import check_output_mapping, describe, flatten, flatten_call, spec_key, unflatten
from navdeploy.errors import CaptureError


def _same(t: torch.Tensor, before: torch.Tensor) -> bool:
    """Whether a tensor still holds what it held before the call (NaNs count as changed: a copy too many at most)."""
    return t.shape == before.shape and t.dtype == before.dtype and bool(torch.equal(t, before))


def _states(inputs: list[torch.Tensor], held: dict[int, torch.Tensor]) -> list[object]:
    """What each input tensor not held by an HF cache is before the call, to see whether the call writes into it:
    its version counter, or a copy for an inference tensor (which has no counter)."""
    return [None if i in held else t.detach().clone() if t.is_inference() else t._version
            for i, t in enumerate(inputs)]


def _written(inputs: list[torch.Tensor], before: list[object]) -> Optional[int]:
    """The index of the first input tensor the call changed in place (see ``_states``), or None."""
    for i, (t, state) in enumerate(zip(inputs, before)):
        if isinstance(state, torch.Tensor):
            if not _same(t, state):
                return i
        elif state is not None and t._version != state:
            return i
    return None


class Recorder:
    """Collects the calls of one wrapped module into graphs while ``nav.optimize`` runs the callable."""

    def __init__(self, name: str, sample_count: int, batching: Optional[bool],
                 output_mapping: Optional[Callable[[Any], Any]] = None):
        self.name = name
        self.output_mapping = output_mapping  # checked on the captured outputs: a bad one fails at optimize, not later
        self.sample_count = sample_count
        self.batching = batching
        self.graphs: dict[str, Graph] = {}
        self._batch_consistent: dict[str, bool] = {}
        # Why a call could not be captured (the first such call): that call runs eagerly and is not recorded.
        self.uncapturable: Optional[str] = None

    def record(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """Run the eager call and remember its inputs and outputs (``input_mapping`` was applied by the proxy)."""
        try:
            in_spec, inputs = flatten_call(args, kwargs, self.name)
        except CaptureError as exc:
            return self._not_captured(exc, fn(*args, **kwargs))
        kind = call_kind(inputs)  # as the call passes them (the held ones below are copies)
        # An HF cache argument is changed by the call (in place, for a StaticCache): keep what the call was given.
        held = {i: inputs[i].detach().clone() for i in held_tensors(in_spec)}
        before = _states(inputs, held)
        output = fn(*args, **kwargs)
        written = _written(inputs, before)
        if written is not None:
            return self._not_captured(f"it changes its input tensor #{written} in place (e.g. an in-place activation "
                                      "on its input); a runner does not write into its inputs, so the caller would "
                                      "see the tensor unchanged", output)
        aliases = input_aliases(in_spec, args, kwargs, inputs) if cache_paths(in_spec) else None
        try:
            out_spec, outputs = flatten(output, path=f"{self.name} outputs", outputs=True, aliases=aliases)
        except CaptureError as exc:
            return self._not_captured(exc, output)
        counted = counters(in_spec, out_spec) if aliases else []
        if counted:
            return self._not_captured(f"the HF cache it is given counts tokens in a Python int ({counted[0]}), so "
                                      "every call would be a graph of its own (a sliding-window cache does)", output)
        changed = {i for i, before in held.items() if not _same(inputs[i], before)}
        inputs = [held.get(i, t) for i, t in enumerate(inputs)]
        if not outputs:
            return self._not_captured(f"it returned no tensors ({describe(output)}); wrap only the part of it that "
                                      "computes tensors, or do not wrap it with nav.Module", output)
        key = spec_key(in_spec, inputs)
        graph = self.graphs.get(key)
        if graph is None:
            mapping = self.output_mapping
            if mapping is not None:
                check_output_mapping(self.name, mapping, unflatten(out_spec, outputs, rebuild_classes=False))
            graph = Graph(key, in_spec, out_spec, [TensorSpec.of(t) for t in inputs],
                          [TensorSpec.of(t) for t in outputs], batching=False)
            self.graphs[key] = graph
            self._batch_consistent[key] = True
        elif len(outputs) != len(graph.outputs):
            raise CaptureError(f"module {self.name!r}: calls with the same input structure returned different "
                               "output structures; navdeploy needs the output structure to follow from the inputs.")
        if changed:
            mark_changed(graph.input_spec, graph.output_spec, changed)
        for spec, t in zip(graph.inputs, inputs):
            spec.update(list(t.shape))
        for spec, t in zip(graph.outputs, outputs):
            spec.update(list(t.shape))
        graph.calls += 1
        graph.note_call_kind(kind)
        batch = batch_size_of(inputs, outputs)
        if batch is None:
            self._batch_consistent[key] = False
        else:
            graph.batch_counts[batch] = graph.batch_counts.get(batch, 0) + 1
        self._keep(graph, inputs, outputs)
        return output

    def _not_captured(self, why: object, output: Any) -> Any:
        """Remember why a call was not captured (the first reason) and hand its eager output back."""
        if self.uncapturable is None:
            self.uncapturable = str(why)
        return output

    def _keep(self, graph: Graph, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        shapes = [tuple(t.shape) for t in inputs]
        kept = [[tuple(t.shape) for t in s.inputs] for s in graph.samples]
        new_shape = shapes not in kept
        if len(graph.samples) >= self.sample_count:
            if not new_shape:
                return
            # Prefer shape variety: replace the newest sample whose shapes repeat an earlier one; with none, keep
            # the samples spread over the sizes seen (below).
            dupes = [i for i in range(len(kept)) if kept[i] in kept[:i]]
            if dupes:
                graph.samples.pop(dupes[-1])
            else:
                sizes = [sum(t.numel() for t in sample.inputs) for sample in graph.samples]
                drop = _densest(sizes, sum(t.numel() for t in inputs))
                if drop is None:
                    return
                graph.samples.pop(drop)
        graph.samples.append(Sample([t.detach().clone() for t in inputs], [t.detach().clone() for t in outputs]))

    def finish(self) -> list[Graph]:
        """The graphs, with batching decided and opt shapes set from their typical sample
        (``Graph.typical_sample``)."""
        for key, graph in self.graphs.items():
            consistent = self._batch_consistent[key]
            graph.batching = consistent if self.batching is None else (self.batching and consistent)
            sample = graph.typical_sample
            for spec, t in zip(graph.inputs, sample.inputs):
                spec.opt_shape = list(t.shape)
            for spec, t in zip(graph.outputs, sample.outputs):
                spec.opt_shape = list(t.shape)
        return list(self.graphs.values())


def _densest(sizes: list[int], new: int) -> Optional[int]:
    """Which kept sample (by its place in ``sizes``, the samples' input sizes) gives way to a new one of size ``new``
    so that the samples spread over the sizes seen: the one whose neighbours by size lie closest together, never the
    first kept (the first call's) nor the smallest or largest. None: the new one would be that sample (it lies
    closer to its neighbours than any kept one), so nothing changes.

    A decoder without a cache is called at every length of a ``generate``; keeping its first calls only put the
    typical sample (the median kept one, at which candidates are compared) at the short end: ONNX Runtime won a
    GPT-2 there (0.54 against 0.53 ms at 7 tokens) and lost over the run (1.11 against 1.00 ms at 26)."""
    everyone = sorted([(size, i) for i, size in enumerate(sizes)] + [(new, len(sizes))])
    gaps = [(everyone[k + 1][0] - everyone[k - 1][0], everyone[k][1]) for k in range(1, len(everyone) - 1)
            if everyone[k][1] != 0]
    if not gaps:
        return None
    _, place = min(gaps)
    return None if place == len(sizes) else place
