"""Turning module calls into flat tensor lists and back, and what is learned from the captured calls.

A call's ``(args, kwargs)`` and its output are pytrees. ``flatten`` splits a pytree into a JSON-able
*spec* (containers, constants such as strings, and placeholders for tensors) and the list of tensors.
Calls whose specs (and tensor dtypes/ranks) are equal share a *graph*: one exported model serves them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from navdeploy.errors import CaptureError

Spec = Any  # a JSON-able tree of dicts; see flatten()
_CONSTANT_TYPES = (str, int, float, bool, type(None))


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _resolve_class(path: str) -> Optional[type]:
    """The class named by ``module:qualname`` if its module is already imported (never imports code)."""
    module_name, _, qualname = path.partition(":")
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part, None) if obj is not None else None
    return obj if isinstance(obj, type) else None


def _is_model_output(value: Any) -> bool:
    # HF ModelOutput is an OrderedDict and a dataclass; recognise it without importing transformers.
    return isinstance(value, OrderedDict) and dataclasses.is_dataclass(value)


def flatten(tree: Any, path: str = "inputs", outputs: bool = False) -> tuple[Spec, list[torch.Tensor]]:
    """Split a pytree into a JSON-able spec and its tensor leaves (in depth-first order).

    Supported nodes: tensors; str/int/float/bool/None constants; tuples, lists, named tuples;
    dicts with string keys; dataclasses and HF ``ModelOutput``s. Anything else raises
    :class:`CaptureError` naming the path of the offending value.
    """
    tensors: list[torch.Tensor] = []

    def walk(node: Any, where: str) -> Spec:
        if isinstance(node, torch.Tensor):
            tensors.append(node)
            return {"t": "tensor", "i": len(tensors) - 1}
        if isinstance(node, _CONSTANT_TYPES):
            return {"t": "const", "v": node}
        if isinstance(node, dict):
            for k in node:
                if not isinstance(k, str):
                    raise CaptureError(f"{where}: dict key {k!r} is not a string; only string keys can be captured.")
            cls = type(node)
            spec = {"t": "dict", "k": list(node), "c": [walk(v, f"{where}[{k!r}]") for k, v in node.items()]}
            if cls not in (dict, OrderedDict):
                spec["cls"] = _class_path(cls)
            return spec
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return {"t": "namedtuple", "cls": _class_path(type(node)),
                    "c": [walk(v, f"{where}.{f}") for f, v in zip(node._fields, node)]}
        if isinstance(node, (tuple, list)):
            kind = "tuple" if isinstance(node, tuple) else "list"
            return {"t": kind, "c": [walk(v, f"{where}[{i}]") for i, v in enumerate(node)]}
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            names = [f.name for f in dataclasses.fields(node) if f.init]
            return {"t": "dataclass", "cls": _class_path(type(node)), "k": names,
                    "c": [walk(getattr(node, n), f"{where}.{n}") for n in names]}
        kind = f"{type(node).__module__}.{type(node).__qualname__}"
        supported = "supported: tensors, str/int/float/bool/None, tuples, lists, dicts, dataclasses, HF ModelOutput"
        if outputs:
            raise CaptureError(
                f"{where}: the module returned a value of type {kind}, which cannot be captured ({supported}). "
                "Wrap the module in a small nn.Module that returns tensors (or containers of them), and pass "
                "output_mapping= to nav.Module to rebuild your type from them."
            )
        raise CaptureError(
            f"{where}: values of type {kind} cannot be captured ({supported}). "
            "Pass input_mapping= to nav.Module to turn it into tensors or constants."
        )

    return walk(tree, path), tensors


def flatten_call(args: tuple, kwargs: dict, name: str) -> tuple[Spec, list[torch.Tensor]]:
    """Flatten one call's arguments. Keyword order does not matter to Python, so it does not make a new graph."""
    return flatten({"args": list(args), "kwargs": dict(sorted(kwargs.items()))}, path=f"{name} inputs")


def unflatten(spec: Spec, tensors: list[Any], rebuild_classes: bool = True) -> Any:
    """Inverse of :func:`flatten`. With ``rebuild_classes=False`` dataclasses/ModelOutputs come back as dicts."""

    def build(node: Spec) -> Any:
        t = node["t"]
        if t == "tensor":
            return tensors[node["i"]]
        if t == "const":
            return node["v"]
        if t == "tuple":
            return tuple(build(c) for c in node["c"])
        if t == "list":
            return [build(c) for c in node["c"]]
        if t == "namedtuple":
            items = [build(c) for c in node["c"]]
            cls = _resolve_class(node["cls"]) if rebuild_classes else None
            return cls(*items) if cls is not None else tuple(items)
        if t in ("dict", "dataclass"):
            values = {k: build(c) for k, c in zip(node["k"], node["c"])}
            cls = _resolve_class(node["cls"]) if rebuild_classes and "cls" in node else None
            return cls(**values) if cls is not None else values
        raise ValueError(f"unknown spec node {t!r}")

    return build(spec)


def describe(tree: Any) -> str:
    """A short description of a pytree's structure for error messages, e.g. ``dict(last_hidden_state=Tensor)``."""
    if isinstance(tree, torch.Tensor):
        return "Tensor"
    if isinstance(tree, dict):
        inner = ", ".join(f"{k}={describe(v)}" for k, v in list(tree.items())[:6])
        return f"{type(tree).__name__}({inner}{', ...' if len(tree) > 6 else ''})"
    if isinstance(tree, (tuple, list)):
        inner = ", ".join(describe(v) for v in list(tree)[:6])
        return f"{type(tree).__name__}[{inner}{', ...' if len(tree) > 6 else ''}]"
    return type(tree).__name__


def check_output_mapping(name: str, mapping: Callable, structured: Any) -> None:
    """Call a module's ``output_mapping`` on what its optimized runners will hand it; raise CaptureError naming
    the module when it fails, before anything is built."""
    try:
        mapping(structured)
    except Exception as exc:  # noqa: BLE001 - any failure of the user's function is reported the same way
        raise CaptureError(
            f"output_mapping of module {name!r} raised {type(exc).__name__}: {exc} when given the output the optimized "
            f"module returns: {describe(structured)}. output_mapping receives the module's output structure with HF "
            "ModelOutputs and dataclasses as plain dicts (e.g. lambda o: BaseModelOutputWithPooling(**o)); fix the "
            "function or leave output_mapping out."
        ) from exc


def spec_key(spec: Spec, tensors: list[torch.Tensor]) -> str:
    """A stable id of an input structure: the spec plus each tensor's dtype, rank and device type."""
    meta = [[str(t.dtype).removeprefix("torch."), t.dim(), t.device.type] for t in tensors]
    text = json.dumps([spec, meta], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def split_sample(sample: Any) -> tuple[tuple, dict]:
    """A dataloader sample as call arguments: a tuple/list is positional args (a trailing dict is kwargs),
    a dict alone is kwargs, anything else is one positional argument."""
    if isinstance(sample, dict):
        return (), dict(sample)
    if isinstance(sample, (tuple, list)):
        items = list(sample)
        if items and isinstance(items[-1], dict):
            return tuple(items[:-1]), dict(items[-1])
        return tuple(items), {}
    return (sample,), {}


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

    def to_json(self) -> dict:
        return {
            "key": self.key, "input_spec": self.input_spec, "output_spec": self.output_spec,
            "inputs": [dataclasses.asdict(t) for t in self.inputs],
            "outputs": [dataclasses.asdict(t) for t in self.outputs],
            "batching": self.batching, "calls": self.calls,
        }

    @classmethod
    def from_json(cls, data: dict) -> "Graph":
        return cls(
            key=data["key"], input_spec=data["input_spec"], output_spec=data["output_spec"],
            inputs=[TensorSpec(**t) for t in data["inputs"]], outputs=[TensorSpec(**t) for t in data["outputs"]],
            batching=data["batching"], calls=data.get("calls", 0),
        )

    def dynamic_axes(self, max_batch_size: int) -> list[dict[int, tuple[int, int]]]:
        """Per input tensor: ``{axis: (min, max)}`` for every axis that varies (batch axis 0 when batching)."""
        result = []
        for t in self.inputs:
            axes = {a: (t.min_shape[a], t.max_shape[a]) for a in t.dynamic_axes}
            if self.batching and t.min_shape:
                axes[0] = (1, max(max_batch_size, t.max_shape[0]))
            result.append(axes)
        return result

    def accepts(self, tensors: list[torch.Tensor], max_batch_size: int) -> Optional[str]:
        """None when the runner built for this graph can take these inputs, else the reason it cannot."""
        if len(tensors) != len(self.inputs):
            return f"expected {len(self.inputs)} tensors, got {len(tensors)}"
        for i, (t, spec) in enumerate(zip(tensors, self.inputs)):
            if str(t.dtype).removeprefix("torch.") != spec.dtype:
                return f"input {i}: dtype {t.dtype} differs from captured {spec.dtype}"
            if t.device.type != torch.device(spec.device).type:
                return f"input {i}: device {t.device} differs from captured {spec.device}"
            if t.dim() != len(spec.min_shape):
                return f"input {i}: rank {t.dim()} differs from captured rank {len(spec.min_shape)}"
            for axis, size in enumerate(t.shape):
                lo, hi = spec.min_shape[axis], spec.max_shape[axis]
                if self.batching and axis == 0:
                    lo, hi = 1, max(max_batch_size, hi)
                if not lo <= size <= hi:
                    return f"input {i}: size {size} of axis {axis} is outside the captured range [{lo}, {hi}]"
        return None


def _batch_size_of(inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> Optional[int]:
    """The common size of axis 0 of every input and output tensor with one, or None when there is none.

    0-d tensors (a diffusion UNet's timestep) have no batch axis and do not stop the others from batching."""
    batched_inputs = [t for t in inputs if t.dim() > 0]
    sizes = {t.shape[0] for t in batched_inputs + [t for t in outputs if t.dim() > 0]}
    if len(sizes) == 1 and batched_inputs and all(t.dim() > 0 for t in outputs):
        return sizes.pop()
    return None


class Recorder:
    """Collects the calls of one wrapped module into graphs while ``nav.optimize`` runs the callable."""

    def __init__(self, name: str, sample_count: int, batching: Optional[bool]):
        self.name = name
        self.sample_count = sample_count
        self.batching = batching
        self.graphs: dict[str, Graph] = {}
        self._batch_consistent: dict[str, bool] = {}

    def _output_mapping(self) -> Optional[Callable]:
        from navdeploy.module import _REGISTRY  # late: navdeploy.module imports this module

        module = _REGISTRY.get(self.name)
        return getattr(module, "_self_output_mapping", None) if module is not None else None

    def record(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """Run the eager call and remember its inputs and outputs (``input_mapping`` was applied by the proxy)."""
        in_spec, inputs = flatten_call(args, kwargs, self.name)
        output = fn(*args, **kwargs)
        out_spec, outputs = flatten(output, path=f"{self.name} outputs", outputs=True)
        if not outputs:
            raise CaptureError(f"module {self.name!r} returned no tensors ({describe(output)}); nothing to optimize. "
                               "Wrap only the part of it that computes tensors, or do not wrap it with nav.Module.")
        key = spec_key(in_spec, inputs)
        graph = self.graphs.get(key)
        if graph is None:
            mapping = self._output_mapping()
            if mapping is not None:
                check_output_mapping(self.name, mapping, unflatten(out_spec, outputs, rebuild_classes=False))
            graph = Graph(key, in_spec, out_spec, [TensorSpec.of(t) for t in inputs],
                          [TensorSpec.of(t) for t in outputs], batching=False)
            self.graphs[key] = graph
            self._batch_consistent[key] = True
        elif len(outputs) != len(graph.outputs):
            raise CaptureError(f"module {self.name!r}: calls with the same input structure returned different "
                               "output structures; navdeploy needs the output structure to follow from the inputs.")
        for spec, t in zip(graph.inputs, inputs):
            spec.update(list(t.shape))
        for spec, t in zip(graph.outputs, outputs):
            spec.update(list(t.shape))
        graph.calls += 1
        if _batch_size_of(inputs, outputs) is None:
            self._batch_consistent[key] = False
        self._keep(graph, inputs, outputs)
        return output

    def _keep(self, graph: Graph, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        shapes = [tuple(t.shape) for t in inputs]
        kept = [[tuple(t.shape) for t in s.inputs] for s in graph.samples]
        new_shape = shapes not in kept
        if len(graph.samples) >= self.sample_count:
            if not new_shape:
                return
            # Prefer shape variety: replace the newest sample whose shapes repeat an earlier one.
            dupes = [i for i in range(len(kept)) if kept[i] in kept[:i]]
            if not dupes:
                return
            graph.samples.pop(dupes[-1])
        graph.samples.append(Sample([t.detach().clone() for t in inputs], [t.detach().clone() for t in outputs]))

    def finish(self) -> list[Graph]:
        """The graphs, with batching decided and opt shapes set from the first kept sample."""
        for key, graph in self.graphs.items():
            consistent = self._batch_consistent[key]
            graph.batching = consistent if self.batching is None else (self.batching and consistent)
            for spec, t in zip(graph.inputs, graph.samples[0].inputs):
                spec.opt_shape = list(t.shape)
            for spec, t in zip(graph.outputs, graph.samples[0].outputs):
                spec.opt_shape = list(t.shape)
        return list(self.graphs.values())
