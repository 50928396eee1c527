"""Where things are in a workspace:

    <workspace>/.navdeploy-workspace            the marker: this folder is a navdeploy workspace (written by optimize)
    <workspace>/reports/                        HTML reports
    <workspace>/inductor_cache/<module>/        torch.compile's and AOTInductor's cache of a module (unless the user
                                                set one; workspaces of earlier versions have one cache for all)
    <workspace>/inductor_cache/<module>.files.json  that cache's files and hashes when its checksum was taken
    <workspace>/<module>/.navdeploy-module      the marker: navdeploy created this module folder (written by optimize)
    <workspace>/<module>/manifest.json          candidates, errors, metrics, selection per graph
    <workspace>/<module>/navdeploy.log          log of every optimize run of the module
    <workspace>/<module>/.lock, .lock.owner     held (flock) by the run optimizing the module; who holds it
    <workspace>/<module>/<graph>/samples.pt     captured inputs + eager outputs (tensors only, weights_only load)
    <workspace>/<module>/<graph>/checkpoint.json  the graph's candidate records so far, written after each one
    <workspace>/<module>/<graph>/<format>.<id>/ one build of a format in the module's precision (``<id>``: the
                                                start of its checksum; ``<format>/`` in manifests of earlier versions)
    <workspace>/<module>/<graph>/<format>-<precision>.<id>/  ... and in another precision (e.g. ``onnx-fp16.<id>``)

Builds sit side by side: a re-run exports into a new folder, switches the manifest, and only then removes the
builds the manifest no longer names, so a run killed at any point leaves the previous result loadable.

navdeploy unpickles nothing here except ``samples.pt`` with ``weights_only=True`` (inductor reads its own cache,
on reload only from a private copy that matched the manifest's checksum); a manifest or checkpoint that is not what
navdeploy writes is ignored with a warning, never trusted."""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from typing import Optional

log = logging.getLogger("navdeploy")


MANIFEST = "manifest.json"


WORKSPACE_MARKER = ".navdeploy-workspace"


MODULE_MARKER = ".navdeploy-module"


# The folder of the HTML reports at the top of a workspace (it may be the user's too: see workspace.identity).
REPORTS_DIR = "reports"


LOG_FILE = "navdeploy.log"


def module_dir(workspace: Path, name: str) -> Path:
    """The folder of one module."""
    return workspace / name


def artifact_dir(fmt_value: str, precision: str, module_precision: str) -> str:
    """The key of a format in one precision (``onnx`` in the module's own, ``onnx-fp16`` in another): the key of
    its state in the manifest, and the name of its artifact folder in manifests of earlier versions."""
    return fmt_value if precision == module_precision else f"{fmt_value}-{precision}"


_BUILD_ID = 16  # hex digits of the checksum in a build folder's name


def build_dir(fmt_key: str, checksum: str) -> str:
    """The folder of one build of a format: its key and the start of the build's checksum (``onnx.3fa2...``)."""
    return f"{fmt_key}.{checksum[:_BUILD_ID]}"


def artifact_path(graph_dir: Path, fmt_key: str, checksum: Optional[str]) -> Path:
    """The folder of the build of ``fmt_key`` whose checksum is ``checksum``; for a manifest written before
    per-build folders (no such folder), the format's one folder ``<fmt_key>/``."""
    if checksum:
        build = graph_dir / build_dir(fmt_key, checksum)
        if build.is_dir():
            return build
    return graph_dir / fmt_key


def remove_replaced_builds(graph_dir: Path, in_use: dict[str, Optional[str]]) -> list[Path]:
    """After a manifest switch: remove the artifact folders of the formats ``in_use`` names (format key -> the
    checksum of the build the manifest now names, None for none) other than that build: earlier builds, builds of
    killed runs, and the one folder of an earlier version. Only folders navdeploy names so are touched."""
    keep = {artifact_path(graph_dir, key, checksum) for key, checksum in in_use.items() if checksum}
    removed = []
    for path in sorted(graph_dir.iterdir()) if graph_dir.is_dir() else ():
        key, dot, build = path.name.rpartition(".")
        ours = path.name in in_use or (dot and key in in_use and len(build) == _BUILD_ID
                                       and all(c in "0123456789abcdef" for c in build))
        if ours and path.is_dir() and not path.is_symlink() and path not in keep:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    if removed:
        log.info("removed %d artifact folder(s) the manifest no longer names: %s", len(removed),
                 ", ".join(p.name for p in removed))
    return removed


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S")


def plain_name_problem(name: str) -> Optional[str]:
    """Why ``name`` cannot be one folder name inside a workspace (empty, ``..``, a path, absolute), or None."""
    if not name or name in (".", ".."):
        return "is not a name"
    if os.path.isabs(name) or "/" in name or "\\" in name or "\0" in name:
        return "is a path, not a name"
    return None
