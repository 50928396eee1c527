"""What makes a folder a navdeploy workspace, and which of its folders are module folders.

Commands that delete (``navdeploy clean``) act only on a folder navdeploy recognises as its own: one holding the
marker file optimize writes (``.navdeploy-workspace``), or, for workspaces written before the marker existed, one
holding at least one module folder with a valid manifest. Inside it they touch only module folders and the
folders navdeploy creates itself (``reports/``, ``inductor_cache/``)."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from navdeploy._version import __version__
from navdeploy.errors import WorkspaceError
from navdeploy.workspace.atomic import write_json_atomic
from navdeploy.workspace.layout import LOG_FILE, MANIFEST, OWN_FOLDERS, WORKSPACE_MARKER
from navdeploy.workspace.manifest import load_manifest

MARKER_FORMAT = 1


def ensure_writable(workspace: Path) -> None:
    """Create the workspace and mark it as one, or raise a WorkspaceError that names the path and the fix."""
    try:
        workspace.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=workspace, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise WorkspaceError(f"workspace {str(workspace)!r} is not writable ({exc.strerror or exc}); pass "
                             "OptimizeConfig(workspace=...) or set NAVDEPLOY_WORKSPACE to a writable folder.") from exc
    write_marker(workspace)


def write_marker(workspace: Path) -> None:
    """Mark ``workspace`` as a navdeploy workspace, unless it already is."""
    if has_marker(workspace):
        return
    write_json_atomic(workspace / WORKSPACE_MARKER, {"navdeploy_workspace": MARKER_FORMAT, "navdeploy": __version__})


def has_marker(workspace: Path) -> bool:
    """Whether the folder holds a marker navdeploy wrote (a JSON object naming the marker format)."""
    try:
        data = json.loads((workspace / WORKSPACE_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "navdeploy_workspace" in data


def is_module_folder(folder: Path) -> bool:
    """A real folder (not a link) holding navdeploy's manifest or log: what optimize creates per module. A
    module whose manifest is broken still counts, so that ``clean`` can remove it."""
    return folder.is_dir() and not folder.is_symlink() and \
        ((folder / MANIFEST).is_file() or (folder / LOG_FILE).is_file())


def module_folders(workspace: Path) -> list[Path]:
    """The module folders directly inside the workspace, sorted by name."""
    try:
        entries = sorted(workspace.iterdir())
    except OSError:
        return []
    return [p for p in entries if is_module_folder(p)]


def is_workspace(path: Path) -> bool:
    """Whether ``path`` is a navdeploy workspace: it holds the marker, or (written before the marker) at least
    one module folder whose manifest is valid."""
    if not path.is_dir():
        return False
    if has_marker(path):
        return True
    return any(load_manifest(folder)[0] is not None for folder in module_folders(path))


def own_folders(workspace: Path) -> list[Path]:
    """The folders navdeploy creates at the top of the workspace that exist there (not links)."""
    return [workspace / name for name in OWN_FOLDERS
            if (workspace / name).is_dir() and not (workspace / name).is_symlink()]
