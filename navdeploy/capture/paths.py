"""Names for the parts of a captured call, for messages: which argument a flat tensor is (``tensor_paths``), and
how a call differs from the calls captured for a module (``call_difference``)."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

from navdeploy.capture.pytree import Spec

_MAX_SHOWN = 60  # characters of one value shown in a message


def tensor_paths(spec: Spec) -> list[str]:
    """A readable path for each tensor of a flattened call or output, in flatten order: ``input_ids`` (a keyword),
    ``args[0]``, ``past_key_values.layers[1].keys``, ``logits`` (an output field), ``[2]`` (an output tuple)."""
    paths: list[str] = []

    def walk(node: Spec, where: str) -> None:
        t = node.get("t") if isinstance(node, dict) else None
        if t == "tensor":
            paths.append(where or "output")
        elif t in ("tuple", "list", "namedtuple"):
            for i, child in enumerate(node["c"]):
                walk(child, f"{where}[{i}]")
        elif t in ("dict", "dataclass", "hfcache"):
            for k, child in zip(node["k"], node["c"]):
                walk(child, f"{where}.{k}" if where else str(k))

    if _is_call(spec):
        for i, child in enumerate(spec["c"][0]["c"]):
            walk(child, f"args[{i}]")
        for k, child in zip(spec["c"][1]["k"], spec["c"][1]["c"]):
            walk(child, k)
    else:
        walk(spec, "")
    return paths


def call_difference(spec: Spec, tensors: Sequence[torch.Tensor], captured: Sequence[tuple[Spec, Sequence[Any]]]) -> str:
    """How a call (its flatten ``spec`` and tensors) differs from the nearest of the ``captured`` calls (each an input
    spec and its :class:`~navdeploy.capture.graph.TensorSpec` list), e.g. ``keyword attention_mask is not passed
    here (the captured calls pass it)``."""
    if not _is_call(spec) or not captured:
        return "no call of this structure was captured"
    here = _arguments(spec, [_tensor_kind(str(t.dtype).removeprefix("torch."), t.dim()) for t in tensors])
    nearest: Optional[tuple[int, dict]] = None
    for other_spec, inputs in captured:
        if not _is_call(other_spec):
            continue
        other = _arguments(other_spec, [_tensor_kind(s.dtype, len(s.min_shape)) for s in inputs])
        distance = len(set(here) ^ set(other)) + sum(here[k] != other[k] for k in set(here) & set(other))
        if nearest is None or distance < nearest[0]:
            nearest = (distance, other)
    if nearest is None:
        return "no call of this structure was captured"
    other = nearest[1]
    positional_here = sum(k.startswith("args[") for k in here)
    positional_there = sum(k.startswith("args[") for k in other)
    if positional_here != positional_there:
        return f"{positional_here} positional argument(s) here, {positional_there} in the captured calls"
    missing = sorted(set(other) - set(here))
    new = sorted(set(here) - set(other))
    parts = []
    if missing:
        parts.append(f"keyword {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not passed here "
                     "(the captured calls pass it)")
    if new:
        parts.append(f"keyword {', '.join(new)} {'is' if len(new) == 1 else 'are'} new here")
    if parts:
        return "; ".join(parts)
    for name in here:
        found = _first_difference(here[name], other[name], name)
        if found is not None:
            where, mine, theirs = found
            return f"{where}: {_show(mine)} here, {_show(theirs)} in the captured calls"
    return "the same arguments as a captured call, in another structure"


def _is_call(spec: Spec) -> bool:
    return isinstance(spec, dict) and spec.get("t") == "dict" and spec.get("k") == ["args", "kwargs"]


def _tensor_kind(dtype: str, rank: int) -> tuple:
    return ("tensor", dtype, rank)


def _arguments(spec: Spec, kinds: list[tuple]) -> dict[str, tuple]:
    """Each top-level argument of a call spec as a plain tuple tree: ``("tensor", dtype, rank)``, ``("value", v)``,
    ``("seq", kind, children)`` or ``("map", class, ((key, child), ...))``. Two calls then compare by what makes
    them different graphs, not by where their tensors sit in the flat list."""

    def plain(node: Spec) -> tuple:
        t = node["t"]
        if t == "tensor":
            return kinds[node["i"]]
        if t in ("const", "device"):
            return ("value", node["v"])
        if t in ("tuple", "list", "namedtuple"):
            return ("seq", node.get("cls", t), tuple(plain(c) for c in node["c"]))
        return ("map", node.get("cls", t), tuple((k, plain(c)) for k, c in zip(node["k"], node["c"])))

    arguments = {f"args[{i}]": plain(c) for i, c in enumerate(spec["c"][0]["c"])}
    arguments.update({k: plain(c) for k, c in zip(spec["c"][1]["k"], spec["c"][1]["c"])})
    return arguments


def _first_difference(a: tuple, b: tuple, where: str) -> Optional[tuple[str, tuple, tuple]]:
    """The path of the first place two plain arguments differ, and the two values there."""
    if a == b:
        return None
    if a[0] == b[0] == "seq" and a[1] == b[1] and len(a[2]) == len(b[2]):
        for i, (x, y) in enumerate(zip(a[2], b[2])):
            found = _first_difference(x, y, f"{where}[{i}]")
            if found is not None:
                return found
    if a[0] == b[0] == "map" and a[1] == b[1] and [k for k, _ in a[2]] == [k for k, _ in b[2]]:
        for (k, x), (_, y) in zip(a[2], b[2]):
            found = _first_difference(x, y, f"{where}.{k}")
            if found is not None:
                return found
    return where, a, b


def _show(value: tuple) -> str:
    if value[0] == "tensor":
        return f"a {value[1]} tensor of rank {value[2]}"
    if value[0] == "value":
        text = repr(value[1])
    else:
        kind = str(value[1]).rsplit(":", 1)[-1]
        text = f"a {kind} of {len(value[2])}"
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN - 3] + "..."
