"""Writes that readers see whole or not at all, and the translation of a failed write (disk full, read-only file
system, permission denied) into a WorkspaceError that names the path and the fix."""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from navdeploy.errors import WorkspaceError

log = logging.getLogger("navdeploy")


# The errors a write gets from the disk itself rather than from what is written: the same write fails again until
# the user frees space or fixes the folder.
DISK_ERRNOS = frozenset(e for e in (errno.ENOSPC, getattr(errno, "EDQUOT", None), errno.EROFS, errno.EACCES,
                                    errno.EPERM) if e is not None)


_ELSEWHERE = "or optimize into another workspace (OptimizeConfig(workspace=...) or NAVDEPLOY_WORKSPACE)"


def free_space(path: Path) -> Optional[int]:
    """Bytes free on the file system holding ``path`` (its nearest existing parent); None when unknown."""
    for candidate in (path, *path.parents):
        try:
            return shutil.disk_usage(candidate).free
        except OSError:
            continue
    return None


def _size(n: Optional[int]) -> str:
    """``n`` bytes for a person: ``512 B``, ``63.5 KiB``, ``2.0 GiB``."""
    if n is None:
        return "an unknown amount"
    value, unit = float(n), "B"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"


def write_error(exc: OSError, path: Path, elsewhere: str = _ELSEWHERE) -> WorkspaceError:
    """The WorkspaceError for an OSError raised while writing ``path``: what went wrong, where, and the fix
    (``elsewhere``: how to write somewhere else instead; by default another workspace)."""
    code = exc.errno
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        what = "the disk is full" if code == errno.ENOSPC else "the disk quota is exceeded"
        return WorkspaceError(f"cannot write {path}: {what} ({_size(free_space(path))} free on that file "
                              f"system); free some space there, {elsewhere} on a larger disk.")
    if code == errno.EROFS:
        return WorkspaceError(f"cannot write {path}: the file system is read-only; remount it read-write, "
                              f"{elsewhere} on a writable disk.")
    if code in (errno.EACCES, errno.EPERM):
        return WorkspaceError(f"cannot write {path}: permission denied; make the folder writable for this user, "
                              f"{elsewhere}.")
    return WorkspaceError(f"cannot write {path} ({exc.strerror or exc}); check the folder, {elsewhere}.")


def is_disk_error(exc: BaseException) -> bool:
    """Whether ``exc`` is an OSError of the disk (full, read-only, permission denied), not of what was written."""
    return isinstance(exc, OSError) and exc.errno in DISK_ERRNOS


@contextlib.contextmanager
def writing(path: Path, disk_only: bool = False) -> Iterator[None]:
    """Turn an OSError raised inside the block, while writing ``path``, into :func:`write_error`'s WorkspaceError
    (``disk_only``: only the disk's own errors, for blocks that run third-party code with OSErrors of its own)."""
    try:
        yield
    except OSError as exc:
        if disk_only and not is_disk_error(exc):
            raise
        raise write_error(exc, path) from exc


def write_bytes_atomic(path: Path, data: bytes, prefix: str | None = None) -> None:
    """Write ``data`` next to ``path`` and rename it into place: readers see the old or the new file, never half.
    A failed write leaves no temporary file and raises a WorkspaceError (see :func:`write_error`)."""
    with writing(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix or f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def write_json_atomic(path: Path, data: Any) -> None:
    """``data`` as indented JSON, written with :func:`write_bytes_atomic`."""
    write_bytes_atomic(path, json.dumps(data, indent=2, default=str).encode())
