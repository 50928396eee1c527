"""Where torch's AOTInductor loader extracts a package inside navdeploy's workers.

The loader extracts each package into a new ``$TMPDIR/aotinductor_XXXXXX`` and removes it only when the loader is
destroyed. A worker ends with ``os._exit`` (or is killed), so a runner it still held left its folder in the user's
temp dir, one per load. A worker therefore names a folder of its own in :data:`WORKER_FOLDER_ENV`, which its
executor makes and removes once the worker is gone; the loader extracts there. Elsewhere (the user's process) the
loader lives as long as the runner and cleans up after itself."""

from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator

from navdeploy.workspace.inductor import variable_for_block

WORKER_FOLDER_ENV = "NAVDEPLOY_WORKER_FOLDER"


@contextlib.contextmanager
def extracting_in_worker_folder() -> Iterator[None]:
    """``TMPDIR`` is the worker's folder for the block (the C++ loader reads it), then as it was; outside a worker
    nothing changes. Python's own temp dir is pinned first, so torch's caches under it (precompiled headers, the
    default inductor cache) stay where they are."""
    folder = os.environ.get(WORKER_FOLDER_ENV)
    if not folder or not os.path.isdir(folder):
        yield
        return
    tempfile.gettempdir()  # caches the user's temp dir for this process's Python code
    with variable_for_block("TMPDIR", folder):
        yield
