"""Whether a call has exactly the structure of a spec :func:`navdeploy.capture.pytree.flatten_call` made, and its
tensors if so, without building a new spec.

An optimized decoder is called once per generated token with the same structure (a cache of the same layers,
the same constants), only the tensors change. Checking the call against the spec of the previous one allocates
nothing per node and needs no hashing, where flattening it again builds a dict per node and pickles the result.
A match means ``flatten_call`` would return an equal spec: every node type, constant (type and value), key
order and class is compared; anything this does not cover answers no match, and the caller flattens the call."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Callable, Optional

import torch

from navdeploy.capture.classes import class_path
from navdeploy.capture.hf_cache import cache_class_path

Spec = Any
_PLAIN_DICTS = (dict, OrderedDict)


Matcher = Callable[[Any, list], bool]  # (value, tensors found so far) -> whether the value has the node's structure
CallMatcher = Callable[[tuple, dict], Optional[list[torch.Tensor]]]


def match_call(spec: Spec, args: tuple, kwargs: dict) -> Optional[list[torch.Tensor]]:
    """The call's tensors in flatten order when ``flatten_call(args, kwargs, ...)`` would give ``spec``; else None."""
    return call_matcher(spec)(args, kwargs)


def call_matcher(spec: Spec) -> CallMatcher:
    """``match_call`` for one spec, compiled once into a closure per node: a decoder step matched against its
    previous step's structure then reads no node's kind or keys from the spec, only the call's values."""
    match = _compile(spec)

    def match_tree(args: tuple, kwargs: dict) -> Optional[list[torch.Tensor]]:
        tensors: list[torch.Tensor] = []
        tree = {"args": list(args), "kwargs": dict(sorted(kwargs.items()))}  # as flatten_call builds it
        return tensors if match(tree, tensors) else None

    return match_tree


def _compile(node: Spec) -> Matcher:
    kind = node["t"]
    if kind == "tensor":
        def tensor(value: Any, tensors: list) -> bool:
            if isinstance(value, torch.Tensor):
                tensors.append(value)
                return True
            return False
        return tensor
    if kind == "const":
        expected = node["v"]
        expected_type = type(expected)
        if expected_type is float:
            # -0.0 == 0.0, yet they are different constants of a traced graph (and of spec_key's JSON).
            text = repr(expected)
            return lambda value, tensors: (type(value) is float and value == expected and repr(value) == text)
        return lambda value, tensors: type(value) is expected_type and value == expected
    if kind in ("list", "tuple"):
        container = list if kind == "list" else tuple
        children = [_compile(child) for child in node["c"]]
        size = len(children)

        def sequence(value: Any, tensors: list) -> bool:
            if type(value) is not container or len(value) != size:
                return False
            for child, item in zip(children, value):
                if not child(item, tensors):
                    return False
            return True
        return sequence
    if kind == "dict" and "cls" not in node:
        return _keyed(node, lambda value: value if type(value) in _PLAIN_DICTS else None)
    if kind == "hfcache":
        cls_path = node["cls"]
        return _keyed(node, lambda value: vars(value) if cache_class_path(type(value)) == cls_path else None)
    if kind == "device":
        device = node["v"]
        return lambda value, tensors: type(value) is torch.device and str(value) == device
    if kind == "dtype":
        dtype = node["v"]
        return lambda value, tensors: isinstance(value, torch.dtype) and str(value).removeprefix("torch.") == dtype
    if kind == "class":
        path = node["v"]
        return lambda value, tensors: isinstance(value, type) and class_path(value) == path
    return lambda value, tensors: False  # namedtuples, dataclasses, classes with a "cls": flattened again


def _keyed(node: Spec, items: Callable[[Any], Optional[dict]]) -> Matcher:
    """A node of named children: ``items(value)`` gives the value's mapping (a dict, a cache object's attributes),
    or None when the value is not of the node's kind. The keys must come in the spec's order."""
    keys = node["k"]
    pairs = list(zip(keys, [_compile(child) for child in node["c"]]))

    def keyed(value: Any, tensors: list) -> bool:
        mapping = items(value)
        if mapping is None or list(mapping) != keys:
            return False
        for key, child in pairs:
            if not child(mapping[key], tensors):
                return False
        return True
    return keyed
