"""The Python modules a worker started ahead of time imports while the parent still captures the pipeline.

A worker's first job is the module, pickled: unpickling it imports every module that defines one of its classes
(diffusers and transformers take ~4 s on the 2-core CPU). A worker that imports them while the parent runs the
pipeline to capture its inputs loads its first job in a fraction of that, on a core the capture leaves idle.
"""

from __future__ import annotations

import importlib
import logging
from typing import Iterable, Sequence

import torch

log = logging.getLogger("navdeploy")

# Imported by every worker already (torch), or not importable by name (the user's script runs again as the
# worker's __mp_main__, which spawn imports itself).
_SKIPPED = ("__main__", "__mp_main__", "builtins")


def defining_modules(models: Iterable[torch.nn.Module]) -> list[str]:
    """The modules that define the classes of ``models`` and of their submodules, each named once, in the order
    met (the outer model's first), torch's own left out."""
    names: dict[str, None] = {}
    for model in models:
        for sub in model.modules():
            name = type(sub).__module__
            if name and name not in _SKIPPED and name != "torch" and not name.startswith("torch."):
                names.setdefault(name, None)
    return list(names)


def import_ahead(names: Sequence[str]) -> None:
    """Import ``names`` now; one that fails is left for the job to report, as its unpickling would."""
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - the job's own load says what is wrong, if anything is
            log.info("importing %s ahead of the first job failed (%s: %s)", name, type(exc).__name__, exc)
