"""What a module's optimize (and a reload) runs inside: the workspace's inductor cache, the module's log file."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator, Sequence

log = logging.getLogger("navdeploy")


@contextlib.contextmanager
def inductor_cache(workspace: Path) -> Iterator[None]:
    """TORCHINDUCTOR_CACHE_DIR inside the workspace for the duration of the block, unless the user set it.

    Importing torch._inductor writes torch's default into the environment, so that value counts as unset."""
    previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if previous is not None and os.path.abspath(previous) != os.path.abspath(_torch_default_cache_dir()):
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(workspace / "inductor_cache")
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous


def _torch_default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir

        return default_cache_dir()
    except ImportError:  # older torch: no default to tell apart
        return ""


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
