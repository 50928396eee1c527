"""A module's inductor cache: the code torch.compile and AOTInductor generate (Python sources, shared libraries,
pickled graphs), kept in ``<workspace>/inductor_cache/<module>/`` so that a reload compiles from cache (the module
folder holds only graph folders; ``navdeploy clean`` removes the whole ``inductor_cache/``, and a module's cache
that no manifest vouches for is removed by its next optimize).

That code runs on reload, so it is covered like an artifact: the module's manifest holds the cache's checksum,
taken when ``nav.optimize`` last wrote into it. Next to the cache, ``<module>.files.json`` lists each file's own
hash at that moment: when the cache no longer matches, the log names the files that changed, appeared or went
(what wrote into a finished module's cache is then found from the log alone).

A reload never runs the workspace's cache itself: it copies it into a private, writable folder, checks the copy
against the checksum and points ``TORCHINDUCTOR_CACHE_DIR`` there (a cache that does not match is not used: the
reload compiles again, into an empty private folder). So a read-only
workspace loads every winner (inductor creates lock files in its cache), and a reload writes nothing into the
workspace. A cache the user chose (``TORCHINDUCTOR_CACHE_DIR``) is the user's: navdeploy neither checks nor copies
it."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Iterator, Optional

from navdeploy.workspace.atomic import write_json_atomic

log = logging.getLogger("navdeploy")


CACHE_DIR = "inductor_cache"

# Lock files: inductor creates one (empty) per key it locks, whoever reads the cache; they hold no code.
_NOT_CODE = ("locks",)

_ENV = "TORCHINDUCTOR_CACHE_DIR"
_TRITON_ENV = "TRITON_CACHE_DIR"
# Held while this process's inductor cache variables change (a module's cache in and out, the CPU ISA probe pointing
# at the machine cache for a moment beside the builds) and while they are passed on (a job sent to a worker): a
# reader never sees a value half set, nor the probe's.
ENVIRONMENT_LOCK = threading.RLock()


@contextlib.contextmanager
def variable_for_block(name: str, value: str) -> Iterator[None]:
    """The environment variable ``name`` is ``value`` for the block (under ``ENVIRONMENT_LOCK``), then as it was."""
    with ENVIRONMENT_LOCK:
        previous = os.environ.get(name)
        os.environ[name] = value
        try:
            yield
        finally:
            if previous is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = previous


def cache_dir(module_folder: Path) -> Path:
    """The inductor cache of the module whose folder is ``module_folder``: ``<workspace>/inductor_cache/<module>``."""
    return module_folder.parent / CACHE_DIR / module_folder.name


def user_cache_dir() -> Optional[str]:
    """The inductor cache the user set in ``TORCHINDUCTOR_CACHE_DIR``, or None. Importing ``torch._inductor``
    writes torch's default there, so that value counts as unset."""
    current = os.environ.get(_ENV)
    if current is None or os.path.abspath(current) == os.path.abspath(_torch_default_cache_dir()):
        return None
    return None if _is_navdeploy_cache(current) else current


def _torch_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return default_cache_dir()
    except ImportError:  # older torch: no default to tell apart
        return ""


_own: set[str] = set()  # the caches navdeploy pointed TORCHINDUCTOR_CACHE_DIR at in this process


def _is_navdeploy_cache(path: str) -> bool:
    path = os.path.abspath(path)
    return any(path == own or path.startswith(own + os.sep) for own in _own)


def cache_environment(path: Path) -> dict[str, Optional[str]]:
    """The inductor cache variables that point at ``path``: ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR``
    (``path/triton``), each unless the user set their own (then its current value). What ``pointed_at`` sets in
    this process, and what a worker building the module's candidates sets in its own."""
    with ENVIRONMENT_LOCK:  # not while the ISA probe points the cache at the machine cache for a moment
        if user_cache_dir() is not None:
            return {name: os.environ.get(name) for name in (_ENV, _TRITON_ENV)}
        _own.add(os.path.abspath(path))
        triton = os.environ.get(_TRITON_ENV)
        if triton is None or _is_navdeploy_cache(triton):
            triton = str(path / "triton")
        return {_ENV: str(path), _TRITON_ENV: triton}


@contextlib.contextmanager
def pointed_at(path: Path) -> Iterator[None]:
    """``TORCHINDUCTOR_CACHE_DIR`` is ``path`` for the block, unless the user set their own; then as before.

    ``TRITON_CACHE_DIR`` too (``path/triton``), unless the user set it: inductor sets it once per process, from the
    cache of the moment, so without this every later module's GPU kernels would land in the first module's cache
    (changing it after its checksum was taken)."""
    if user_cache_dir() is not None:
        yield
        return
    with ENVIRONMENT_LOCK:
        previous = {name: os.environ.get(name) for name in (_ENV, _TRITON_ENV)}
        set_environment(cache_environment(path))
    try:
        yield
    finally:
        set_environment(previous)


# Held by whoever compiles or loads in this process with a module's cache in the variables (``used_at``): modules
# optimized side by side take turns, so one never compiles into another's cache.
_IN_USE = threading.RLock()


@contextlib.contextmanager
def used_at(path: Path) -> Iterator[None]:
    """``pointed_at(path)`` for the block, with no other module's cache pointed at meanwhile (modules optimized
    side by side bind, and build in this process, one at a time)."""
    with _IN_USE, pointed_at(path):
        yield


def set_environment(values: dict[str, Optional[str]]) -> None:
    """Give each inductor cache variable in ``values`` its value (None: unset), and forget the paths inductor
    memoised from the old ones."""
    with ENVIRONMENT_LOCK:
        for name, value in values.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        forget_memoized_paths()


def forget_memoized_paths() -> None:
    """Make inductor read ``TORCHINDUCTOR_CACHE_DIR`` again for the paths it memoizes per process.

    Inductor keeps its benchmark decisions (whether padding a matmul pays, runtime estimates) in
    ``<cache>/cache/<system hash>`` and memoizes that path on first use. Without this, every module compiled later
    in the same process (a warm worker that built the first module, or the binding process) wrote its decisions
    into the first module's cache after that cache's checksum was taken: the next run found the first module's
    cache changed, discarded it and compiled again (the SD text encoder's re-run bind on the H200: 21.6 s instead
    of ~8). Nothing to do before inductor is imported: then nothing is memoized yet."""
    codecache = sys.modules.get("torch._inductor.codecache")
    path_of = getattr(getattr(codecache, "CacheBase", None), "get_local_cache_path", None)
    clear = getattr(path_of, "cache_clear", None)
    if callable(clear):
        clear()


def cache_checksum(module_folder: Path) -> Optional[str]:
    """A hash of the module's inductor cache (file names and bytes; lock files and symbolic links left out, as
    they are never copied); None when it has none."""
    return _checksum(cache_dir(module_folder))


def checksum_to_record(module_folder: Path) -> Optional[str]:
    """What a module's manifest records at the end of its optimize: its cache's checksum, or None when the run
    compiled into a cache the user chose (the module's own, if any, then holds nothing of this run). The list of
    the cache's files and their hashes is written next to it, for :func:`describe_changes`."""
    if user_cache_dir() is not None:
        return None
    folder = cache_dir(module_folder)
    checksum, files = _digest(folder)
    if checksum is not None:
        try:
            write_json_atomic(files_list(module_folder), files)
        except OSError as exc:  # a diagnostic only: the checksum alone still guards the cache
            log.warning("cannot write %s (%s)", files_list(module_folder), exc)
    return checksum


def files_list(module_folder: Path) -> Path:
    """``<workspace>/inductor_cache/<module>.files.json``: the cache's files and their hashes at its checksum."""
    return cache_dir(module_folder).with_name(module_folder.name + ".files.json")


def _checksum(folder: Path) -> Optional[str]:
    return _digest(folder, per_file=False)[0]


def _code_files(folder: Path) -> list[Path]:
    """The files a checksum covers, in its order (lock files and symbolic links left out)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink()
                  and p.relative_to(folder).parts[0] not in _NOT_CODE)


def _digest(folder: Path, per_file: bool = True,
            only: Optional[set[str]] = None) -> tuple[Optional[str], dict[str, str]]:
    """The folder's checksum (file names and bytes, in name order) and, with ``per_file``, each file's own sha256
    (only recording and diagnosing need those: a reload's check hashes each byte once). ``only``: the checksum of
    just those files (relative names)."""
    if not folder.is_dir():
        return None, {}
    h, files = hashlib.sha256(), {}
    for path in _code_files(folder):
        relative = path.relative_to(folder)
        if only is not None and str(relative) not in only:
            continue
        h.update(str(relative).encode() + b"\0")
        one = hashlib.sha256() if per_file else None
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
                if one is not None:
                    one.update(chunk)
        if one is not None:
            files[str(relative)] = one.hexdigest()
    return h.hexdigest(), files


def describe_changes(module_folder: Path, folder: Optional[Path] = None, shown: int = 5) -> str:
    """Which files of the module's cache (or of ``folder``, a copy of it) differ from the list taken with its
    checksum, e.g. ``changed: a/x.py; new: triton/b.json (+3 more)``; empty when there is no list to compare."""
    try:
        recorded = json.loads(files_list(module_folder).read_text())
    except (OSError, ValueError):
        return ""
    if not isinstance(recorded, dict):
        return ""
    current = _digest(folder or cache_dir(module_folder))[1]
    parts = []
    for what, names in (("changed", [n for n in current if n in recorded and current[n] != recorded[n]]),
                        ("new", [n for n in current if n not in recorded]),
                        ("missing", [n for n in recorded if n not in current])):
        if names:
            more = f" (+{len(names) - shown} more)" if len(names) > shown else ""
            parts.append(f"{what}: {', '.join(sorted(names)[:shown])}{more}")
    return "; ".join(parts)


def drop_later_files(module_folder: Path, folder: Path, recorded: Optional[str]) -> bool:
    """When ``folder`` (the module's cache, or a copy of it) differs from ``recorded`` only by files added since its
    checksum, remove those files and return True: the rest is exactly what was checked. Inductor writes into a
    cache after the compile that filled it (an entry for a shape first seen later, a kernel's autotuning
    result), and wiping the whole cache for that made the next optimize and every reload compile again (minutes
    for a diffusion UNet). False, with nothing removed, when a recorded file changed or went, or no list of the
    recorded files is at hand (``<module>.files.json``)."""
    try:
        listed = json.loads(files_list(module_folder).read_text())
    except (OSError, ValueError):
        return False
    if recorded is None or not isinstance(listed, dict):
        return False
    present = {str(p.relative_to(folder)): p for p in _code_files(folder)}
    if not set(listed) <= set(present) or _digest(folder, per_file=False, only=set(listed))[0] != recorded:
        return False
    later = sorted(set(present) - set(listed))
    for name in later:
        with contextlib.suppress(FileNotFoundError):
            present[name].unlink()
    if later:
        more = f" (+{len(later) - 5} more)" if len(later) > 5 else ""
        log.info("%s: removed %d file(s) written after its checksum (%s%s); the rest matches it", folder,
                 len(later), ", ".join(later[:5]), more)
    return True


def discard_unvouched(module_folder: Path, recorded: Optional[str]) -> None:
    """Before ``nav.optimize`` compiles into the module's cache: remove it unless it still matches the checksum
    its manifest recorded (hand-edited, corrupted, or written by a run killed before its manifest), so that the
    checksum this run records never vouches for code navdeploy did not check."""
    folder = cache_dir(module_folder)
    if not folder.is_dir() or user_cache_dir() is not None:
        return
    if recorded is not None and (_checksum(folder) == recorded or drop_later_files(module_folder, folder, recorded)):
        return
    why = "does not match the checksum in its manifest" if recorded else "is not covered by a manifest"
    changes = describe_changes(module_folder) if recorded else ""
    log.info("%s %s%s: removing it (torch.compile and AOTInductor compile again)", folder, why,
             f" ({changes})" if changes else "")
    _remove(module_folder)


def remove_unused(module_folder: Path) -> None:
    """Remove the module's cache when nothing selected loads from it (an ONNX Runtime or TorchScript winner): the
    builds that compiled into it are pruned too, and AOTInductor's embeds the weights (~90 MB for a MiniLM). A cache
    the user chose is left alone."""
    folder = cache_dir(module_folder)
    if not folder.is_dir() or user_cache_dir() is not None:
        return
    log.info("%s: no selected runner loads from it, removing it (keep_artifacts=True keeps it)", folder)
    _remove(module_folder)


def _remove(module_folder: Path) -> None:
    """Remove the module's cache and the list of its files."""
    shutil.rmtree(cache_dir(module_folder), ignore_errors=True)
    with contextlib.suppress(OSError):
        files_list(module_folder).unlink()


def _not_copied(folder: str, names: list[str]) -> set[str]:
    """Lock files, and symbolic links (inductor writes none; one could point anywhere, so none is copied)."""
    return {n for n in names if n in _NOT_CODE or os.path.islink(os.path.join(folder, n))}


_copies: dict[tuple[str, str], Path] = {}  # (module folder, checksum) -> its verified private copy
_copies_lock = threading.Lock()
_root: list[Path] = []  # the private folder holding this process's copies, removed at exit


def _private_root() -> Path:
    if not _root:
        _root.append(Path(tempfile.mkdtemp(prefix="navdeploy-inductor-")))
        atexit.register(shutil.rmtree, str(_root[0]), True)
    return _root[0]


def private_copy(module_folder: Path, recorded: Optional[str], module_name: str) -> Path:
    """A private, writable copy of the module's cache that matched ``recorded``; an empty private folder when
    there is no cache, no checksum, or the copy does not match (then with a warning: the code is not used)."""
    source = cache_dir(module_folder)
    with _copies_lock:
        if recorded is not None and (str(module_folder), recorded) in _copies:
            return _copies[(str(module_folder), recorded)]
        target = Path(tempfile.mkdtemp(prefix=f"{module_name}-", dir=_private_root()))
        copy = target / CACHE_DIR
        try:
            if recorded is not None and source.is_dir():
                shutil.copytree(source, copy, ignore=_not_copied, symlinks=True)
        except OSError as exc:
            log.warning("module %s: cannot copy its inductor cache %s (%s); compiling again", module_name, source,
                        exc)
            shutil.rmtree(copy, ignore_errors=True)
        if copy.is_dir() and (_checksum(copy) == recorded  # checked on the copy: what runs is what was checked
                              or drop_later_files(module_folder, copy, recorded)):
            _copies[(str(module_folder), recorded)] = copy
            return copy
        if copy.is_dir() or (recorded is not None and not source.is_dir()):
            message = (f"its inductor cache {source} does not match the checksum in its manifest (modified or "
                       "incomplete); its code is not used and torch.compile/AOTInductor compile again. Re-run "
                       "nav.optimize to rebuild it.")
            changes = describe_changes(module_folder, copy) if copy.is_dir() else ""
            log.warning("module %s: %s%s", module_name, message, f" Differences: {changes}." if changes else "")
            warnings.warn(f"navdeploy: module {module_name!r}: {message}", RuntimeWarning, stacklevel=4)
        else:
            log.info("module %s: no checked inductor cache in %s; torch.compile/AOTInductor compile again",
                     module_name, module_folder)
        shutil.rmtree(copy, ignore_errors=True)
        copy.mkdir()
        return copy
