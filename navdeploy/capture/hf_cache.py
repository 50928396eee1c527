"""HF cache objects (``transformers.cache_utils``: ``DynamicCache``, ``StaticCache``, ``EncoderDecoderCache``,
their layers) as pytree nodes.

A cache is an object whose state (its ``__dict__``) holds tensors, constants (lengths, window sizes, flags), its
layers, the class it makes new layers from, a device. ``flatten_cache`` records the class path and that state;
``build_cache`` makes the object again as pickle does (``cls.__new__``, then the state; ``__init__`` does not run),
or writes the state into a live object: the cache a call was given and returns ends in the state eager leaves it
in, layer objects and lists included. transformers is never imported: a value is a cache only when
``transformers.cache_utils`` is loaded already (it is, wherever a cache exists), and classes resolve only from
loaded modules."""

from __future__ import annotations

import sys
from typing import Any, Callable, Optional

import torch

from navdeploy.capture.classes import class_path, resolve_class
from navdeploy.capture.where import Where

Spec = Any
_CACHE_MODULE = "transformers.cache_utils"
# A cache, and the layers it holds (attention, linear-attention/SSM, the data-less dummy layer).
_CACHE_BASES = ("Cache", "CacheLayerMixin", "LinearAttentionCacheLayerMixin", "DummyLayer")
_LEAVES = (torch.Tensor, str, int, float, bool, type(None))
_PLAIN = frozenset(_LEAVES)  # exact types: one set lookup
# type -> its class_path when it is a cache or layer class, else None (known once transformers loads)
_cache_paths: dict[type, Optional[str]] = {}


def _bases() -> tuple[type, ...]:
    module = sys.modules.get(_CACHE_MODULE)
    if module is None:
        return ()
    return tuple(cls for cls in (getattr(module, name, None) for name in _CACHE_BASES) if isinstance(cls, type))


def cache_class_path(cls: type) -> Optional[str]:
    """``class_path(cls)`` when ``cls`` is an HF cache or cache layer class, else None.

    Memoised by type: the bases are ABCs, and an isinstance check against them costs ~1 us, on every node of every
    optimized decoder step."""
    if cls in _cache_paths:
        return _cache_paths[cls]
    bases = _bases()
    path = class_path(cls) if bases and issubclass(cls, bases) else None
    if bases:  # before transformers loads no cache exists yet; its classes may come later
        _cache_paths[cls] = path
    return path


def is_cache(value: Any) -> bool:
    """Whether ``value`` is an HF cache or cache layer (False whenever transformers' cache module is not loaded)."""
    return cache_class_path(type(value)) is not None


def flatten_cache(cache: Any, leaf: Callable[[Any, Where], Spec], where: Where) -> Spec:
    """The spec of a cache: ``{"t": "hfcache", "cls": path, "k": attribute names, "c": their specs}``.

    Layers, lists, tuples, dicts (string or int keys: EncoderDecoderCache's ``is_updated``), devices, dtypes and
    classes inside it are walked here; anything else (tensors, constants) by ``leaf(value, where)``, which raises
    CaptureError for what cannot be captured (e.g. the CUDA stream of an offloading cache)."""

    def state(value: Any, at: Where) -> Spec:
        kind = type(value)
        if kind in _PLAIN:  # the most common values first: this runs on every optimized call
            return leaf(value, at)
        path = cache_class_path(kind)
        if path is not None:
            attributes = vars(value)
            names = list(attributes)
            return {"t": "hfcache", "cls": path, "k": names,
                    "c": [state(attributes[n], (at, ".{}", n)) for n in names]}
        if isinstance(value, _LEAVES):  # subclasses (a Parameter, an IntEnum)
            return leaf(value, at)
        if isinstance(value, torch.device):
            return {"t": "device", "v": str(value)}
        if isinstance(value, torch.dtype):
            return {"t": "dtype", "v": str(value).removeprefix("torch.")}
        if isinstance(value, type):
            return {"t": "class", "v": class_path(value)}
        if type(value) in (list, tuple):
            return {"t": type(value).__name__, "c": [state(v, (at, "[{}]", i)) for i, v in enumerate(value)]}
        if type(value) is dict and all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            return {"t": "dict", "k": list(value), "c": [state(v, (at, "[{!r}]", k)) for k, v in value.items()]}
        return leaf(value, at)

    return state(cache, where)


_resolved: dict[str, type] = {}  # class path -> class, once resolved (a class that resolves stays loaded)
_devices: dict[str, torch.device] = {}  # "cuda:0" -> torch.device("cuda:0"): devices are immutable


def build_cache(node: Spec, leaf: Callable[[Spec], Any], live: Optional[Any] = None) -> Any:
    """The cache of ``node`` (a ``flatten_cache`` spec); ``leaf(spec)`` builds tensors and constants.

    With ``live`` (the object of the same class the call was given) the state is written into it, and into its
    layers, lists and dicts, instead of new ones: whoever holds them sees what eager would have left there."""

    def resolve(path: str) -> type:
        cls = _resolved.get(path) or resolve_class(path)
        if cls is None:
            raise ValueError(f"cannot rebuild the HF cache class {path}: its module is not imported. Import "
                             "transformers (and the model's module) before calling the optimized module.")
        _resolved[path] = cls
        return cls

    def state(spec: Spec, current: Any) -> Any:
        kind = spec["t"]
        if kind == "tensor":  # the most common nodes first: this runs on every optimized decoder step
            value = leaf(spec)
            if type(value) is torch.Tensor and "in" not in spec and not value.is_contiguous():
                # HF caches hold contiguous tensors (torch.cat, torch.zeros make them); a runner may return a
                # strided one (AOTInductor does, for a prefill), which the next call passes back in: AOTInductor
                # checks input strides and torch.compile guards on them, so both would run eagerly or recompile.
                return value.contiguous()
            return value
        if kind == "const":
            return spec["v"]
        if kind == "hfcache":
            cls = resolve(spec["cls"])
            obj = current if type(current) is cls else cls.__new__(cls)
            attributes = vars(obj)
            values = {k: state(c, attributes.get(k)) for k, c in zip(spec["k"], spec["c"])}
            attributes.clear()
            attributes.update(values)
            return obj
        if kind == "device":
            device = _devices.get(spec["v"])
            if device is None:
                device = _devices[spec["v"]] = torch.device(spec["v"])
            return device
        if kind == "dtype":
            return getattr(torch, spec["v"])
        if kind == "class":
            return resolve(spec["v"])
        if kind in ("list", "tuple"):
            old = current if isinstance(current, (list, tuple)) else ()
            items = [state(c, old[i] if i < len(old) else None) for i, c in enumerate(spec["c"])]
            if kind == "tuple":
                return tuple(items)
            if type(current) is list:
                current[:] = items
                return current
            return items
        if kind == "dict" and "cls" not in spec:
            old = current if type(current) is dict else {}
            values = {k: state(c, old.get(k)) for k, c in zip(spec["k"], spec["c"])}
            if type(current) is dict:
                current.clear()
                current.update(values)
                return current
            return values
        return leaf(spec)

    return state(node, live)
