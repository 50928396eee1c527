"""``nav.load_optimized``: rebind every live ``nav.Module`` from the workspace, in a fresh process."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

from navdeploy.config import resolve_workspace
from navdeploy.inplace.binding import bind
from navdeploy.inplace.registry import registered_modules
from navdeploy.workspace.layout import module_dir

log = logging.getLogger("navdeploy")


def load_optimized(workspace: Optional[str | Path] = None) -> dict[str, bool]:
    """Rebind every live ``nav.Module`` to the runners selected by an earlier ``nav.optimize``.

    Reads ``<workspace>/<name>/manifest.json`` for each module (workspace: the argument, the module's
    ``optimize_config.workspace``, ``$NAVDEPLOY_WORKSPACE`` or ``~/.cache/navdeploy``). Modules without a usable
    optimization keep running eagerly, with a warning. Returns module name -> whether it is bound to what
    ``nav.optimize`` decided: its selected runners, or eager where eager won every graph or the pipeline check put
    the module back to eager (logged); ``module.is_optimized`` says whether calls go to a runner.
    Nothing is written into the workspace: it may be read-only (torch.compile and AOTInductor winners run from a
    private, checked copy of the module's inductor cache).
    """
    result = {}
    for m in registered_modules():
        ws = Path(workspace) if workspace is not None else resolve_workspace(m.optimize_config)
        result[m.name] = bind(m, module_dir(ws, m.name))
    return result
