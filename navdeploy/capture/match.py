"""Whether a call has exactly the structure of a spec :func:`navdeploy.capture.pytree.flatten_call` made, and its
tensors if so, without building a new spec.

An optimized decoder is called once per generated token with the same structure (a cache of the same layers,
the same constants), only the tensors change. Checking the call against the spec of the previous one allocates
nothing per node and needs no hashing, where flattening it again builds a dict per node and pickles the result.
A match means ``flatten_call`` would return an equal spec: every node type, constant (type and value), key
order and class is compared; anything this does not cover answers no match, and the caller flattens the call."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch

from navdeploy.capture.classes import class_path
from navdeploy.capture.hf_cache import cache_class_path

Spec = Any
_PLAIN_DICTS = (dict, OrderedDict)


def match_call(spec: Spec, args: tuple, kwargs: dict) -> Optional[list[torch.Tensor]]:
    """The call's tensors in flatten order when ``flatten_call(args, kwargs, ...)`` would give ``spec``; else None."""
    tensors: list[torch.Tensor] = []
    tree = {"args": list(args), "kwargs": dict(sorted(kwargs.items()))}
    return tensors if _match(spec, tree, tensors) else None


def _match(node: Spec, value: Any, tensors: list[torch.Tensor]) -> bool:
    kind = node["t"]
    if kind == "tensor":
        if isinstance(value, torch.Tensor):
            tensors.append(value)
            return True
        return False
    if kind == "const":
        expected = node["v"]
        if type(value) is not type(expected):
            return False
        # -0.0 == 0.0, yet they are different constants of a traced graph (and of spec_key's JSON).
        return value == expected and (type(value) is not float or repr(value) == repr(expected))
    if kind in ("list", "tuple"):
        children = node["c"]
        if type(value) is not (list if kind == "list" else tuple) or len(value) != len(children):
            return False
        return all(_match(child, item, tensors) for child, item in zip(children, value))
    if kind == "dict":
        if "cls" in node or type(value) not in _PLAIN_DICTS or list(value) != node["k"]:
            return False
        return all(_match(child, value[k], tensors) for k, child in zip(node["k"], node["c"]))
    if kind == "hfcache":
        if cache_class_path(type(value)) != node["cls"]:
            return False
        attributes = vars(value)
        if list(attributes) != node["k"]:
            return False
        return all(_match(child, attributes[k], tensors) for k, child in zip(node["k"], node["c"]))
    if kind == "device":
        return type(value) is torch.device and str(value) == node["v"]
    if kind == "dtype":
        return isinstance(value, torch.dtype) and str(value).removeprefix("torch.") == node["v"]
    if kind == "class":
        return isinstance(value, type) and class_path(value) == node["v"]
    return False  # namedtuples, dataclasses, classes with a "cls": flattened again
