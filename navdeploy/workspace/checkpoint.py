"""A graph's candidate records so far, written after each one, so a killed run resumes where it stopped."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from navdeploy.workspace.atomic import write_json_atomic
from navdeploy.workspace.layout import MANIFEST, now
from navdeploy.workspace.manifest import MANIFEST_VERSION, check_entry, need
from navdeploy.workspace.records import CandidateRecord, FormatState, GraphEntry

log = logging.getLogger("navdeploy")


CHECKPOINT = "checkpoint.json"


def checkpoint_graph(module_folder: Path, graph_key: str, cache_key_: str, formats: dict[str, FormatState],
                     candidates: list[CandidateRecord]) -> None:
    """Record a graph's progress (its built formats and every candidate record so far) atomically, after each
    candidate. A run killed mid-way loses at most the candidate that was running: the next run resumes
    from here (see :func:`resume_entry`). The manifest itself is still written only when the module is done."""
    write_json_atomic(module_folder / graph_key / CHECKPOINT,
                      {"version": MANIFEST_VERSION, "cache_key": cache_key_,
                       "formats": {k: v.to_json() for k, v in formats.items()},
                       "candidates": [c.to_json() for c in candidates], "updated": now()})


def resume_entry(module_folder: Path, graph_key: str, cache_key_: str,
                 entry: Optional[GraphEntry]) -> Optional[GraphEntry]:
    """The best earlier state of a graph for a run whose cache key is ``cache_key_``: the manifest's ``entry``,
    updated with a newer checkpoint of the same cache key (a run that was killed). Records of candidates are
    reused as optimize reuses cached ones; artifacts are still checked against their checksums before use."""
    path = module_folder / graph_key / CHECKPOINT
    try:
        data = json.loads(path.read_text())
        need(isinstance(data, dict) and data.get("version") == MANIFEST_VERSION, "not a checkpoint")
        if data.get("cache_key") != cache_key_:
            return entry  # another configuration, weights or torch: nothing in it applies
        manifest = module_folder / MANIFEST
        if entry is not None and entry.cache_key == cache_key_ and manifest.exists() \
                and manifest.stat().st_mtime_ns >= path.stat().st_mtime_ns:
            return entry  # the manifest was written after the checkpoint: it is complete
        check_entry(graph_key, data, graph=False)
        checkpoint = GraphEntry.from_json({**data, "graph": None})
    except FileNotFoundError:
        return entry
    except (OSError, ValueError, RecursionError) as exc:
        log.warning("ignoring checkpoint %s (%s)", path, exc)
        return entry
    base = entry if entry is not None and entry.cache_key == cache_key_ else GraphEntry(None)
    records = {c.name: c for c in base.candidates}
    records.update({c.name: c for c in checkpoint.candidates})
    log.info("resuming graph %s from the checkpoint of an interrupted run: %d candidate record(s)", graph_key,
             len(checkpoint.candidates))
    return GraphEntry(base.graph, cache_key_, {**base.formats, **checkpoint.formats}, list(records.values()),
                      base.selected, base.updated)
