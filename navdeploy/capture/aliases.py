"""What a call returns or changes of its own inputs. An HF model given a cache updates it (new layers, longer
keys/values, or the same tensors written in place) and returns that same object; the optimized call must too.

The spec carries it: an input tensor node gets ``"m": true`` when eager changed that tensor in place (the flat
module traced by exporters copies it first, so artifacts never write into their inputs); an output cache node
gets ``"alias": path`` (the spec path of the input cache it is), an output tensor node ``"in": i`` (it is input
tensor ``i``, plus ``"m"`` when that one was changed in place). A spec path is the child index taken at each node
from the call's root."""

from __future__ import annotations

from typing import Any, Iterator, NamedTuple

import torch

Spec = Any


class LiveCall(NamedTuple):
    """The call an output is rebuilt for: its input spec, arguments and flat tensors."""

    spec: Spec
    args: tuple
    kwargs: dict
    tensors: list[torch.Tensor]

    def follow(self, path: list[int]) -> Any:
        """The argument at spec path ``path`` (the call matched the spec, so every step exists)."""
        return follow(self.spec, {"args": self.args, "kwargs": self.kwargs}, path)


def follow(spec: Spec, tree: Any, path: list[int]) -> Any:
    """The value of ``tree`` at spec path ``path``."""
    node = spec
    for step in path:
        kind = node["t"]
        if kind in ("dict", "dataclass"):
            key = node["k"][step]
            tree = tree[key] if kind == "dict" else getattr(tree, key)
        else:  # tuple, list, namedtuple
            tree = tree[step]
        node = node["c"][step]
    return tree


def _step(node: Spec, step: int) -> str:
    """How a spec step reads in an argument path: ``['key']``, ``[0]``, ``.field``."""
    if node["t"] == "dict":
        return f"[{node['k'][step]!r}]"
    return f".{node['k'][step]}" if "k" in node else f"[{step}]"  # attributes (dataclass, cache) or positions


def _node_at(spec: Spec, path: list[int]) -> tuple[Spec, str]:
    node, where = spec, ""
    for step in path:
        where += _step(node, step)
        node = node["c"][step]
    return node, where


def _caches(node: Spec, path: list[int]) -> Iterator[tuple[list[int], Spec]]:
    if node["t"] == "hfcache":
        yield path, node
        return
    for i, child in enumerate(node.get("c", ())):
        yield from _caches(child, [*path, i])


def cache_paths(spec: Spec) -> list[list[int]]:
    """Spec paths of the HF caches of a call (not of the ones nested in them)."""
    return [path for path, _ in _caches(spec, [])]


def tensor_nodes(node: Spec) -> Iterator[Spec]:
    """Every tensor node under ``node``."""
    if node["t"] == "tensor":
        yield node
        return
    for child in node.get("c", ()):
        yield from tensor_nodes(child)


def held_tensors(spec: Spec) -> list[int]:
    """Flat indices of the input tensors HF caches hold: the ones a call may change in place."""
    return [t["i"] for _, cache in _caches(spec, []) for t in tensor_nodes(cache)]


def input_aliases(spec: Spec, args: tuple, kwargs: dict, tensors: list[torch.Tensor]) -> dict[int, dict]:
    """For ``flatten(output, aliases=...)``: the id of each input cache and of each tensor it holds, mapped to the
    mark its output node gets when eager returns that very object."""
    aliases: dict[int, dict] = {}
    tree = {"args": args, "kwargs": kwargs}
    for path, cache in _caches(spec, []):
        aliases[id(follow(spec, tree, path))] = {"alias": path}
        for t in tensor_nodes(cache):
            aliases[id(tensors[t["i"]])] = {"in": t["i"]}
    return aliases


def returns_inputs(output_spec: Spec) -> bool:
    """Whether an output holds any of the call's inputs (caches or their tensors)."""
    if "alias" in output_spec or "in" in output_spec:
        return True
    return any(returns_inputs(child) for child in output_spec.get("c", ()))


def counters(input_spec: Spec, output_spec: Spec) -> list[str]:
    """The Python ints an input cache holds that the call changed, as ``path: old -> new``. A sliding-window
    layer counts the tokens it has seen in one: every call then has a structure of its own, a graph of its own."""
    found: list[str] = []

    def compare(before: Spec, after: Spec, where: str) -> None:
        if before["t"] != after["t"]:
            return
        if before["t"] == "const":
            old, new = before["v"], after["v"]
            if type(old) is int and type(new) is int and old != new:
                found.append(f"{where}: {old} -> {new}")
            return
        if before["t"] in ("hfcache", "dict"):
            children = dict(zip(after["k"], after["c"]))
            for i, (key, child) in enumerate(zip(before["k"], before["c"])):
                if key in children:
                    compare(child, children[key], where + _step(before, i))
        elif before["t"] in ("list", "tuple"):
            for i, (child, other) in enumerate(zip(before["c"], after["c"])):
                compare(child, other, f"{where}[{i}]")

    for _, cache in _caches(output_spec, []):
        if "alias" in cache:
            before, where = _node_at(input_spec, cache["alias"])
            compare(before, cache, "inputs" + where)
    return found


def mark_changed(input_spec: Spec, output_spec: Spec, changed: set[int]) -> None:
    """Mark the input tensors a call changed in place, and the outputs that are those tensors."""
    for t in tensor_nodes(input_spec):
        if t["i"] in changed:
            t["m"] = True
    for t in tensor_nodes(output_spec):
        if t.get("in") in changed:
            t["m"] = True
