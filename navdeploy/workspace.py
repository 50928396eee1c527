"""The on-disk workspace: one folder per module, a JSON manifest written last, atomic writes, locks,
cache keys and fingerprints.

    <workspace>/<module>/manifest.json          candidates, errors, metrics, selection per graph
    <workspace>/<module>/navdeploy.log          log of every optimize run of the module
    <workspace>/<module>/.lock, .lock.owner     held (flock) by the run optimizing the module; who holds it
    <workspace>/<module>/<graph>/samples.pt     captured inputs + eager outputs (tensors only, weights_only load)
    <workspace>/<module>/<graph>/checkpoint.json  the graph's candidate records so far, written after each one
    <workspace>/<module>/<graph>/<format>/      the exported artifact of one format

Nothing here is ever unpickled except ``samples.pt`` with ``weights_only=True``; a manifest or checkpoint
that is not what navdeploy writes is ignored with a warning, never trusted.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import os
import pickle
import shutil
import socket
import tempfile
import time
import warnings
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


class _Invalid(ValueError):
    pass


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise _Invalid(what)


def _check_entry(key: Any, entry: Any, graph: bool = True) -> None:
    """The parts of a graph entry that optimize and bind read, with the types they expect."""
    from navdeploy.capture import Graph

    _need(isinstance(key, str) and isinstance(entry, dict), f"graph {key!r} is not an object")
    _need(entry.get("selected") is None or isinstance(entry["selected"], str), f"graph {key}: 'selected' is not a string")
    _need(isinstance(entry.get("cache_key", ""), str), f"graph {key}: 'cache_key' is not a string")
    formats = entry.get("formats", {})
    _need(isinstance(formats, dict) and all(isinstance(v, dict) for v in formats.values()),
          f"graph {key}: 'formats' is not an object of objects")
    for fmt, state in formats.items():
        _need(state.get("status") != "failed" or isinstance(state.get("error"), str), f"graph {key}: format {fmt} "
              "failed without an error")
        _need(state.get("status") != "ok" or isinstance(state.get("checksum"), str), f"graph {key}: format {fmt} has "
              "no checksum")
    candidates = entry.get("candidates")
    _need(isinstance(candidates, list), f"graph {key}: 'candidates' is not a list")
    for c in candidates:
        _need(isinstance(c, dict) and isinstance(c.get("runner"), str) and isinstance(c.get("status"), str)
              and isinstance(c.get("name", ""), str), f"graph {key}: a candidate has no runner or status")
        _need(isinstance(c.get("profile", []), list) and all(isinstance(m, dict) for m in c.get("profile", [])),
              f"graph {key}: candidate {c.get('runner')} has a malformed profile")
    if not graph:
        return
    try:
        Graph.from_json(entry["graph"])
    except Exception as exc:  # noqa: BLE001 - any shape problem makes the entry unusable
        raise _Invalid(f"graph {key}: malformed input/output description ({type(exc).__name__}: {exc})") from None


def validate_manifest(data: Any) -> None:
    """Raise ValueError naming the first part of ``data`` that is not what navdeploy writes."""
    _need(isinstance(data, dict), "not a JSON object")
    _need(data.get("version") == MANIFEST_VERSION, f"version {data.get('version')!r} is not {MANIFEST_VERSION}")
    for name in ("fingerprint", "device", "module"):
        _need(isinstance(data.get(name), str), f"{name!r} is missing or not a string")
    _need(isinstance(data.get("precision", ""), str), "'precision' is not a string")
    mbs = data.get("max_batch_size", 1)
    _need(isinstance(mbs, int) and not isinstance(mbs, bool) and mbs >= 1, "'max_batch_size' is not an int >= 1")
    _need(isinstance(data.get("graphs"), dict), "'graphs' is not an object")
    for key, entry in data["graphs"].items():
        _check_entry(key, entry)


def load_manifest(folder: Path) -> tuple[Optional[dict], Optional[str]]:
    """``(manifest, None)``, ``(None, None)`` when there is none, or ``(None, why)`` when it is unusable: not
    JSON, hand-edited into other types, or written by another version. Never raises."""
    path = folder / MANIFEST
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, f"cannot read {path}: {exc}"
    try:
        data = json.loads(text)
        validate_manifest(data)
        return data, None
    except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
        return None, f"{path} is not a valid navdeploy manifest ({exc})"


def read_manifest(folder: Path) -> Optional[dict]:
    """The module's manifest, or None when absent or unusable (a warning says why; the module is then
    treated as not optimized)."""
    data, problem = load_manifest(folder)
    if problem:
        log.warning("ignoring manifest: %s", problem)
        warnings.warn(f"navdeploy: ignoring an unusable manifest: {problem}. The module is treated as not "
                      "optimized; re-run nav.optimize to rebuild it.", RuntimeWarning, stacklevel=2)
    return data


LOCK_FILE = ".lock"
OWNER_FILE = ".lock.owner"


def _owner(folder: Path) -> str:
    """Who holds a module's lock, as far as the owner file says."""
    try:
        data = json.loads((folder / OWNER_FILE).read_text())
        return f" (held by pid {data['pid']} on {data['host']} since {data['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def clean_stale(folder: Path) -> list[Path]:
    """Remove what a killed run left half-written in a module folder: ``*.tmp-<pid>`` artifact folders and
    ``.*.tmp`` files. Only call it while holding the module's lock (no live run can own them then)."""
    removed = []
    for path in list(folder.rglob("*")):
        name = path.name
        stale_dir = path.is_dir() and ".tmp-" in name
        stale_file = path.is_file() and name.startswith(".") and name.endswith(".tmp")
        if stale_dir or stale_file:
            if stale_dir:
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
            removed.append(path)
    if removed:
        log.info("removed %d half-written file(s) left by an interrupted run: %s", len(removed),
                 ", ".join(str(p.relative_to(folder)) for p in removed))
    return removed


@contextlib.contextmanager
def locked(folder: Path, timeout_s: float = 600.0) -> Iterator[None]:
    """Hold the module folder's lock; a second optimize on the same module waits, then fails clearly.

    The lock is an ``flock`` on ``<folder>/.lock``: the kernel releases it when its holder dies (even by
    ``kill -9``), so a lock file left behind never blocks. Whoever takes the lock first removes the
    half-written files a killed run may have left.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"cannot create {str(folder)!r} ({exc.strerror or exc}); pass OptimizeConfig(workspace=...) "
                             "or set NAVDEPLOY_WORKSPACE to a writable folder.") from exc
    lock = FileLock(str(folder / LOCK_FILE))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("waiting up to %g s for another nav.optimize run on %s%s", timeout_s, folder, _owner(folder))
        try:
            lock.acquire(timeout=timeout_s)
        except Timeout:
            raise WorkspaceError(f"module folder {folder} is locked by another nav.optimize run{_owner(folder)}; "
                                 f"gave up after {timeout_s:g} s. Wait for that run to finish, or optimize into "
                                 "another workspace (OptimizeConfig(workspace=...)).") from None
    try:
        with contextlib.suppress(OSError):
            write_json_atomic(folder / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "since": now()})
        clean_stale(folder)
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / OWNER_FILE).unlink()
        lock.release()


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
    with contextlib.suppress(OSError, TypeError):
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
    """The samples saved by :func:`save_samples`. Loaded with ``weights_only=True``: a file holding anything
    but tensors and plain containers is refused, never unpickled."""
    path = folder / "samples.pt"
    try:
        data = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise WorkspaceError(f"{path} holds data other than tensors; navdeploy refuses to unpickle it. Delete the "
                             f"folder and re-run nav.optimize. ({str(exc).splitlines()[0]})") from None
    try:
        return [Sample(list(i), list(o)) for i, o in zip(data["inputs"], data["outputs"], strict=True)]
    except (TypeError, KeyError, ValueError) as exc:
        raise WorkspaceError(f"{path} is not a navdeploy samples file ({type(exc).__name__}: {exc}); re-run "
                             "nav.optimize.") from None


CHECKPOINT = "checkpoint.json"


def checkpoint_graph(module_folder: Path, graph_key: str, cache_key_: str, formats: dict, candidates: list[dict]) -> None:
    """Record a graph's progress (its built formats and every candidate record so far) atomically, after each
    candidate. A run killed mid-way loses at most the candidate that was running: the next run resumes
    from here (see :func:`resume_entry`). The manifest itself is still written only when the module is done."""
    write_json_atomic(module_folder / graph_key / CHECKPOINT,
                      {"version": MANIFEST_VERSION, "cache_key": cache_key_, "formats": formats,
                       "candidates": candidates, "updated": now()})


def resume_entry(module_folder: Path, graph_key: str, cache_key_: str, entry: Optional[dict]) -> Optional[dict]:
    """The best earlier state of a graph for a run whose cache key is ``cache_key_``: the manifest's ``entry``,
    updated with a newer checkpoint of the same cache key (a run that was killed). Records of candidates are
    reused as optimize reuses cached ones; artifacts are still checked against their checksums before use."""
    path = module_folder / graph_key / CHECKPOINT
    try:
        data = json.loads(path.read_text())
        _need(isinstance(data, dict) and data.get("version") == MANIFEST_VERSION, "not a checkpoint")
        if data.get("cache_key") != cache_key_:
            return entry  # another configuration, weights or torch: nothing in it applies
        manifest = module_folder / MANIFEST
        if entry is not None and entry.get("cache_key") == cache_key_ and manifest.exists() \
                and manifest.stat().st_mtime_ns >= path.stat().st_mtime_ns:
            return entry  # the manifest was written after the checkpoint: it is complete
        _check_entry(graph_key, data, graph=False)
    except FileNotFoundError:
        return entry
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("ignoring checkpoint %s (%s)", path, exc)
        return entry
    base = entry if entry is not None and entry.get("cache_key") == cache_key_ else {}
    records = {c.get("name", c["runner"]): c for c in base.get("candidates", [])}
    records.update({c.get("name", c["runner"]): c for c in data["candidates"]})
    log.info("resuming graph %s from the checkpoint of an interrupted run: %d candidate record(s)", graph_key,
             len(data["candidates"]))
    return {**base, "cache_key": cache_key_, "formats": {**base.get("formats", {}), **data["formats"]},
            "candidates": list(records.values())}


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")
