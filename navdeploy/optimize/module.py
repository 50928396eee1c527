"""One module, top to bottom: per graph, the candidates to try, built and checked in workers, selected,
written to the manifest, and the winner bound in place."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

import torch

from navdeploy._version import __version__
from navdeploy.candidates.build import Job, Task, new_record
from navdeploy.candidates.isolation import ExecutorPool
from navdeploy.candidates.precision import candidate_name, candidate_precisions, tolerance_precision
from navdeploy.candidates.select import select
from navdeploy.capture.graph import Graph
from navdeploy.config import OptimizeConfig, build_workers, keep_artifacts, resolve_workspace, use_multiprocessing
from navdeploy.formats.base import RunnerSpec
from navdeploy.formats.registry import FORMATS, runners_for
from navdeploy.inplace.binding import bind
from navdeploy.inplace.module import Module
from navdeploy.optimize.events import OptimizeListener
from navdeploy.optimize.scope import logging_to
from navdeploy.optimize.status import GraphStatus, ModuleStatus
from navdeploy.workspace.checkpoint import checkpoint_graph, resume_entry
from navdeploy.workspace.fingerprint import cache_key, checksum, fingerprint
from navdeploy.workspace.identity import ensure_writable
from navdeploy.workspace.inductor import checksum_to_record, discard_unvouched
from navdeploy.workspace.layout import LOG_FILE, artifact_dir, module_dir, now
from navdeploy.workspace.locks import locked
from navdeploy.workspace.manifest import MANIFEST_VERSION, read_manifest, remove_unnamed_builds, write_manifest
from navdeploy.workspace.prune import PRUNED, mark_unused, reclaim_pruned
from navdeploy.workspace.records import CandidateRecord, FormatState, GraphEntry, Manifest
from navdeploy.workspace.samples import save_samples

log = logging.getLogger("navdeploy")


def module_config(module: Module, config: Optional[OptimizeConfig]) -> OptimizeConfig:
    """The module's own config (with the run's workspace when it names none), else the run's, else defaults."""
    own = module.optimize_config
    if own is None:
        return config or OptimizeConfig()
    if own.workspace is None and config is not None and config.workspace is not None:
        return own.replace(workspace=config.workspace)
    return own


def module_device(module: torch.nn.Module) -> str:
    for tensor in module.parameters():
        return tensor.device.type
    for tensor in module.buffers():
        return tensor.device.type
    return "cpu"


def _graph_cache_key(graph: Graph, fp: str, device: str, precision: str, config: OptimizeConfig,
                     batch_sizes: tuple[int, ...], tolerances: dict[str, tuple[float, float]]) -> str:
    shape = {k: v for k, v in graph.to_json().items() if k != "calls"}
    # The tolerances in effect, not only the user's: they follow the TF32 settings too.
    return cache_key(__version__, torch.__version__, fp, shape, device, precision, sorted(tolerances.items()),
                     batch_sizes, config.max_batch_size, config.profile_time_s)


def _valid_formats(old_entry: Optional[GraphEntry], folder: Path) -> dict[str, FormatState]:
    """Formats built by an earlier run whose artifacts are still intact, or were pruned (their records stand)."""
    valid = {}
    for fmt, state in (old_entry.formats if old_entry else {}).items():
        path = old_entry.artifact_folder(folder, fmt)
        if state.status == PRUNED or (state.status == "ok" and path.is_dir() and checksum(path) == state.checksum):
            valid[fmt] = state
    return valid


def _reusable(cached: Optional[CandidateRecord], artifact_ok: bool) -> bool:
    """Whether an earlier run's record stands without running the candidate again: a success whose artifact is
    intact, or a failure, unless that failure was transient and has not been retried yet."""
    if cached is None or cached.worth_retrying():
        return False
    return cached.status == "failed" or (cached.status == "ok" and artifact_ok)


def candidate_pairs(config: OptimizeConfig, device: str, module_precision: str) -> list[tuple[RunnerSpec, str]]:
    """(runner, precision) pairs to try; eager in the module's own precision (the baseline) always comes first."""
    runners = runners_for(device, config.target_formats, config.runners)
    pairs = [(runners[0], module_precision)]
    for runner in runners:
        for precision in candidate_precisions(module_precision, device, config.precisions):
            if (runner, precision) != pairs[0]:
                pairs.append((runner, precision))
    return pairs


def _chains(pairs: list[tuple[RunnerSpec, str]], module_precision: str) -> list[list[tuple[int, RunnerSpec, str]]]:
    """Candidates in chains that may run side by side: runners sharing an exported artifact (ONNX's) form one
    chain, in order, since the first one exports it and the others load it; every other candidate is a chain
    of its own."""
    chains: dict[str, list[tuple[int, RunnerSpec, str]]] = {}
    for index, (runner, precision) in enumerate(pairs):
        name = candidate_name(runner.name, precision, module_precision)
        key = artifact_dir(runner.format.value, precision, module_precision) \
            if FORMATS[runner.format].export is not None else name
        chains.setdefault(key, []).append((index, runner, precision))
    return list(chains.values())


def _optimize_graph(graph: Graph, job: Job, executors: ExecutorPool, config: OptimizeConfig, device: str,
                    old_entry: Optional[GraphEntry], gkey: str, listener: OptimizeListener) -> GraphEntry:
    folder = job.module_dir / graph.key
    save_samples(graph, folder)
    old_entry = resume_entry(job.module_dir, graph.key, gkey, old_entry)  # a killed run's completed candidates
    reusable = old_entry is not None and old_entry.cache_key == gkey
    formats = _valid_formats(old_entry, folder) if reusable else {}
    previous = {c.name: c for c in old_entry.candidates} if reusable else {}
    pairs = candidate_pairs(config, device, job.precision)
    records: dict[int, CandidateRecord] = {}  # by the candidate's place in ``pairs``: the manifest keeps that order
    transient_formats: set[str] = set()  # formats whose export failed transiently this run
    lock = threading.Lock()  # chains run on several threads when the module has several build workers

    def done(index: int, name: str, record: CandidateRecord, checkpoint: bool) -> None:
        with lock:
            records[index] = record
            if checkpoint:  # survives a kill -9 of this run
                checkpoint_graph(job.module_dir, graph.key, gkey, formats, [records[i] for i in sorted(records)])
        listener.candidate_finished(job.module_name, name, bool(record.cached))

    def run_chain(chain: list[tuple[int, RunnerSpec, str]]) -> None:
        with executors.borrow() as executor:
            for index, runner, precision in chain:
                name = candidate_name(runner.name, precision, job.precision)
                fmt = artifact_dir(runner.format.value, precision, job.precision)
                cached = previous.get(name)
                artifact_ok = FORMATS[runner.format].export is None or fmt in formats
                if _reusable(cached, artifact_ok):
                    done(index, name, replace(cached, cached=True), checkpoint=False)
                    continue
                retries = cached.retries + 1 if cached is not None and cached.worth_retrying() else 0
                if retries:
                    log.info("%s graph %s %s: retrying after a transient failure (%s)", job.module_name, graph.key,
                             name, cached.error)
                reason = runner.unavailable_reason()
                if reason:  # decided here: no worker starts, and a builds_alone runner never holds up the others
                    done(index, name, replace(new_record(runner, precision, job.precision), status="skipped",
                                              error=reason), checkpoint=True)
                    continue
                if fmt in formats and formats[fmt].status == "failed":
                    # The artifact it loads failed to export this run: transient when that failure was.
                    done(index, name, replace(new_record(runner, precision, job.precision), step="export",
                                              error=formats[fmt].error, transient=fmt in transient_formats,
                                              retries=retries), checkpoint=False)
                    continue
                listener.candidate_started(job.module_name, name)
                if fmt in formats and formats[fmt].status == PRUNED:  # it runs: its artifact must be there again
                    with lock:
                        del formats[fmt]
                    artifact_ok = False
                record = executor.run(Task(graph.key, runner.name, export=not artifact_ok, precision=precision,
                                           artifact_checksum=formats[fmt].checksum if fmt in formats else None))
                record.retries = retries
                state = None
                if record.exported:
                    state = FormatState("ok", checksum=record.artifact_checksum, export_s=record.times.get("export_s"))
                elif not artifact_ok and record.status == "failed" and record.step in ("export", "isolation"):
                    state = FormatState("failed", error=record.error)
                if state is not None:
                    with lock:
                        formats[fmt] = state
                        if record.transient:
                            transient_formats.add(fmt)
                log.info("%s graph %s %s: %s%s", job.module_name, graph.key, name, record.status,
                         f" ({record.error})" if record.error else "")
                done(index, name, record, checkpoint=True)

    # One worker: every candidate in order, as one chain. Several: chains side by side (profiling still alone).
    executors.map(run_chain, [[(i, r, p) for i, (r, p) in enumerate(pairs)]] if executors.workers == 1
                  else _chains(pairs, job.precision))
    candidates = [records[i] for i in sorted(records)]
    batch = graph.inputs[0].opt_shape[0] if graph.batching and graph.inputs else None
    eager = candidate_name(pairs[0][0].name, pairs[0][1], job.precision)  # the baseline comes first
    winner = select(candidates, config.strategy, batch, eager)
    rebuild = reclaim_pruned(formats, candidates, winner, job.precision)  # the winner needs a pruned artifact
    if rebuild:
        executors.map(run_chain, [[(i, r, p) for i, (r, p) in enumerate(pairs)
                                   if artifact_dir(r.format.value, p, job.precision) in rebuild]])
        candidates = [records[i] for i in sorted(records)]
        winner = select(candidates, config.strategy, batch, eager)
    return GraphEntry(graph, gkey, formats, candidates, winner.name if winner else None, now())


def optimize_module(module: Module, graphs: list[Graph], config: OptimizeConfig,
                    listener: OptimizeListener) -> ModuleStatus:
    """Optimize one module's captured graphs, write its manifest and bind the winners; events go to ``listener``."""
    start = time.perf_counter()
    workspace = resolve_workspace(config)
    ensure_writable(workspace)
    folder = module_dir(workspace, module.name)
    device = config.target_device or module_device(module.__wrapped__)
    with locked(folder, config.timeout_s), logging_to(folder / LOG_FILE, listener.log_handlers()):
        log.info("optimizing %s: %d graph(s) on %s", module.name, len(graphs), device)
        if module.__wrapped__.training:
            log.warning("module %s is in training mode; call .eval() before nav.optimize for stable results",
                        module.name)
        precision = module.precision  # read once: given, or from the weights (an fp16 module is not cast again)
        if module.precision_inferred:
            log.info("%s: precision %s, read from its weights (pass precision= to nav.Module to set it)",
                     module.name, precision)
        fp = fingerprint(module.__wrapped__)
        old = read_manifest(folder)
        discard_unvouched(folder, old.inductor_cache if old else None)  # before anything compiles into it
        old_graphs = old.graphs if old and old.fingerprint == fp and old.device == device else {}
        batch_sizes = config.profile_batch_sizes(max(g.inputs[0].max_shape[0] if g.batching else 1 for g in graphs))
        checked_as = {p: tolerance_precision(p, module.__wrapped__, device)
                      for p in candidate_precisions(precision, device, config.precisions) + (precision,)}
        tolerances = {p: config.tolerance_for(q) for p, q in checked_as.items()}
        if checked_as.get("fp32") == "tf32":
            log.info("%s: fp32 candidates are checked with the tf32 tolerance %s, as eager itself runs TF32 "
                     "convolutions/matmuls here (set torch.backends.cudnn.allow_tf32 = False for a strict check)",
                     module.name, tolerances["fp32"])
        job = Job(module.name, module.__wrapped__, module.nav_state.forward_func, {g.key: g for g in graphs}, folder,
                  device, precision, tolerances, config.verify_func, batch_sizes, config.max_batch_size,
                  config.profile_time_s)
        entries = dict(old_graphs)  # graphs not seen this time stay valid: same weights, same device
        workers = build_workers(config, device, module.__wrapped__)  # from cores and GPU memory unless given
        with module._nav_unpatched(), ExecutorPool(job, use_multiprocessing(config), config.timeout_s,
                                                   folder / LOG_FILE, workers) as executors:
            for graph in graphs:
                gkey = _graph_cache_key(graph, fp, device, precision, config, batch_sizes, tolerances)
                entries[graph.key] = _optimize_graph(graph, job, executors, config, device,
                                                     old_graphs.get(graph.key), gkey, listener)
        wrapped = type(module.__wrapped__)
        manifest = Manifest(module.name, fp, device, MANIFEST_VERSION, __version__, torch.__version__,
                            f"{wrapped.__module__}.{wrapped.__qualname__}", precision,
                            module.nav_state.forward_func, config.max_batch_size, list(batch_sizes),
                            dict(tolerances), entries, now(), precision_inferred=module.precision_inferred)
        # Bound first: its warm-up compiles into the module's inductor cache, whose checksum the manifest records.
        optimized = bind(module, folder, manifest, fp, in_optimize=True)
        manifest.inductor_cache = checksum_to_record(folder)
        if not keep_artifacts(config):
            mark_unused(manifest)  # builds nothing will load: their records stay, their folders go below
        try:
            write_manifest(folder, manifest)  # last: a killed run leaves the old manifest
        except BaseException:
            module.nav_state.unbind()  # what is bound stands for a manifest on disk, or nothing
            raise
        # Earlier builds, and the pruned ones, go only now: the new manifest is in place.
        remove_unnamed_builds(folder, manifest, old)
    statuses = [GraphStatus(g.key, entries[g.key].selected, entries[g.key].candidates, g.batching)
                for g in graphs]
    return ModuleStatus(module.name, folder, device, statuses, optimized, time.perf_counter() - start, tolerances,
                        precision=precision, precision_inferred=module.precision_inferred)
