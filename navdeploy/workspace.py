"""The on-disk workspace: one folder per module, a JSON manifest written last, atomic writes, locks,
cache keys and fingerprints.

    <workspace>/<module>/manifest.json      candidates, errors, metrics, selection per graph
    <workspace>/<module>/navdeploy.log      log of every optimize run of the module
    <workspace>/<module>/<graph>/samples.pt captured inputs + eager outputs (tensors only, weights_only load)
    <workspace>/<module>/<graph>/<format>/  the exported artifact of one format
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from filelock import FileLock, Timeout

from navdeploy.capture import Graph, Sample
from navdeploy.errors import WorkspaceError

log = logging.getLogger("navdeploy")
MANIFEST = "manifest.json"
LOG_FILE = "navdeploy.log"
MANIFEST_VERSION = 1


def module_dir(workspace: Path, name: str) -> Path:
    """The folder of one module."""
    return workspace / name


def ensure_writable(workspace: Path) -> None:
    """Create the workspace or raise a WorkspaceError that names the path and the fix."""
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workspace, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise WorkspaceError(f"workspace {str(workspace)!r} is not writable ({exc.strerror or exc}); pass "
                             "OptimizeConfig(workspace=...) or set NAVDEPLOY_WORKSPACE to a writable folder.") from exc


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON next to ``path`` and rename it into place: readers see the old or the new file, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_manifest(folder: Path) -> Optional[dict]:
    """The module's manifest, or None when absent or unreadable (a warning says which)."""
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict) or data.get("version") != MANIFEST_VERSION or "graphs" not in data:
            raise ValueError("unexpected content")
        return data
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable manifest %s (%s)", path, exc)
        return None


@contextlib.contextmanager
def locked(folder: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """Hold the module folder's lock; a second optimize on the same module waits, then fails clearly."""
    folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(folder / ".lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting for another navdeploy run that holds %s", folder / ".lock")
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise WorkspaceError(f"{folder} is locked by another nav.optimize run for {timeout_s:g} s; wait for it "
                                 "to finish or use another workspace.") from None
    try:
        yield
    finally:
        lock.release()


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of the module's class, source and weights: any fine-tuning or code change alters it."""
    h = hashlib.sha256()
    cls = type(module)
    h.update(f"{cls.__module__}.{cls.__qualname__}".encode())
    with contextlib.suppress(OSError, TypeError):
        h.update(inspect.getsource(cls).encode())
    for name, tensor in module.state_dict().items():
        h.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        data = tensor.detach().cpu().contiguous()
        if data.dtype in (torch.bfloat16,) or data.is_quantized:
            data = data.float() if not data.is_quantized else data.int_repr()
        h.update(data.numpy().tobytes() if data.numel() else b"")
    return h.hexdigest()


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


def save_samples(graph: Graph, folder: Path) -> None:
    """Store the kept samples as plain tensors (loadable with ``weights_only=True``)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {"inputs": [[t.cpu() for t in s.inputs] for s in graph.samples],
            "outputs": [[t.cpu() for t in s.outputs] for s in graph.samples]}
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".samples.", suffix=".tmp")
    os.close(fd)
    torch.save(data, tmp)
    os.replace(tmp, folder / "samples.pt")


def load_samples(folder: Path, device: str = "cpu") -> list[Sample]:
    """The samples saved by :func:`save_samples` (never unpickles anything but tensors)."""
    data = torch.load(folder / "samples.pt", map_location=device, weights_only=True)
    return [Sample(list(i), list(o)) for i, o in zip(data["inputs"], data["outputs"])]


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
