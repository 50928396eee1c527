"""After selection, the artifact folders of a module that nothing will load are removed; their candidates'
records stay in the manifest, so a re-run reuses them instead of building the losers again.

What stays, per graph (:func:`artifacts_in_use`):
- the selected candidate's artifact folder: ``bind``/``load_optimized`` load it, and a native Triton model
  (``export_model_repository``, backend ``auto``) copies it; the fallback's too (``GraphEntry.fallback``: the
  pipeline check binds it when the winner's other precision changes the pipeline's outputs);
- when the selected candidate's (or the fallback's) format has no artifact the templated Python-backend
  ``model.py`` can load (torch.compile, eager, TensorRT), the artifact the export falls back to: the fastest
  verified candidate's among the formats that ``model.py`` loads (``TritonMapping.python_preference``), in the
  same precision where one is (:func:`python_artifact_choice`, which ``triton/emit.py`` exports).

A removed build's state in the manifest becomes ``pruned`` (its checksum kept). The manifest is written before
anything is deleted, and the folders go with the other builds the manifest no longer names
(``manifest.remove_unnamed_builds``), so a run killed in between leaves folders the next run removes. Only build
folders navdeploy names so are removed, never a symbolic link or anything else in the workspace.
``OptimizeConfig(keep_artifacts=True)`` or ``NAVDEPLOY_KEEP_ARTIFACTS=1`` keeps everything (e.g. to choose another
candidate by hand later).

When a later run selects a candidate whose artifact is gone (other ``runners`` or ``strategy`` than the run that
pruned), :func:`reclaim_pruned` says which folders to build again.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from navdeploy.formats.base import Format
from navdeploy.formats.registry import FORMATS
from navdeploy.workspace.records import CandidateRecord, FormatState, GraphEntry, Manifest

log = logging.getLogger("navdeploy")

PRUNED = "pruned"


def _python_preference(fmt: str) -> Optional[int]:
    try:
        return FORMATS[Format(fmt)].triton.python_preference
    except ValueError:  # a format this version does not know: nothing loads it
        return None


def _has_artifact(fmt: str) -> bool:
    try:
        return FORMATS[Format(fmt)].export is not None
    except ValueError:
        return False


def _p50(candidate: CandidateRecord) -> float:
    p50 = candidate.shown_p50_ms()  # a screened candidate's screen figure
    return float("inf") if p50 is None else p50


def artifacts_in_use(entry: GraphEntry, module_precision: str) -> set[str]:
    """The artifact folder names of one graph that something may load (see the module docstring); empty when
    nothing was selected."""
    winner = entry.selected_candidate()
    if winner is None:
        return set()
    keep = set()
    # Pruned folders count as built: what the export would choose with every folder there is what is in use.
    built = {name for name, state in entry.formats.items() if state.status in ("ok", PRUNED)}
    usable = [c for c in entry.candidates if c.verified and _python_preference(c.format) is not None
              and c.artifact_dir(module_precision) in built]
    for chosen in (winner, entry.fallback_candidate()):
        if chosen is None:
            continue
        if _has_artifact(chosen.format):
            keep.add(chosen.artifact_dir(module_precision))
        if _python_preference(chosen.format) is None:
            best = python_artifact_choice(usable, chosen, module_precision)
            if best is not None:
                keep.add(best.artifact_dir(module_precision))
    return keep


def python_artifact_choice(usable: Sequence[CandidateRecord], chosen: CandidateRecord,
                           module_precision: str) -> Optional[CandidateRecord]:
    """The candidate whose artifact a Python-backend model runs for ``chosen`` when ``model.py`` cannot load
    ``chosen``'s own (``usable``: the verified ones it can load): the fastest, in ``chosen``'s precision where one
    is (not the low-precision build the pipeline check passed over for a fallback), the format ``model.py``
    prefers on a tie. ``triton/emit.py`` exports it; pruning keeps it."""
    precision = chosen.precision_in(module_precision)
    same = [c for c in usable if c.precision_in(module_precision) == precision] or list(usable)
    return min(same, key=lambda c: (_p50(c), _python_preference(c.format)), default=None)


def mark_unused(manifest: Manifest) -> list[str]:
    """Mark the builds of ``manifest``'s graphs that nothing will load ``pruned`` (their checksums and every
    candidate's record stay), in place; returns them as ``<graph>/<format>``. The folders go with the other
    builds the manifest no longer names, once it is written (``manifest.remove_unnamed_builds``)."""
    marked = []
    for key, entry in manifest.graphs.items():
        keep = artifacts_in_use(entry, manifest.precision)
        for name, state in entry.formats.items():
            if name not in keep and state.status == "ok":
                entry.formats[name] = FormatState(PRUNED, checksum=state.checksum, export_s=state.export_s)
                marked.append(f"{key}/{name}")
    if marked:
        log.info("%s: %d build(s) nothing will load are removed: %s; their records stay (keep_artifacts=True keeps "
                 "them)", manifest.module, len(marked), ", ".join(marked))
    return marked


def reclaim_pruned(formats: dict[str, FormatState], candidates: Sequence[CandidateRecord],
                   selected: Optional[CandidateRecord], module_precision: str,
                   fallback: Optional[CandidateRecord] = None) -> set[str]:
    """When what is selected now (or its ``fallback``) needs a folder an earlier prune removed: every pruned
    folder's name, each dropped from ``formats`` so that its candidates run again and export it (all of them, as
    the winner chosen after those runs may be another of them). Empty, and ``formats`` untouched, otherwise."""
    entry = GraphEntry(None, formats=formats, candidates=list(candidates),
                       selected=selected.name if selected is not None else None,
                       fallback=fallback.name if fallback is not None else None)
    pruned = {name for name, state in formats.items() if state.status == PRUNED}
    if not pruned & artifacts_in_use(entry, module_precision):
        return set()
    for name in pruned:
        del formats[name]
    log.info("the selected candidate needs artifacts an earlier run removed; building %s again", sorted(pruned))
    return pruned
