"""One optimize per module folder at a time: a file lock, and who holds it."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
from pathlib import Path
from typing import Iterator

from filelock import FileLock, Timeout

from navdeploy.errors import WorkspaceError
from navdeploy.workspace.atomic import write_json_atomic
from navdeploy.workspace.layout import now

log = logging.getLogger("navdeploy")


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
        raise WorkspaceError(f"cannot create {str(folder)!r} ({exc.strerror or exc}); pass "
                             "OptimizeConfig(workspace=...) or set NAVDEPLOY_WORKSPACE to a writable folder.") from exc
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
        with contextlib.suppress(OSError, WorkspaceError):  # who holds the lock is only a courtesy
            write_json_atomic(folder / OWNER_FILE, {"pid": os.getpid(), "host": socket.gethostname(), "since": now()})
        clean_stale(folder)
        yield
    finally:
        with contextlib.suppress(OSError):
            (folder / OWNER_FILE).unlink()
        lock.release()
