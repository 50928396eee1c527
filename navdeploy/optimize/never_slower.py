"""The pipeline check after the swap, in this process. First what the user's callable returns, eager against
optimized (``outputs``): modules whose runners change it beyond tolerance run their best candidates in their own
precision instead, where the winners ran in another (bf16 copies on the CPU, fp16 on CUDA), else go back to eager.
Then the callable is timed eager against optimized, and modules go back to eager, the largest loss first, until the
optimized pipeline is faster beyond noise (or every module is eager). A reverted module's manifest says so, so
``load_optimized`` leaves it eager too (and binds the fallbacks where the manifest says they run)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from navdeploy.candidates.verify import LOW_PRECISIONS
from navdeploy.capture.pytree import split_sample
from navdeploy.inplace.binding import bind
from navdeploy.inplace.module import Module
from navdeploy.optimize.outputs import Leaves, OutputCheck, SampleGenerators, Tolerance, collect, compare_leaves
from navdeploy.optimize.pipeline import compare, handlers
from navdeploy.optimize.status import ModuleStatus, PipelineTiming
from navdeploy.workspace.locks import locked
from navdeploy.workspace.manifest import read_manifest, write_manifest
from navdeploy.workspace.records import CandidateRecord

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


def fall_back(module: Module, folder: Path, why: str) -> Optional[Tolerance]:
    """Bind the module's graphs whose winner runs in another precision to their fallbacks in its own precision
    (``GraphEntry.fallback``), and record it in its manifest, so ``load_optimized`` binds them too. Returns the
    tolerance its outputs are now checked with, or None (the module as it was) when it has no fallback or the
    fallbacks do not bind."""
    with locked(folder):
        manifest = read_manifest(folder)
        if manifest is None or not any(e.fallback for e in manifest.graphs.values()):
            return None
        chosen = copy.deepcopy(manifest)
        for entry in chosen.graphs.values():
            if entry.fallback:
                entry.selected, entry.fallback = entry.fallback, None
        chosen.fell_back = why
        if not bind(module, folder, chosen):
            bind(module, folder, manifest)  # the winners again, as the manifest on disk says
            return None
        write_manifest(folder, chosen)
    # From what each graph runs now (a graph with no fallback keeps its winner).
    return _selected_tolerance((e.selected_candidate() for e in chosen.graphs.values()), chosen.precision,
                               chosen.tolerances)


def _selected_tolerance(selected: Iterable[Optional[CandidateRecord]], module_precision: str,
                        tolerances: dict[str, tuple[float, float]]) -> Tolerance:
    """The loosest tolerance the ``selected`` candidates were checked with (the module's precision's when none)."""
    precisions = {c.precision_in(module_precision) for c in selected if c is not None} or {module_precision}
    return Tolerance.loosest(Tolerance(*tolerances[p], p in LOW_PRECISIONS) for p in precisions if p in tolerances)


def module_tolerance(status: ModuleStatus) -> Tolerance:
    """The loosest tolerance the module's selected candidates were checked with (its precision's when none)."""
    return _selected_tolerance((g.selected_candidate() for g in status.graphs), status.precision, status.tolerances)


def _outputs(func: Callable, samples: list[tuple[tuple, dict]], generators: SampleGenerators,
             modules: list[Module], optimized: Callable[[Module], bool]) -> Leaves:
    """What the callable returns over the samples, each module routed as before where ``optimized(module)``, else
    eager."""
    with handlers(modules, lambda m, h: h if optimized(m) else None), torch.no_grad():
        return collect(func, samples, generators)


def _revert(module: Module, why: str, folders: dict[str, Path], timing: PipelineTiming) -> None:
    log.warning("navdeploy: module %s goes back to eager: %s", module.name, why)
    module.nav_state.bind(None)
    mark_reverted(folders[module.name], why)
    timing.reverted[module.name] = why


def check_outputs(func: Callable, items: list[tuple[int, Any]], modules: list[Module], folders: dict[str, Path],
                  tolerances: dict[str, Tolerance], timing: PipelineTiming) -> OutputCheck:
    """Compare what the callable returns eager and optimized (``outputs``); when it differs and eager agrees with
    itself, the modules that change it alone (each tried on its own), or every optimized one when none does alone,
    run their fallbacks in their own precision where their winners run in another (``fall_back``), else go back
    to eager; when the pipeline still differs, every module left optimized goes back. Returns the comparison of
    the pipeline as optimize left it before this check."""
    bound = [m for m in modules if m.is_optimized]
    if not bound:
        return OutputCheck(note="every module runs eagerly")
    samples = [split_sample(sample) for _, sample in items]
    generators = SampleGenerators(samples)
    try:
        return _check_outputs(func, samples, generators, modules, bound, folders, tolerances, timing)
    finally:
        generators.rewind()  # the samples' generators as they were, for the passes that follow


def _check_outputs(func: Callable, samples: list[tuple[tuple, dict]], generators: SampleGenerators,
                   modules: list[Module], bound: list[Module], folders: dict[str, Path],
                   tolerances: dict[str, Tolerance], timing: PipelineTiming) -> OutputCheck:
    reference = _outputs(func, samples, generators, modules, lambda m: False)

    def tolerance(group: list[Module]) -> Tolerance:
        return Tolerance.loosest(tolerances.get(m.name, Tolerance()) for m in group)

    def differs(group: list[Module]) -> OutputCheck:
        return compare_leaves(reference, _outputs(func, samples, generators, modules, lambda m: m in group),
                              tolerance(group))

    result = differs(bound)
    if result.ok or not result.checked:
        return result
    again = compare_leaves(reference, _outputs(func, samples, generators, modules, lambda m: False),
                           tolerance(bound))
    if not again.ok:
        log.warning("navdeploy: the pipeline's outputs were not compared: they differ from one eager pass to the "
                    "next (%s)", again.reason)
        return OutputCheck(note=f"not compared: the callable's outputs differ from one eager pass to the next, "
                                f"with torch's generators seeded alike ({again.reason})")
    alone = {m.name: result if len(bound) == 1 else differs([m]) for m in bound}
    culprits = [m for m in bound if not alone[m.name].ok] or bound
    for m in culprits:
        why = f"with it optimized the pipeline's outputs differ from eager: {alone[m.name].reason or result.reason}"
        own = fall_back(m, folders[m.name], why)
        if own is not None:
            tolerances[m.name] = own
            still = differs([m])  # the fallbacks alone, the other modules eager
            if still.ok:
                log.warning("navdeploy: module %s runs its best candidates in its own precision: %s", m.name, why)
                timing.fell_back[m.name] = why
                continue
            why += f"; with its best candidates in its own precision too: {still.reason}"
        _revert(m, why, folders, timing)
    rest = [m for m in modules if m.is_optimized]
    if rest and not (final := differs(rest)).ok:  # the rest still differ together: none of them stays
        for m in rest:
            timing.fell_back.pop(m.name, None)
            _revert(m, f"with the others optimized the pipeline's outputs differ from eager: {final.reason}",
                    folders, timing)
    return result


def _measure(func: Callable, items: list[tuple[int, Any]], modules: list[Module], repeats: int,
             timing: PipelineTiming, warm: bool = True) -> None:
    """``compare``, and once more with twice the passes when the optimized median is the lower one but not by more
    than the spread: a burst from another process during a few passes must not revert a faster module."""
    compare(func, items, modules, repeats, timing, warm)
    if not timing.faster and timing.optimized_s is not None and timing.optimized_s < timing.eager_s:
        log.info("navdeploy: the pipeline check was unsure (eager %s, optimized %s, within the spread of %d passes "
                 "each): timing %d passes each", _ms(timing.eager_s), _ms(timing.optimized_s), repeats, 2 * repeats)
        compare(func, items, modules, 2 * repeats, timing, warm=False)


def check_pipeline(func: Callable, items: list[tuple[int, Any]], modules: list[Module], folders: dict[str, Path],
                   repeats: int, capture_s: float, items_timed: int,
                   tolerances: Optional[dict[str, Tolerance]] = None) -> PipelineTiming:
    """Compare the callable's outputs (``check_outputs``, with each module's ``tolerances``, fp32's by default),
    then A/B its time (``_measure``) and revert modules until the optimized pipeline is faster beyond noise.
    Never raises: a pass that fails leaves ``timing.error`` set and every module as it is."""
    timing = PipelineTiming(capture_s, 0.0, None, items_timed)
    if not any(m.is_optimized for m in modules):
        timing.faster = False  # eager won every graph: timing eager against itself would print a ratio of noise
        return timing
    try:
        timing.outputs = check_outputs(func, items, modules, folders, tolerances or {}, timing)
        if (timing.reverted or timing.fell_back) and not any(m.is_optimized for m in modules):
            timing.faster = False  # every module went back to eager: nothing left to time against eager
            return timing
        _measure(func, items, modules, repeats, timing, warm=not timing.outputs.checked)
        while not timing.faster:
            bound = [m for m in modules if m.is_optimized]
            if not bound:
                break
            loss = {m.name: timing.module_optimized_s.get(m.name, 0.0) - timing.module_eager_s.get(m.name, 0.0)
                    for m in bound}
            worst = max(bound, key=lambda m: loss[m.name])
            why = (f"with it optimized the pipeline was not faster than eager beyond noise (eager "
                   f"{_ms(timing.eager_s)}, optimized {_ms(timing.optimized_s or 0.0)}, medians of {timing.repeats}); "
                   f"its own time: eager {_ms(timing.module_eager_s.get(worst.name, 0.0))}, optimized "
                   f"{_ms(timing.module_optimized_s.get(worst.name, 0.0))}")
            _revert(worst, why, folders, timing)
            if not any(m.is_optimized for m in modules):
                # Every module is eager now: timing eager against itself would print a ratio of noise (a 9.10x
                # "faster" was seen), so the figures stay those that led to the last revert.
                timing.faster = False
                break
            _measure(func, items, modules, repeats, timing)
    except Exception as exc:  # noqa: BLE001 - a measurement must not fail the run
        timing.error = f"{type(exc).__name__}: {exc}"
        log.warning("navdeploy: timing the pipeline failed: %s", timing.error)
    return timing
