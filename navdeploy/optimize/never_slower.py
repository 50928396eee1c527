"""The pipeline check after the swap: the user's callable is timed eager against optimized, in this process,
and modules go back to eager, the largest loss first, until the optimized pipeline is faster beyond noise (or
every module is eager). A reverted module's manifest says so, so ``load_optimized`` leaves it eager too."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from navdeploy.inplace.module import Module
from navdeploy.optimize.pipeline import compare
from navdeploy.optimize.status import PipelineTiming
from navdeploy.workspace.locks import locked
from navdeploy.workspace.manifest import read_manifest, write_manifest

log = logging.getLogger("navdeploy")


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f} ms"


def mark_reverted(folder: Path, why: str) -> None:
    """Record in the module's manifest that the pipeline check put it back to eager."""
    with locked(folder):
        manifest = read_manifest(folder)
        if manifest is not None:
            manifest.reverted = why
            write_manifest(folder, manifest)


def check_pipeline(func: Callable, items: list[tuple[int, Any]], modules: list[Module], folders: dict[str, Path],
                   repeats: int, capture_s: float, items_timed: int) -> PipelineTiming:
    """A/B the callable (``compare``), then revert modules until the optimized pipeline is faster beyond noise.
    Never raises: a pass that fails leaves ``timing.error`` set and every module as it is."""
    timing = PipelineTiming(capture_s, 0.0, None, items_timed)
    try:
        compare(func, items, modules, repeats, timing)
        while not timing.faster:
            bound = [m for m in modules if m.is_optimized]
            if not bound:
                break
            loss = {m.name: timing.module_optimized_s.get(m.name, 0.0) - timing.module_eager_s.get(m.name, 0.0)
                    for m in bound}
            worst = max(bound, key=lambda m: loss[m.name])
            why = (f"with it optimized the pipeline was not faster than eager beyond noise (eager "
                   f"{_ms(timing.eager_s)}, optimized {_ms(timing.optimized_s or 0.0)}, medians of {repeats}); "
                   f"its own time: eager {_ms(timing.module_eager_s.get(worst.name, 0.0))}, optimized "
                   f"{_ms(timing.module_optimized_s.get(worst.name, 0.0))}")
            log.warning("navdeploy: module %s goes back to eager: %s", worst.name, why)
            worst.nav_state.bind(None)
            mark_reverted(folders[worst.name], why)
            timing.reverted[worst.name] = why
            if not any(m.is_optimized for m in modules):
                # Every module is eager now: timing eager against itself would print a ratio of noise (a 9.10x
                # "faster" was seen), so the figures stay those that led to the last revert.
                timing.faster = False
                break
            compare(func, items, modules, repeats, timing)
    except Exception as exc:  # noqa: BLE001 - a measurement must not fail the run
        timing.error = f"{type(exc).__name__}: {exc}"
        log.warning("navdeploy: timing the pipeline failed: %s", timing.error)
    return timing
