"""Hashes: a module's weights and code (fingerprint), an artifact folder (checksum), a cache key."""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import threading
from pathlib import Path
from typing import Any, Optional

import torch

log = logging.getLogger("navdeploy")
# inspect.getsource parses the class's file (ast.parse); on Python 3.11 two threads parsing at once can fail with
# "SystemError: AST constructor recursion depth mismatch" (CPython gh-106905), as two modules optimized side by side
# did while hashing their classes.
_SOURCE_LOCK = threading.Lock()


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    data = tensor.detach()
    if data.is_quantized:
        data = data.int_repr()
    if data.layout != torch.strided:
        data = data.to_dense()
    data = data.cpu().contiguous().reshape(-1)
    if not data.numel():
        return b""
    return data.view(torch.uint8).numpy().tobytes()  # raw bytes: any dtype (bf16, fp8, bool) hashes exactly


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of the module's class, source and weights: any fine-tuning, added parameter (LoRA) or code
    change alters it. Non-persistent buffers (absent from ``state_dict``) count too."""
    h = hashlib.sha256()
    cls = type(module)
    h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    with contextlib.suppress(OSError, TypeError), _SOURCE_LOCK:
        h.update(inspect.getsource(cls).encode())
    state = module.state_dict(keep_vars=True)
    extra = [(f"[buffer]{name}", b) for name, b in module.named_buffers() if name not in state]
    for name, value in [*state.items(), *extra]:
        _hash_value(h, name, value)
    return h.hexdigest()


def _hash_value(h: "hashlib._Hash", name: str, value: Any, seen: Optional[set[int]] = None) -> None:
    """Tensors by their bytes, also inside containers: quantized modules keep their weights as a tuple of
    tensors (``_packed_params``) or as TorchScript objects (quantized LSTM), whose repr would summarise large
    tensors or show an address, so that a changed value is missed or an unchanged module never matches."""
    seen = set() if seen is None else seen
    if isinstance(value, torch.Tensor):
        h.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        if value.is_quantized:
            if value.qscheme() in (torch.per_tensor_affine, torch.per_tensor_symmetric):
                h.update(f"{value.q_scale()}:{value.q_zero_point()}".encode())
            else:
                h.update(_tensor_bytes(value.q_per_channel_scales()) + _tensor_bytes(value.q_per_channel_zero_points()))
        h.update(_tensor_bytes(value))
        return
    if id(value) in seen:  # a container holding itself
        h.update(f"{name}:<cycle>".encode())
        return
    if isinstance(value, (tuple, list, dict, torch.ScriptObject)):
        seen.add(id(value))
    if isinstance(value, (tuple, list)):
        h.update(f"{name}:{type(value).__name__}:{len(value)}".encode())
        for i, item in enumerate(value):
            _hash_value(h, f"{name}.{i}", item, seen)
    elif isinstance(value, dict):
        h.update(f"{name}:dict:{len(value)}".encode())
        for key in sorted(value, key=repr):
            _hash_value(h, f"{name}.{key!r}", value[key], seen)
    elif isinstance(value, torch.ScriptObject) and hasattr(value, "__getstate__"):
        h.update(f"{name}:ScriptObject".encode())
        _hash_value(h, f"{name}.state", value.__getstate__(), seen)
    else:  # get_extra_state() may put any object in a state_dict
        text = repr(value)
        # An address in a repr differs per process: it would make every load see a "changed" module.
        h.update(f"{name}:{type(value).__qualname__ if ' at 0x' in text else text}".encode())


def checksum(folder: Path) -> str:
    """A hash of every file in a folder (names and bytes)."""
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def cache_key(*parts: Any) -> str:
    """A stable hash of JSON-able parts."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
