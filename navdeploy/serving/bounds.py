"""Request bounds: the largest request ``nav.serve`` accepts, checked on the shapes a request *declares*, before
anything is allocated for it.

tritonserver 2.51 (the one inside nvidia-pytriton 0.7) allocates an HTTP JSON input from its declared shape
before it looks at the model's config: one request declaring ``[1, 2**40]`` FP32 elements ends the server with
``std::bad_alloc``, whatever the config's dims say (the HTTP ``--http-max-input-size`` limit arrived in 2.59).
:mod:`navdeploy.serving.guard` checks every HTTP inference request against these bounds first; the pipeline call
checks them again for gRPC requests (Triton sizes those from the bytes received, so they cannot crash it).

Bounds of each input, per axis: a fixed axis of its :class:`~navdeploy.serving.Tensor` is exactly its size; a
``-1`` axis is at most ``Tensor.max_shape`` (the user's) or the range captured for the wrapped module the tensor
is passed to (:func:`captured_max_shapes`), and otherwise only the byte limit bounds it; the batch axis is 1 to
``max_batch_size``. A whole request declares at most ``max_request_bytes`` (inputs and HTTP body alike).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:  # annotations only: specs imports nothing from here
    from navdeploy.serving.specs import Tensor


# What an HTTP request may be at most, decoded, and what its inputs may declare in all; Triton (2.59 and later)
# limits HTTP inputs to 64 MiB by default too.
DEFAULT_MAX_REQUEST_BYTES = 64 * 2**20

# The least a string element takes on the wire: its 4-byte length prefix.
_BYTES_ELEMENT_SIZE = 4


def triton_datatype(spec: Tensor) -> str:
    """The Triton datatype a request declares for this input (``FP32``, ``INT64``, ``BYTES``...)."""
    if spec.is_string:
        return "BYTES"
    from tritonclient.utils import np_to_triton_dtype

    return np_to_triton_dtype(np.dtype(spec.dtype).type)


@dataclass(frozen=True)
class InputBound:
    """What one input of a request may declare: its datatype, and per axis of one item the largest size
    (``fixed`` axes exactly that size; ``None`` where only the byte limit bounds the axis)."""

    name: str
    datatype: str
    itemsize: int
    max_item_shape: tuple[Optional[int], ...]
    fixed: tuple[bool, ...]
    optional: bool = False

    @classmethod
    def of(cls, spec: Tensor, captured: Optional[Sequence[int]] = None) -> "InputBound":
        """The bound of ``spec``; ``captured`` (per item axis) bounds the ``-1`` axes ``max_shape`` leaves open."""
        limits = spec.max_shape or tuple(-1 for _ in spec.shape)
        if captured is not None and len(captured) != len(spec.shape):
            captured = None  # another rank than the served tensor: the capture does not describe this input
        item: list[Optional[int]] = []
        for axis, (size, limit) in enumerate(zip(spec.shape, limits)):
            if size != -1:
                item.append(size)
            elif limit != -1:
                item.append(limit)
            else:
                item.append(captured[axis] if captured is not None else None)
        datatype = triton_datatype(spec)
        itemsize = _BYTES_ELEMENT_SIZE if spec.is_string else np.dtype(spec.dtype).itemsize
        return cls(spec.name, datatype, itemsize, tuple(item), tuple(s != -1 for s in spec.shape), spec.optional)


@dataclass(frozen=True)
class RequestBounds:
    """The bounds of every input of one served model; ``max_batch_size`` 0: no batch axis."""

    inputs: Mapping[str, InputBound]
    max_batch_size: int
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES

    @classmethod
    def of(cls, inputs: Sequence[Tensor], max_batch_size: int, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
           captured: Optional[Mapping[str, Sequence[int]]] = None) -> "RequestBounds":
        """The bounds of the served ``inputs``; ``captured`` maps input names to captured per-item max shapes."""
        captured = captured or {}
        return cls({t.name: InputBound.of(t, captured.get(t.name)) for t in inputs}, max_batch_size,
                   max_request_bytes)

    def shape_problem(self, name: str, shape: Sequence[Any]) -> Optional[str]:
        """Why input ``name`` may not have the (declared) ``shape``, batch axis included when batching; or None."""
        bound = self.inputs[name]
        batched = self.max_batch_size > 0
        rank = len(bound.max_item_shape) + batched
        if not isinstance(shape, (list, tuple)) or not all(type(s) is int for s in shape):
            return f"input {name!r}: shape {shape!r} is not a list of integers."
        if len(shape) != rank:
            return (f"input {name!r}: shape {list(shape)} has {len(shape)} axes; the model takes {rank} "
                    f"({self._layout(bound)}).")
        if any(s < 1 for s in shape):
            return f"input {name!r}: shape {list(shape)} has an axis of size < 1; every size must be >= 1."
        if batched and shape[0] > self.max_batch_size:
            return (f"input {name!r}: batch of {shape[0]} in shape {list(shape)}; the model takes batches of at "
                    f"most {self.max_batch_size} (max_batch_size).")
        for axis, (size, limit, fixed) in enumerate(zip(shape[batched:], bound.max_item_shape, bound.fixed)):
            if limit is None or size == limit or (size < limit and not fixed):
                continue
            where = f"axis {axis + batched} of shape {list(shape)}"
            if fixed:
                return f"input {name!r}: {where} is {size}; the model takes exactly {limit} there."
            return (f"input {name!r}: {where} is {size}, over its bound of {limit} (Tensor max_shape or the "
                    "captured range of the module it feeds; raise max_shape to serve larger inputs).")
        return None

    def _layout(self, bound: InputBound) -> str:
        item = ", ".join("any" if s is None else (str(s) if f else f"<={s}")
                         for s, f in zip(bound.max_item_shape, bound.fixed))
        return f"[batch <= {self.max_batch_size}, {item}]" if self.max_batch_size > 0 else f"[{item}]"

    def declared_bytes(self, name: str, shape: Sequence[int]) -> int:
        """The bytes an input of this shape takes at least (strings: 4 per element)."""
        return math.prod(shape) * self.inputs[name].itemsize

    def request_problem(self, header: Any, body_bytes: int) -> Optional[str]:
        """Why the JSON header of an HTTP inference request must not reach the server, or None.

        ``body_bytes``: the size of the decoded body (the JSON header and any binary data after it)."""
        if not isinstance(header, dict) or not isinstance(header.get("inputs"), list):
            return "the request is not a JSON object with an 'inputs' list (the KServe v2 inference protocol)."
        total = 0
        seen = set()
        for entry in header["inputs"]:
            if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
                return "every entry of 'inputs' must be an object with a 'name'."
            name = entry["name"]
            if name not in self.inputs:
                return f"unknown input {name!r}; the model takes {sorted(self.inputs)}."
            if name in seen:
                return f"input {name!r} is given twice."
            seen.add(name)
            bound = self.inputs[name]
            if entry.get("datatype") != bound.datatype:
                return f"input {name!r}: datatype {entry.get('datatype')!r}; the model takes {bound.datatype}."
            shape = entry.get("shape")
            problem = self.shape_problem(name, shape)
            if problem:
                return problem
            declared = self.declared_bytes(name, shape)
            total += declared
            if total > self.max_request_bytes:
                return (f"input {name!r}: shape {shape} declares {declared} bytes; a request may declare at most "
                        f"{self.max_request_bytes} in all (nav.serve's max_request_bytes).")
            problem = _data_problem(entry, bound, math.prod(shape), declared, body_bytes)
            if problem:
                return problem
        missing = [n for n, b in self.inputs.items() if not b.optional and n not in seen]
        if missing:
            return f"missing input(s) {missing}; the model takes {sorted(self.inputs)}."
        return None


def _data_problem(entry: dict, bound: InputBound, elements: int, declared: int, body_bytes: int) -> Optional[str]:
    """Whether the data an input carries agrees with its declared shape (Triton would find out only after it
    allocated the declared size)."""
    name = entry["name"]
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        return f"input {name!r}: 'parameters' must be an object."
    if "shared_memory_region" in parameters:
        return None  # Triton maps the registered region; nothing is allocated from the shape
    if "binary_data_size" in parameters:
        size = parameters["binary_data_size"]
        if type(size) is not int or size < 0 or size > body_bytes:
            return f"input {name!r}: binary_data_size {size!r} does not fit the request body ({body_bytes} bytes)."
        if bound.datatype != "BYTES" and size != declared:
            return (f"input {name!r}: shape {entry['shape']} of {bound.datatype} takes {declared} bytes; "
                    f"binary_data_size says {size}.")
        return None
    data = entry.get("data")
    if data is None:
        return f"input {name!r} has neither 'data' nor binary data."
    count = _leaf_count(data)
    if count != elements:
        return f"input {name!r}: shape {entry['shape']} declares {elements} elements; 'data' holds {count}."
    return None


def _leaf_count(data: Any) -> int:
    """The number of values in a (nested) JSON array, without recursion."""
    if not isinstance(data, list):
        return 1
    count, stack = 0, [data]
    while stack:
        node = stack.pop()
        for item in node:
            if isinstance(item, list):
                stack.append(item)
            else:
                count += 1
    return count


# --- bounds from the captured calls of a wrapped module ---------------------------------------------------------
def captured_max_shapes(module: Any, workspace: Optional[Any] = None) -> dict[str, tuple[int, ...]]:
    """Per argument of a wrapped module's forward that was a plain tensor in every captured call: the largest
    size of each axis of one item (axis 0 dropped when the module batches) over those calls, from its manifest.

    For ``Tensor(..., max_shape=captured_max_shapes(pipe.encoder)["input_ids"])`` where a served input goes to
    that argument; ``nav.serve`` applies them itself when the served callable is the wrapped module. Returns
    ``{}`` for anything that is not an optimized ``nav.Module`` (``workspace``: as for ``nav.load_optimized``)."""
    state = getattr(module, "nav_state", None)
    if state is None:
        return {}
    import inspect
    from pathlib import Path

    from navdeploy.config import resolve_workspace
    from navdeploy.workspace.layout import module_dir
    from navdeploy.workspace.manifest import load_manifest

    ws = Path(workspace) if workspace is not None else resolve_workspace(module.optimize_config)
    manifest, _ = load_manifest(module_dir(ws, state.name))
    if manifest is None:
        return {}
    try:
        forward = getattr(module.__wrapped__, state.forward_func or "forward")
        names = [p.name for p in inspect.signature(forward).parameters.values()
                 if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (AttributeError, TypeError, ValueError):
        names = []
    shapes: dict[str, list[tuple[int, ...]]] = {}
    graphs = [e.graph for e in manifest.graphs.values() if e.graph is not None]
    for graph in graphs:
        for name, index in _tensor_arguments(graph.input_spec, names).items():
            shape = graph.inputs[index].max_shape[1:] if graph.batching else graph.inputs[index].max_shape
            shapes.setdefault(name, []).append(tuple(shape))
    return {name: tuple(max(axis) for axis in zip(*found)) for name, found in shapes.items()
            if len(found) == len(graphs) and len({len(s) for s in found}) == 1}


def _tensor_arguments(spec: Any, positional_names: Sequence[str]) -> dict[str, int]:
    """Argument name -> flat tensor index, for the arguments of a captured call that are plain tensors."""
    if not (isinstance(spec, dict) and spec.get("t") == "dict" and spec.get("k") == ["args", "kwargs"]):
        return {}
    args, kwargs = spec["c"]
    found = {}
    for name, node in zip(positional_names, args.get("c", [])):
        if node.get("t") == "tensor":
            found[name] = node["i"]
    for name, node in zip(kwargs.get("k", []), kwargs.get("c", [])):
        if node.get("t") == "tensor":
            found[name] = node["i"]
    return found
