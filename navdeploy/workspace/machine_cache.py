"""navdeploy's cache per machine: what probing this machine's compiler and devices found, kept across workspaces
so that a new workspace does not pay for the probes again.

    <root>/<probe>-<key hash>/key.json     what the folder holds results for (torch, compiler, CPU flags, CUDA, ...)
    <root>/<probe>-<key hash>/...          the probe's own files (e.g. Inductor's compiled ISA test programs)

``<root>`` is ``$NAVDEPLOY_MACHINE_CACHE``, else ``$XDG_CACHE_HOME/navdeploy/machine`` (``~/.cache`` when unset):
never inside a user's project. A key that changes (another torch, compiler, driver) gets a folder of its own, so
the probe runs again. A cache that cannot be written (read-only home, full disk) is not used: the probes then run
as they would without navdeploy. Nothing is written until a probe asks for its folder, never at import time."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from navdeploy.workspace.atomic import write_json_atomic

log = logging.getLogger("navdeploy")

MACHINE_CACHE_ENV = "NAVDEPLOY_MACHINE_CACHE"
KEY_FILE = "key.json"


def machine_cache_root() -> Path:
    """``$NAVDEPLOY_MACHINE_CACHE``, else ``$XDG_CACHE_HOME/navdeploy/machine``, else ``~/.cache/navdeploy/machine``."""
    explicit = os.environ.get(MACHINE_CACHE_ENV, "").strip()
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip()
    return (Path(base).expanduser() if base else Path.home() / ".cache") / "navdeploy" / "machine"


def key_hash(key: dict[str, Any]) -> str:
    """A short stable hash of a probe's key."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def probe_folder(probe: str, key: dict[str, Any]) -> Optional[Path]:
    """The folder of ``probe``'s results for ``key``, created (with its ``key.json``) when missing; None when the
    machine cache cannot be written (then the caller probes as if there were no cache)."""
    folder = machine_cache_root() / f"{probe}-{key_hash(key)}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / KEY_FILE).is_file():
            write_json_atomic(folder / KEY_FILE, key)
        return folder
    except Exception as exc:  # noqa: BLE001 - an unusable cache (read-only, full, a file in the way) is not an error
        log.info("machine cache %s not used: %s", folder, exc)
        return None


def read_result(folder: Optional[Path], name: str) -> Optional[dict]:
    """A probe result recorded in ``folder`` (a JSON object), None when there is none or it is unreadable."""
    if folder is None:
        return None
    try:
        data = json.loads((folder / name).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def write_result(folder: Optional[Path], name: str, data: dict) -> bool:
    """Record a probe result; False (and nothing written) when the cache cannot be written."""
    if folder is None:
        return False
    try:
        write_json_atomic(folder / name, data)
        return True
    except Exception as exc:  # noqa: BLE001 - the result is still used in this process
        log.info("machine cache %s not written: %s", folder, exc)
        return False
