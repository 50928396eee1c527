"""What makes a folder a navdeploy workspace, and which of its folders are module folders.

Commands that delete (``navdeploy clean``) act only on a folder navdeploy recognises as its own: one holding the
marker file optimize writes (``.navdeploy-workspace``), or, for workspaces written before the marker existed, one
holding at least one module folder with a valid manifest. Inside it they touch only module folders (marked
``.navdeploy-module`` by optimize, which never writes into a folder it did not create), ``inductor_cache/`` and
the reports navdeploy wrote: a workspace may be the user's project folder, with a ``manifest.json`` or a
``reports/`` of their own."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

from navdeploy._version import __version__
from navdeploy.errors import WorkspaceError
from navdeploy.workspace.atomic import write_json_atomic
from navdeploy.workspace.inductor import CACHE_DIR
from navdeploy.workspace.layout import LOG_FILE, MANIFEST, MODULE_MARKER, REPORTS_DIR, WORKSPACE_MARKER
from navdeploy.workspace.locks import LOCK_FILE
from navdeploy.workspace.manifest import load_manifest

# What navdeploy writes into ``<workspace>/reports/`` (see navdeploy.report.html); nothing else there is deleted,
# and of these only what holds navdeploy's mark (a reports/ of the user's may have a latest.html of its own).
_REPORT_FILE = re.compile(r"report-\d{8}-\d{6}(-\d+)?\.html|latest\.html|latest\.json|\.latest\.html\.tmp")
_REPORT_MARK = {".html": b'<meta name="generator" content="navdeploy">', ".json": b'"pipeline"'}


def report_replaceable(path: Path) -> bool:
    """Whether navdeploy may replace or delete the report file ``path``: it does not exist, or (a ``.html`` or
    ``.json``) its start holds navdeploy's mark. A ``reports/`` of the user's may hold a latest.html of its own."""
    mark = _REPORT_MARK.get(path.suffix)
    if mark is None:
        return True  # the temporary file's name is navdeploy's own
    try:
        with open(path, "rb") as f:
            return mark in f.read(4096)
    except FileNotFoundError:
        return True
    except OSError:
        return False

MARKER_FORMAT = 1


def ensure_writable(workspace: Path) -> None:
    """Create the workspace and mark it as one, or raise a WorkspaceError that names the path and the fix."""
    for folder in (workspace, *workspace.parents):
        try:
            found = folder.exists()
        except OSError:  # e.g. a name too long: mkdir below says so
            break
        if found:
            if not folder.is_dir():
                what = "the workspace path" if folder == workspace else f"{str(folder)!r}, a folder above it,"
                raise WorkspaceError(f"workspace {str(workspace)!r} cannot be created: {what} is a file, not a folder "
                                     "(navdeploy leaves it as it is); pass OptimizeConfig(workspace=...) or set "
                                     "NAVDEPLOY_WORKSPACE to a folder path.")
            break
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


def _navdeploy_manifest(path: Path) -> bool:
    """Whether ``path`` is a JSON object with the keys every navdeploy manifest has (valid or hand-edited since):
    not, say, a web app's ``manifest.json``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"version", "fingerprint", "graphs"} <= data.keys()


def is_module_folder(folder: Path) -> bool:
    """A real folder (not a link) that optimize created for a module: it holds the module marker, or (written
    before the marker) a navdeploy manifest, or the log and lock file every run of an earlier version left. A
    module whose manifest is broken still counts, so that ``clean`` can remove it; a folder of the user's with a
    ``manifest.json`` or ``navdeploy.log`` of their own does not."""
    if not folder.is_dir() or folder.is_symlink():
        return False
    return (folder / MODULE_MARKER).is_file() or _navdeploy_manifest(folder / MANIFEST) or \
        ((folder / LOG_FILE).is_file() and (folder / LOCK_FILE).is_file())


def claim_module_folder(folder: Path) -> None:
    """Create the folder of a module and mark it as navdeploy's, or accept one navdeploy created; a folder (or
    file) of the user's there is refused with a WorkspaceError, since optimize would write into it and ``clean``
    delete it."""
    if folder.is_symlink() or (folder.exists() and not folder.is_dir()) or \
            (folder.is_dir() and not is_module_folder(folder) and next(folder.iterdir(), None) is not None):
        raise WorkspaceError(f"{folder} exists and navdeploy did not create it (no {MODULE_MARKER}); optimizing "
                             f"module {folder.name!r} there would write into it. Give the module another name "
                             "(nav.Module(..., name=...)) or optimize into another workspace "
                             "(OptimizeConfig(workspace=...) or NAVDEPLOY_WORKSPACE).")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise WorkspaceError(f"cannot create {str(folder)!r} ({exc.strerror or exc}); pass "
                             "OptimizeConfig(workspace=...) or set NAVDEPLOY_WORKSPACE to a writable folder.") from exc
    if not (folder / MODULE_MARKER).is_file():
        write_json_atomic(folder / MODULE_MARKER, {"navdeploy_module": MARKER_FORMAT, "navdeploy": __version__})


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


def own_paths(workspace: Path) -> list[Path]:
    """What navdeploy wrote at the top of the workspace besides the module folders, that exists there (not
    links): its inductor cache, and the report files in ``reports/`` (not that folder: it may hold the user's)."""
    paths = []
    inductor = workspace / CACHE_DIR
    if inductor.is_dir() and not inductor.is_symlink():
        paths.append(inductor)
    reports = workspace / REPORTS_DIR
    if reports.is_dir() and not reports.is_symlink():
        paths += sorted(p for p in reports.iterdir()
                        if _REPORT_FILE.fullmatch(p.name) and p.is_file() and report_replaceable(p))
    return paths
