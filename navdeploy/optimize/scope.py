"""What a module's optimize runs inside: the module's inductor cache in the workspace, the module's log file."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Iterator, Sequence

from navdeploy.workspace.inductor import cache_dir, pointed_at

log = logging.getLogger("navdeploy")


def inductor_cache(module_folder: Path) -> contextlib.AbstractContextManager:
    """TORCHINDUCTOR_CACHE_DIR is the module's cache in the workspace (``inductor_cache/<module>``) for the block,
    unless the user set one: what a module's optimize compiles lands there, and its manifest records the
    cache's checksum (see :mod:`navdeploy.workspace.inductor`)."""
    return pointed_at(cache_dir(module_folder))


@contextlib.contextmanager
def logging_to(path: Path, extra: Sequence[logging.Handler] = ()) -> Iterator[None]:
    """The navdeploy logger writes to the module's log file (and to ``extra``, e.g. the console in ``logs``
    mode) for the block; every handler is closed when it ends."""
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handlers.extend(extra)
    previous = log.level
    log.setLevel(logging.INFO)
    for h in handlers:
        log.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        log.setLevel(previous)
