"""The dataloader's items, checked, and the capture pass of the callable over them."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, Callable, Iterable, Optional

from navdeploy.capture.pytree import split_sample
from navdeploy.errors import DataloaderError

log = logging.getLogger("navdeploy")


def dataloader_items(dataloader: Iterable) -> list[tuple[int, Any]]:
    try:
        items = list(dataloader)
    except TypeError:
        raise DataloaderError(f"dataloader must be iterable, got {type(dataloader).__name__}; pass a list of "
                              "(batch_size, sample) tuples.") from None
    if not items:
        raise DataloaderError("the dataloader is empty; pass at least one (batch_size, sample) item, "
                              "e.g. [(1, torch.randn(1, 3, 224, 224))].")
    for i, item in enumerate(items):
        ok = isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], int) \
            and not isinstance(item[0], bool) and item[0] >= 1
        if not ok:
            raise DataloaderError(f"dataloader item {i} is {type(item).__name__} {_short(item)}; every item must be "
                                  "(batch_size, sample) with batch_size an int >= 1, e.g. (1, tensor) or "
                                  "(2, (input_ids, {'attention_mask': mask})).")
    return items


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) < 80 else text[:77] + "..."


def script_command() -> Optional[str]:
    """The user's script, for the report's reproduce commands; None under a runner (pytest, python -m ...)."""
    script = sys.argv[0] if sys.argv else ""
    if not script.endswith(".py") or os.path.basename(script) == "__main__.py" or "site-packages" in script:
        return None
    return script


def run_capture(func: Callable, items: list[tuple[int, Any]]) -> None:
    """Call ``func`` on every item (the capture pass); a first item that does not fit its signature is a
    DataloaderError that says how samples are unpacked."""
    for i, (_, sample) in enumerate(items):
        args, kwargs = split_sample(sample)
        try:
            func(*args, **kwargs)
        except TypeError as exc:
            if i == 0 and isinstance(sample, (list, tuple)) and "argument" in str(exc):
                raise DataloaderError(
                    f"calling the callable with dataloader item 0 failed: {exc}. A tuple or list sample is unpacked "
                    "into positional arguments; to pass one list (e.g. a list of sentences) as a single argument, "
                    "wrap it: (batch_size, (sentences,)).") from exc
            raise
