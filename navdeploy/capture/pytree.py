"""Module calls as pytrees: ``flatten`` splits ``(args, kwargs)`` or an output into a JSON-able
*spec* (containers, constants such as strings, placeholders for tensors) and the list of tensors; ``unflatten``
puts them back together."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

from navdeploy.capture.aliases import LiveCall
from navdeploy.capture.classes import class_path as _class_path
from navdeploy.capture.classes import resolve_class as _resolve_class
from navdeploy.capture.hf_cache import build_cache, flatten_cache, is_cache
from navdeploy.capture.where import Where, where_text
from navdeploy.errors import CaptureError

Spec = Any  # a JSON-able tree of dicts; see flatten()


_CONSTANT_TYPES = (str, int, float, bool, type(None))
_PLAIN_CONSTANTS = frozenset(_CONSTANT_TYPES)  # exact types: one set lookup before the isinstance checks


def _is_model_output(value: Any) -> bool:
    # HF ModelOutput is an OrderedDict and a dataclass; recognise it without importing transformers.
    return isinstance(value, OrderedDict) and dataclasses.is_dataclass(value)


def flatten(tree: Any, path: str = "inputs", outputs: bool = False,
            aliases: Optional[dict[int, dict]] = None) -> tuple[Spec, list[torch.Tensor]]:
    """Split a pytree into a JSON-able spec and its tensor leaves (in depth-first order).

    Supported nodes: tensors; str/int/float/bool/None constants; tuples, lists, named tuples;
    dicts with string keys; dataclasses and HF ``ModelOutput``s; HF cache objects (``DynamicCache``,
    ``StaticCache``, ``EncoderDecoderCache``, ...: see :mod:`navdeploy.capture.hf_cache`). Anything else raises
    :class:`CaptureError` naming the path of the offending value. ``aliases`` (from
    :func:`navdeploy.capture.aliases.input_aliases`) marks the nodes of an output that are the call's own inputs.
    """
    tensors: list[torch.Tensor] = []

    # ``where`` stays a chain of tuples (see capture.where) and becomes text only in an error: an optimized
    # decoder step walks its cache on every call, and formatting each node's path cost more than the walk.
    def walk(node: Any, where: Where) -> Spec:
        node_type = type(node)
        if node_type is torch.Tensor or (node_type not in _PLAIN_CONSTANTS and isinstance(node, torch.Tensor)):
            tensors.append(node)
            if aliases and id(node) in aliases:
                return {"t": "tensor", "i": len(tensors) - 1, **aliases[id(node)]}
            return {"t": "tensor", "i": len(tensors) - 1}
        if node_type in _PLAIN_CONSTANTS or isinstance(node, _CONSTANT_TYPES):
            return {"t": "const", "v": node}
        if isinstance(node, dict):
            for k in node:
                if not isinstance(k, str):
                    raise CaptureError(f"{where_text(where)}: dict key {k!r} is not a string; only string keys can "
                                       "be captured.")
            cls = type(node)
            spec = {"t": "dict", "k": list(node), "c": [walk(v, (where, "[{!r}]", k)) for k, v in node.items()]}
            if cls not in (dict, OrderedDict):
                spec["cls"] = _class_path(cls)
            return spec
        if isinstance(node, tuple) and hasattr(node, "_fields"):
            return {"t": "namedtuple", "cls": _class_path(type(node)),
                    "c": [walk(v, (where, ".{}", f)) for f, v in zip(node._fields, node)]}
        if isinstance(node, (tuple, list)):
            kind = "tuple" if isinstance(node, tuple) else "list"
            return {"t": kind, "c": [walk(v, (where, "[{}]", i)) for i, v in enumerate(node)]}
        if dataclasses.is_dataclass(node) and not isinstance(node, type):
            names = [f.name for f in dataclasses.fields(node) if f.init]
            return {"t": "dataclass", "cls": _class_path(type(node)), "k": names,
                    "c": [walk(getattr(node, n), (where, ".{}", n)) for n in names]}
        if is_cache(node):
            spec = flatten_cache(node, walk, where)
            if aliases and id(node) in aliases:
                spec.update(aliases[id(node)])
            return spec
        kind = f"{type(node).__module__}.{type(node).__qualname__}"
        supported = ("supported: tensors, str/int/float/bool/None, tuples, lists, dicts, dataclasses, HF ModelOutput, "
                     "HF cache objects")
        if outputs:
            raise CaptureError(
                f"{where_text(where)}: the module returned a value of type {kind}, which cannot be captured "
                f"({supported}). Wrap the module in a small nn.Module that returns tensors (or containers of them), "
                "and pass output_mapping= to nav.Module to rebuild your type from them."
            )
        raise CaptureError(
            f"{where_text(where)}: values of type {kind} cannot be captured ({supported}). "
            "Pass input_mapping= to nav.Module to turn it into tensors or constants."
        )

    return walk(tree, path), tensors


def flatten_call(args: tuple, kwargs: dict, name: str) -> tuple[Spec, list[torch.Tensor]]:
    """Flatten one call's arguments. Keyword order does not matter to Python, so it does not make a new graph."""
    return flatten({"args": list(args), "kwargs": dict(sorted(kwargs.items()))}, path=f"{name} inputs")


def unflatten(spec: Spec, tensors: list[Any], rebuild_classes: bool = True, call: Optional[LiveCall] = None) -> Any:
    """Inverse of :func:`flatten`. With ``rebuild_classes=False`` dataclasses/ModelOutputs come back as dicts
    (HF caches are always rebuilt).

    An input tensor eager changed in place (``"m"``) comes back as a copy. ``call``: the live call an output is
    rebuilt for; what eager returns of it (the HF cache it was given, tensors of it) is returned itself, brought
    to the new state (the cache's state written into it, a tensor changed in place copied into)."""

    def build(node: Spec) -> Any:
        t = node["t"]
        if t == "tensor":
            if len(node) == 2:  # no marks
                return tensors[node["i"]]
            if call is not None and "in" in node:
                live = call.tensors[node["in"]]
                if node.get("m") and live is not tensors[node["i"]]:
                    live.copy_(tensors[node["i"]])
                return live
            return tensors[node["i"]].clone() if node.get("m") else tensors[node["i"]]
        if t == "hfcache":
            live = call.follow(node["alias"]) if call is not None and "alias" in node else None
            return build_cache(node, build, live)
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


def tensors_at(spec: Spec, tree: Any) -> list[torch.Tensor]:
    """The tensors of ``tree`` where ``spec`` (the flatten spec of what eager returned) has them, in flatten order.

    What the spec holds as a constant is not read: a tracer hands out sizes as tensors (TorchScript) or symbolic
    ints (torch.export) where eager had ints, e.g. the batch size a StaticCache layer keeps."""
    found: list[torch.Tensor] = []

    def walk(node: Spec, value: Any) -> None:
        t = node["t"]
        if t == "tensor":
            found.append(value)
        elif t in ("tuple", "list", "namedtuple"):
            for i, child in enumerate(node["c"]):
                walk(child, value[i])
        elif t == "dict":
            for k, child in zip(node["k"], node["c"]):
                walk(child, value[k])
        elif t in ("dataclass", "hfcache"):
            state = vars(value) if t == "hfcache" else None
            for k, child in zip(node["k"], node["c"]):
                walk(child, state[k] if state is not None else getattr(value, k))

    walk(spec, tree)
    return found


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
    except Exception as exc:
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
