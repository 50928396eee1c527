"""Writes that readers see whole or not at all, and the writability check with its fix."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from navdeploy.errors import WorkspaceError

log = logging.getLogger("navdeploy")


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
