"""What a module's optimize runs inside: the module's inductor cache in the workspace, the module's log file."""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
from pathlib import Path
from typing import Iterator, Optional, Sequence

from navdeploy.workspace.inductor import cache_dir, used_at

log = logging.getLogger("navdeploy")


def inductor_cache(module_folder: Path) -> contextlib.AbstractContextManager:
    """TORCHINDUCTOR_CACHE_DIR is the module's cache in the workspace (``inductor_cache/<module>``) for the block,
    unless the user set one: what a module's optimize compiles lands there, and its manifest records the
    cache's checksum (see :mod:`navdeploy.workspace.inductor`). Modules optimized side by side take turns: one
    block at a time in this process (``used_at``)."""
    return used_at(cache_dir(module_folder))


# The module whose optimize this thread (or a thread started from its context) works for: with modules optimized
# side by side, each module's log takes only its own records.
_MODULE: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("navdeploy_module", default=None)
_level_lock = threading.Lock()
_level_holders: list[int] = []  # the logger's level before the first of the blocks in flight


class _OfModule(logging.Filter):
    """Passes the records of one module's optimize, and those of no module's (the run's own)."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self._name = name

    def filter(self, record: logging.LogRecord) -> bool:
        return _MODULE.get() in (None, self._name)


@contextlib.contextmanager
def logging_to(path: Path, extra: Sequence[logging.Handler] = (), module: Optional[str] = None) -> Iterator[None]:
    """The navdeploy logger writes to the module's log file (and to ``extra``, e.g. the console in ``logs``
    mode) for the block; every handler is closed when it ends. With ``module``, the handlers take only that
    module's records (those logged in this context, or in a copy of it) and the run's own."""
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    handlers.extend(extra)
    token = _MODULE.set(module) if module is not None else None
    for h in handlers:
        if module is not None:
            h.addFilter(_OfModule(module))
    with _level_lock:  # blocks side by side: the level goes back when the last one ends
        _level_holders.append(log.level)
        log.setLevel(logging.INFO)
    for h in handlers:
        log.addHandler(h)
    try:
        yield
    finally:
        for h in handlers:
            log.removeHandler(h)
            h.close()
        with _level_lock:
            previous = _level_holders.pop()
            if not _level_holders:
                log.setLevel(previous)
        if token is not None:
            _MODULE.reset(token)
