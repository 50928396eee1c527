"""One module, top to bottom: per graph, the candidates to try, built and checked in workers, selected,
written to the manifest, and the winner bound in place."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional

import torch

from navdeploy._version import __version__
from navdeploy.candidates.build import Job, Task, new_record
from navdeploy.candidates.isolation import Executor, ExecutorPool, WorkerHub
from navdeploy.candidates.precision import (
    EARLY_FOLLOW_UP_FACTOR,
    candidate_name,
    candidate_precisions,
    eager_copy_predicts,
    follow_up_min_ms,
    follow_up_precisions,
    follow_ups_early,
    tolerance_precision,
)
from navdeploy.candidates.profile import MIN_CALLS, combine_rounds
from navdeploy.candidates.search import (
    RECHECK_MARGIN,
    Search,
    copy_clearly_faster,
    eager_kernels_skip_reason,
    early_follow_up_pairs,
    early_screen_rechecked,
    follow_up_pairs,
    graph_search,
    low_precision_skip_reason,
    own_precision_skip_reason,
    search_order,
    twin_skip_reason,
)
from navdeploy.candidates.select import call_ms, own_precision_fallback, prefer_own_precision, select
from navdeploy.capture.graph import Graph
from navdeploy.config import (
    PRECISIONS,
    MaxThroughput,
    OptimizeConfig,
    build_workers,
    follow_ups_beside,
    keep_artifacts,
    resolve_workspace,
    thorough,
    use_multiprocessing,
)
from navdeploy.formats.base import RunnerSpec
from navdeploy.formats.registry import FORMATS, runners_for
from navdeploy.inplace.binding import bind, loads_from_inductor_cache
from navdeploy.inplace.module import Module
from navdeploy.optimize.events import OptimizeListener
from navdeploy.optimize.scope import inductor_cache, logging_to
from navdeploy.optimize.status import GraphStatus, ModuleStatus
from navdeploy.workspace.checkpoint import checkpoint_graph, resume_entry
from navdeploy.workspace.fingerprint import cache_key, checksum, fingerprint
from navdeploy.workspace.identity import claim_module_folder, ensure_writable
from navdeploy.workspace.inductor import cache_dir, cache_environment, checksum_to_record, discard_unvouched
from navdeploy.workspace.inductor import remove_unused as remove_unused_cache
from navdeploy.workspace.layout import LOG_FILE, artifact_dir, module_dir, now
from navdeploy.workspace.locks import locked
from navdeploy.workspace.manifest import MANIFEST_VERSION, read_manifest, remove_unnamed_builds, write_manifest
from navdeploy.workspace.prune import PRUNED, mark_unused, reclaim_pruned
from navdeploy.workspace.records import CandidateRecord, FormatState, GraphEntry, Manifest, ProfilePoint
from navdeploy.workspace.samples import save_samples

log = logging.getLogger("navdeploy")


def captured_batch_sizes(graphs: list[Graph]) -> list[int]:
    """The batch sizes the module's calls came in (1 for a graph that does not batch)."""
    sizes: set[int] = set()
    for graph in graphs:
        if not graph.batching:
            sizes.add(1)
        else:
            sizes.update(graph.batch_counts or {graph.inputs[0].max_shape[0]: 1})
    return sorted(sizes)


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


def _reusable(cached: Optional[CandidateRecord], artifact_ok: bool, thorough: bool = False) -> bool:
    """Whether an earlier run's record stands without running the candidate again: a success whose artifact is
    intact, a screened candidate's too unless the search is thorough (that profiles it in full, from its artifact),
    or a failure, unless that failure was transient and has not been retried yet. A skipped candidate is decided
    again (a package may have been installed; a twin may have to be built now)."""
    if cached is None or cached.worth_retrying():
        return False
    if cached.status == "screened":
        return artifact_ok and not thorough
    return cached.status == "failed" or (cached.status == "ok" and artifact_ok)


def candidate_pairs(config: OptimizeConfig, device: str, module_precision: str) -> list[tuple[RunnerSpec, str]]:
    """(runner, precision) pairs to try, in the order the search builds them: eager in the module's own precision
    (the baseline) first, then the likely winners (``search.search_order``)."""
    runners = runners_for(device, config.target_formats, config.runners)
    pairs = [(runners[0], module_precision)]
    for runner in runners:
        for precision in candidate_precisions(module_precision, device, config.precisions):
            if (runner, precision) != pairs[0]:
                pairs.append((runner, precision))
    return search_order(pairs)


def _serves_python_backend(runner: RunnerSpec) -> bool:
    """Whether ``runner``'s build gives a Python-backend Triton model an artifact to load, other than one that runs
    eager's kernels again (what ``search.eager_kernels_skip_reason`` asks for)."""
    return not runner.runs_eager_kernels and FORMATS[runner.format].triton.python_preference is not None


def _chains(pairs: list[tuple[RunnerSpec, str]], module_precision: str,
            start: int = 0) -> list[list[tuple[int, RunnerSpec, str]]]:
    """Candidates from ``start`` on in chains that may run side by side: runners sharing an exported artifact
    (ONNX's) form one chain, in order, since the first one exports it and the others load it; a runner with a
    ``twin_of`` joins its first twin's chain, after it, so the search knows whether it must be built; one that
    ``runs_eager_kernels`` joins the chain of the last build before it that a Python-backend model loads, for the
    same reason (``eager_kernels_skip_reason``); every other candidate is a chain of its own."""
    chains: dict[str, list[tuple[int, RunnerSpec, str]]] = {}
    keys: dict[tuple[str, str], str] = {}
    loadable: dict[str, str] = {}  # by precision: the chain of the last build a Python-backend model loads
    for index, (runner, precision) in enumerate(pairs):
        if index < start:
            continue
        name = candidate_name(runner.name, precision, module_precision)
        key = artifact_dir(runner.format.value, precision, module_precision) \
            if FORMATS[runner.format].export is not None else name
        key = keys.get((runner.twin_of[0], precision), key) if runner.twin_of else key
        if runner.runs_eager_kernels:
            key = loadable.get(precision, key)
        elif _serves_python_backend(runner):
            loadable[precision] = key
        keys[(runner.name, precision)] = key
        chains.setdefault(key, []).append((index, runner, precision))
    return list(chains.values())


def _summed_times(*records: CandidateRecord) -> dict[str, Optional[float]]:
    """The records' seconds per step, added up (a reload adds its load and verify time to the first one's)."""
    times: dict[str, Optional[float]] = {}
    for record in records:
        for key, seconds in record.times.items():
            times[key] = (times.get(key) or 0.0) + (seconds or 0.0)
    return times


def _merge_profile(screened: CandidateRecord, profiled: CandidateRecord) -> CandidateRecord:
    """A screened candidate's record after its full profile, or a built one's after its screen: the build's
    figures stay, the timing (or the failure of that step) is added."""
    times = _summed_times(screened, profiled)
    window, pid = screened.window, profiled.pid or screened.pid
    if screened.status == "built":  # the worker that built it, and when it was timed
        pid = screened.pid or profiled.pid
        if window is not None and profiled.window is not None:
            window = replace(window, profile=profiled.window.profile, end=profiled.window.end)
    return replace(screened, status=profiled.status, error=profiled.error, step=profiled.step,
                   profile=profiled.profile, screen=profiled.screen or screened.screen, times=times,
                   transient=profiled.transient, cached=False, pid=pid, window=window)


def _retime(graph: Graph, job: Job, executors: ExecutorPool, search: Search, pairs: list[tuple[RunnerSpec, str]],
            formats: dict[str, FormatState], built_by: dict[int, Executor], index: int, plan: str,
            **task: object) -> CandidateRecord:
    """Time the candidate at ``index`` again (``plan``: screen or profile) from its build, which ``formats`` names,
    on the executor that ran it last (its worker may hold the runner; it holds it afterwards). A build an earlier
    run pruned is exported again first, and ``formats`` records it."""
    runner, precision = pairs[index]
    fmt = artifact_dir(runner.format.value, precision, job.precision)
    state = formats.get(fmt)
    with executors.borrow(prefer=built_by.get(index)) as executor:
        result = executor.run(Task(graph.key, runner.name, export=state is not None and state.status == PRUNED,
                                   precision=precision, artifact_checksum=state.checksum if state is not None else None,
                                   plan=plan, screen_batch=search.batch, retime=True, **task))
        built_by[index] = executor
    if result.exported:
        formats[fmt] = FormatState("ok", checksum=result.artifact_checksum, export_s=result.times.get("export_s"))
    return result


def _optimize_graph(graph: Graph, job: Job, executors: ExecutorPool, config: OptimizeConfig, device: str,
                    old_entry: Optional[GraphEntry], gkey: str, listener: OptimizeListener,
                    beside: bool = False, alone: bool = True) -> GraphEntry:
    """One graph's search; ``beside``: the pool has a worker more than its build workers, for the follow-up
    precisions' copies built beside the module's own candidates (``config.follow_ups_beside``); ``alone``: no
    other module is optimized side by side (beside others, a CPU module builds everything before its screens)."""
    folder = job.module_dir / graph.key
    save_samples(graph, folder)
    old_entry = resume_entry(job.module_dir, graph.key, gkey, old_entry)  # a killed run's completed candidates
    reusable = old_entry is not None and old_entry.cache_key == gkey
    formats = _valid_formats(old_entry, folder) if reusable else {}
    previous = {c.name: c for c in old_entry.candidates} if reusable else {}
    pairs = candidate_pairs(config, device, job.precision)
    batch = graph.typical_batch
    search = graph_search(config.strategy, thorough(config), graph.batching, batch, job.batch_sizes)
    records: dict[int, CandidateRecord] = {}  # by the candidate's place in ``pairs``: the manifest keeps that order
    built_by: dict[int, Executor] = {}  # which executor screened a candidate: it may still hold its runner
    transient_formats: set[str] = set()  # formats whose export failed transiently this run
    lock = threading.Lock()  # chains run on several threads when the module has several build workers
    follow_ups_from = len(pairs)  # the place of the first follow-up precision's candidate, once there are some
    rechecked: set[int] = set()  # candidates screened a second time (Search.rechecks)
    side_from: Optional[int] = None  # the place of the first follow-up built beside the module's own candidates
    # Per follow-up precision: eager and its copy there as screened in turns (eager_copy_in_turns).
    copy_against: dict[str, tuple[CandidateRecord, CandidateRecord]] = {}
    beside = beside and executors.workers > 1
    builds = executors.workers - beside  # workers for the module's own candidates
    # At the batch the strategy compares candidates at (MaxThroughput: the largest profiled one).
    compared = (search.batch, None) if isinstance(config.strategy, MaxThroughput) else (batch, graph.batch_weights)
    follow_ups = follow_up_precisions(job.precision, device, config.precisions)
    min_ms = follow_up_min_ms(job.module)

    def done(index: int, name: str, record: CandidateRecord, checkpoint: bool, finished: bool = True) -> None:
        with lock:
            records[index] = record
            if checkpoint:  # survives a kill -9 of this run
                checkpoint_graph(job.module_dir, graph.key, gkey, formats, [records[i] for i in sorted(records)])
        if finished:
            listener.candidate_finished(job.module_name, name, bool(record.cached))

    def record_of(runner_name: Optional[str], precision: str) -> Optional[CandidateRecord]:
        with lock:
            return next((r for i, r in records.items() if pairs[i][0].name == runner_name and pairs[i][1] == precision),
                        None)

    def loadable_in(precision: str) -> Optional[CandidateRecord]:
        # A verified build whose artifact a Python-backend Triton model loads, other than eager's kernels again.
        with lock:
            return next((r for i, r in sorted(records.items())
                         if r.verified and pairs[i][1] == precision and _serves_python_backend(pairs[i][0])), None)

    def named(runner: RunnerSpec) -> bool:
        return config.runners is not None and runner.name in config.runners

    def eager_and_copy(precision: str) -> tuple[Optional[CandidateRecord], Optional[CandidateRecord]]:
        # Eager and its copy in ``precision`` as screened in turns this run, else their records (an earlier run's
        # screens, where this run took them from the manifest).
        return copy_against.get(precision) or (record_of(pairs[0][0].name, job.precision),
                                               record_of(pairs[0][0].name, precision))

    def verified_copy(runner: RunnerSpec, precision: str) -> Optional[CandidateRecord]:
        # The runner's build in a follow-up precision, or its twin's there (torch.compile's copy is not built
        # beside AOTInductor's): what stands for the runner when own_precision_skip_reason skips it.
        copies = (record_of(name, precision) for name in (runner.name, *runner.twin_of))
        return next((r for r in copies if r is not None and r.verified), None)

    def copies_first(chains: list[list[tuple[int, RunnerSpec, str]]]) -> list[list[tuple[int, RunnerSpec, str]]]:
        # Where eager's copy ran clearly faster (copy_clearly_faster), each of the module's own builds that has a
        # copy (its own or its twin's) waits for it, on the copy's chain: skipped once the copy verifies, built
        # when it fails. One chain (one build worker) keeps its order otherwise.
        lead = [p for p in follow_ups if copy_clearly_faster(*eager_and_copy(p), search)]
        placed = {(r.name, p): chain for chain in chains for _, r, p in chain}

        def copy_chain(item: tuple[int, RunnerSpec, str]) -> Optional[list[tuple[int, RunnerSpec, str]]]:
            index, runner, _ = item
            if not 0 < index < follow_ups_from:
                return None
            return next((placed[(name, p)] for p in lead for name in (runner.name, *runner.twin_of)
                         if (name, p) in placed), None)

        if len(chains) == 1:
            return [sorted(chains[0], key=lambda item: copy_chain(item) is not None)]
        kept = []
        for chain in chains:
            target = copy_chain(chain[0])
            if target is None or target is chain:
                kept.append(chain)
            else:
                target.extend(chain)
        return kept

    def run_chain(chain: list[tuple[int, RunnerSpec, str]], build_only: bool = False) -> None:
        # Eager's worker holds the module already: the module's own chain takes it, the follow-ups' another.
        # ``build_only``: each candidate stops once verified (status "built"), to be screened by screen_built.
        side = side_from is not None and chain[0][0] >= side_from
        with executors.borrow(prefer=None if side else built_by.get(0), avoid=built_by.get(0) if side else None) \
                as executor:
            for index, runner, precision in chain:
                name = candidate_name(runner.name, precision, job.precision)
                fmt = artifact_dir(runner.format.value, precision, job.precision)
                cached = previous.get(name)
                artifact_ok = FORMATS[runner.format].export is None or fmt in formats
                if _reusable(cached, artifact_ok, search.thorough):
                    done(index, name, replace(cached, cached=True), checkpoint=False)
                    continue
                retries = cached.retries + 1 if cached is not None and cached.worth_retrying() else 0
                if retries:
                    log.info("%s graph %s %s: retrying after a transient failure (%s)", job.module_name, graph.key,
                             name, cached.error)
                reason = runner.unavailable_reason() or twin_skip_reason(
                    runner, [record_of(twin, precision) for twin in runner.twin_of], search) or \
                    eager_kernels_skip_reason(runner, loadable_in(precision), search, named(runner))
                if not reason and index >= follow_ups_from:
                    reason = low_precision_skip_reason(runner, *eager_and_copy(precision), search,
                                                       eager_copy_predicts(runner, job.module, precision))
                if not reason and 0 < index < follow_ups_from:
                    reason = next(filter(None, (own_precision_skip_reason(runner, verified_copy(runner, p),
                                                                          *eager_and_copy(p), search)
                                                for p in follow_ups)), None)
                if reason:  # decided here: no worker starts, and a builds_alone runner never holds up the others
                    log.info("%s graph %s %s: skipped (%s)", job.module_name, graph.key, name, reason)
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
                with lock:
                    keep_below = search.keep_below_ms(records.values())
                compiles_at_load = FORMATS[runner.format].export is None  # torch.compile: no export to say so
                prepares = runner.prepare_loading is not None and (not artifact_ok or compiles_at_load)
                if prepares:
                    # This process binds the winner: what loading it needs (seconds) starts once this build (or one
                    # beside it) runs only compilers, or as it ends.
                    executors.prepare_to_load(runner.prepare_loading)
                    if compiles_at_load:
                        executors.start_preparing()
                record = executor.run(Task(graph.key, runner.name, export=not artifact_ok, precision=precision,
                                           artifact_checksum=formats[fmt].checksum if fmt in formats else None,
                                           plan="build" if build_only else search.plan(),
                                           screen_batch=search.batch, keep_below_ms=keep_below))
                record.retries = retries
                if prepares and record.exported:  # a build that never said it compiles (an Inductor cache hit)
                    executors.start_preparing()
                built_by[index] = executor
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
                if index >= follow_ups_from and runner is pairs[0][0] and record.status == "screened":
                    eager_copy_in_turns(executor, index)

    def eager_copy_in_turns(executor: Executor, index: int) -> None:
        # Whether the other copies build rests on eager's copy against eager. Eager's own figure is from the start
        # of the run, and such figures move by 40% between runs (a full profile: 5.0-7.0 ms at batch 2 on the SD
        # UNet, its bf16 copy 5.6-5.9), more than the margin; screened in turns, in one worker and with the gate
        # held, both meet the same load.
        eager, copy = records.get(0), records[index]
        if eager is None or not eager.verified or copy.screen is None or search.thorough:
            return
        rounds: dict[int, list[ProfilePoint]] = {0: [], index: [copy.screen]}
        with executors.timing_held():
            for _ in range(COPY_ROUNDS):
                for i in rounds:
                    runner, precision = pairs[i]
                    result = executor.run(Task(graph.key, runner.name, export=False, precision=precision,
                                               plan="screen", screen_batch=search.batch, rounds=True))
                    if result.status == "screened" and result.screen is not None:
                        rounds[i].append(result.screen)
        if not rounds[0]:
            return
        own, here = combine_rounds(rounds[0]), combine_rounds(rounds[index])
        with lock:
            copy_against[copy.precision_in(job.precision)] = (replace(eager, screen=own), replace(copy, screen=here))
        log.info("%s graph %s %s: %.3f ms against %s's %.3f (medians of %d and %d screens in turns)",
                 job.module_name, graph.key, copy.name, here.p50_ms, eager.name, own.p50_ms, len(rounds[index]),
                 len(rounds[0]))

    def own_chains(start: int, end: int) -> list[list[tuple[int, RunnerSpec, str]]]:
        # One build worker: every candidate in order, as one chain. Several: chains side by side.
        if builds == 1:
            return [[(i, r, p) for i, (r, p) in enumerate(pairs) if start <= i < end]]
        return _chains(pairs[:end], job.precision, start)

    def run_from(start: int) -> None:
        # Eager runs first and alone: with several workers, or beside other modules, its timing would otherwise
        # wait for the first builds to end, holding off every build after them (timing is still alone).
        side_by_side = not alone and device == "cpu" and search.screens
        # Beside other modules, eager and (where the copies will be tried) eager's copy are timed in one hold of
        # the gate, before this module's first build: a timing asked for once the others build waits for their
        # builds in flight (15 s of the SD UNet's, for the VAE's bf16 build), and the modules beside it hold
        # theirs meanwhile, so every module's timings come first and the builds of all start together.
        with executors.timing_held() if start == 0 and side_by_side and follow_ups else contextlib.nullcontext():
            if start == 0:
                run_chain([(0, *pairs[0])])
                start = 1
            eager_record = records.get(0)
            eager_ms = None
            if start == 1 and follow_ups and eager_record is not None and eager_record.verified:
                eager_ms = call_ms(eager_record, *compared) if eager_record.ok else \
                    eager_record.screen_ms(search.batch)
                if eager_ms is not None and not eager_record.ok and not eager_record.cached and \
                        early_screen_rechecked(eager_ms, min_ms):
                    eager_ms = eager_second_screen()
            early = eager_ms is not None and follow_ups_early(eager_ms, min_ms)
            if start == 1 and beside and eager_ms is not None:
                if early:
                    early_follow_ups(eager_ms)
                    return
                if search.screens:  # no copies to build (yet): the spare worker builds the module's own candidates
                    builds_first(_chains(pairs, job.precision, 1))
                    return
            if side_by_side and early:
                # Its follow-up copies are built with the module's own candidates, before any screen: the leaders'
                # full profiles, in its own precision and again with the copies', each waited out the other
                # modules' builds in flight (13 s of the SD UNet's first profiles). Eager's copy, screened in turns
                # with eager now, decides which copies build (low_precision_skip_reason) and which of the module's
                # own builds its copies stand for (own_precision_skip_reason).
                add_early_copies(eager_ms)
                screen_eager_copy()
        if side_by_side:
            # Beside other modules a screen waits for their builds in flight and stops their next ones meanwhile:
            # every build of this module first, then its screens back to back.
            builds_first(copies_first([[c for c in chain if c[0] not in records]
                                       for chain in own_chains(start, len(pairs))]))
            return
        executors.map(run_chain, own_chains(start, len(pairs)))

    def eager_second_screen() -> Optional[float]:
        # Eager's one screen put it just over the bar from which the copies are tried beside the module's own
        # candidates (early_screen_rechecked): a second screen, as for rechecks (and so not a third one later).
        _second_screen(graph, job, executors, search, pairs, records, formats, built_by, done, listener, rechecked, 0,
                       f" (the first was within {100 * RECHECK_MARGIN:.0f}% of the "
                       f"{EARLY_FOLLOW_UP_FACTOR * min_ms:.2f} ms from which the follow-up copies are tried beside)")
        return records[0].screen_ms(search.batch)

    def screen_eager_copy() -> Optional[int]:
        # Eager's copy in the follow-up precision, built, screened, and screened again in turns with eager
        # (eager_copy_in_turns); its place in pairs, or None where it is not a candidate.
        index = next((i for i in range(follow_ups_from, len(pairs)) if pairs[i][0] is pairs[0][0]), None)
        if index is not None:
            run_chain([(index, *pairs[index])])
        return index

    def builds_first(chains: list[list[tuple[int, RunnerSpec, str]]]) -> None:
        # Every build on the module's workers (one beside other modules, two alone) before any timing (a chain's
        # screen would otherwise wait for the builds in flight, and hold off this worker's next build meanwhile),
        # then each candidate is screened from its build, one at a time.
        executors.map(lambda chain: run_chain(chain, build_only=True), chains)
        # The screens back to back, holding the timing gate: a build of a module beside this one, started between
        # two screens, held the next one off for its whole length (15 s of the SD UNet's screens waited for the VAE's
        # bf16 build).
        with executors.timing_held():
            for index in [i for i in sorted(records) if records[i].status == "built"]:
                screen_built(index)

    def screen_built(index: int) -> None:
        built = records[index]
        with lock:
            keep_below = search.keep_below_ms(records.values())
        listener.candidate_started(job.module_name, f"{built.name} (screen)")
        screened = _retime(graph, job, executors, search, pairs, formats, built_by, index, "screen",
                           keep_below_ms=keep_below)
        record = _merge_profile(built, screened)
        log.info("%s graph %s %s: %s%s", job.module_name, graph.key, record.name, record.status,
                 f" ({record.error})" if record.error else "")
        done(index, record.name, record, checkpoint=True, finished=False)

    def add_early_copies(eager_ms: float) -> int:
        # Eager's timing already shows that the follow-up copies will be tried: they join the module's own
        # candidates (early_follow_up_pairs: those that start with a build first). Returns where they start.
        nonlocal follow_ups_from
        extra = early_follow_up_pairs(pairs, follow_ups,
                                      lambda r, p: not eager_copy_predicts(r, job.module, p))
        own_end = follow_ups_from = len(pairs)
        pairs.extend(extra)
        log.info("%s graph %s: eager takes %.2f ms a call%s: trying %s beside the %s candidates (precisions=(%r,) "
                 "keeps %s only)", job.module_name, graph.key, eager_ms,
                 ", and its matmuls are wide" if min_ms == 0 else "",
                 ", ".join(candidate_name(r.name, p, job.precision) for r, p in extra), job.precision,
                 job.precision, job.precision)
        listener.candidates_added(len(extra))
        return own_end

    def early_follow_ups(eager_ms: float) -> None:
        # The copies build on the spare worker beside the module's own candidates. Eager's copy is screened first,
        # while nothing builds (in turns with eager: it decides which copies build, and which of the module's own
        # builds its copies stand for), then every build goes to whichever worker is free, the likely winners
        # first, and all are screened once done. Screened later, that timing waited for the module's longest
        # build while the spare worker idled, and the copies it let through then built one after the other
        # (ResNet-18: 14 s idle, 45 s in all). Where the copies run clearly faster, each own build with a copy
        # waits on its copy's chain (copies_first); otherwise the two AOTInductor builds, the longest, start
        # together.
        nonlocal side_from
        own_end = side_from = add_early_copies(eager_ms)
        copies = [(i, *pairs[i]) for i in range(own_end, len(pairs))]
        copy_index = screen_eager_copy() if search.screens else None
        if copy_index is None:
            executors.map(run_chain, own_chains(1, own_end) + [copies])
            return
        chains = [[c for c in chain if c[0] not in records] for chain in _chains(pairs, job.precision, 1)]
        builds_first(sorted(copies_first([chain for chain in chains if chain]),
                            key=lambda chain: chain[0][1].search_rank))

    if beside:
        executors.settle()
    run_from(0)
    eager = candidate_name(pairs[0][0].name, pairs[0][1], job.precision)  # the baseline comes first

    def selection() -> tuple[list[CandidateRecord], Optional[CandidateRecord]]:
        _profile_leaders(graph, job, executors, search, pairs, records, formats, built_by, done, listener,
                         rechecked=rechecked)
        candidates, winner = chosen()
        if winner is not None and winner.precision_in(job.precision) != job.precision:
            # The fallback is chosen among fully profiled candidates: the best screen in the module's own
            # precision gets its full profile too, or a screened fp32 build 20% behind an fp16 winner would
            # leave eager as the fallback.
            own = [i for i in sorted(records) if records[i].verified
                   and records[i].precision_in(job.precision) == job.precision
                   and records[i].screen_ms(search.batch) is not None]
            best = min(own, key=lambda i: records[i].screen_ms(search.batch), default=None)
            if best is not None and records[best].status == "screened":
                # Profiled in turns with the winner and the other leaders: the figures compared next come from one
                # stretch of time, so a burst during the winner's earlier profile cannot hand the pick to the fallback.
                _profile_leaders(graph, job, executors, search, pairs, records, formats, built_by, done, listener,
                                 wanted=[best], beside=tuple(i for i in records if records[i].name == winner.name))
                candidates, winner = chosen()
        return candidates, winner

    def chosen() -> tuple[list[CandidateRecord], Optional[CandidateRecord]]:
        candidates = [records[i] for i in sorted(records)]
        for i, record in enumerate(candidates):
            if record.status == "screened":  # why, against the final figures (also for screens cached before)
                candidates[i] = replace(record, error=search.screened_reason(record, candidates))
        return candidates, select(candidates, config.strategy, batch, eager, graph.batch_weights)

    candidates, winner = selection()
    best_ms = call_ms(winner, *compared) if winner is not None else None
    extra = follow_up_pairs(pairs, records, follow_ups, best_ms, min_ms)
    if extra:
        log.info("%s graph %s: the best %s build takes %.2f ms a call (%s)%s: trying %s too (precisions=(%r,) keeps "
                 "%s only)", job.module_name, graph.key, job.precision, best_ms, winner.name,
                 ", and its matmuls are wide" if min_ms == 0 else "",
                 ", ".join(candidate_name(r.name, p, job.precision) for r, p in extra), job.precision, job.precision)
        listener.candidates_added(len(extra))
        first = follow_ups_from = len(pairs)
        pairs.extend(extra)
        run_from(first)
        candidates, winner = selection()

    def fallback_of(winner: Optional[CandidateRecord]) -> Optional[CandidateRecord]:
        return own_precision_fallback(candidates, winner, job.precision, config.strategy, batch, eager,
                                      graph.batch_weights)

    # The winner, or its fallback, needs a pruned artifact:
    rebuild = reclaim_pruned(formats, candidates, winner, job.precision, fallback_of(winner))
    if rebuild:
        executors.map(run_chain, [[(i, r, p) for i, (r, p) in enumerate(pairs)
                                   if artifact_dir(r.format.value, p, job.precision) in rebuild]])
        candidates, winner = selection()
    winner, fallback = prefer_own_precision(winner, fallback_of(winner), lambda c: call_ms(c, *compared))
    return GraphEntry(graph, gkey, formats, candidates, winner.name if winner else None, now(),
                      fallback.name if fallback else None)


def _profile_leaders(graph: Graph, job: Job, executors: ExecutorPool, search: Search,
                     pairs: list[tuple[RunnerSpec, str]], records: dict[int, CandidateRecord],
                     formats: dict[str, FormatState], built_by: dict[int, Executor], done: Callable[..., None],
                     listener: OptimizeListener, wanted: Optional[list[int]] = None,
                     rechecked: Optional[set[int]] = None, beside: tuple[int, ...] = ()) -> None:
    """The full profile for the screened candidates that lead (``Search.leaders``), or for those at the
    ``wanted`` places, on the executor that screened each one (its worker may still hold the runner; another
    loads the build ``formats`` names). A leader whose profile fails leaves the lead to the next.

    First (``rechecked``: the places screened twice already), each candidate that only just missed the lead
    (``Search.rechecks``) is screened once more and keeps the faster screen: a screen that fell in a burst of load
    does not decide alone.

    Several leaders are profiled in rounds that take turns (``_profile_together``), holding the timing gate from
    the first round to the last: no build of this module, or of one beside it, starts between two rounds. A leader
    profiled by an earlier call (before the follow-up copies, or before the ``wanted`` fallback) is profiled again
    in turns with the new ones, as is each profiled candidate at ``beside``."""
    if wanted is None and rechecked is not None:
        _recheck_screens(graph, job, executors, search, pairs, records, formats, built_by, done, listener, rechecked)
    while True:
        baseline = records[0].name if 0 in records else None  # eager
        leaders = {r.name for r in search.leaders(records.values(), baseline)}
        todo = [i for i in sorted(records) if records[i].status == "screened"
                and (records[i].name in leaders if wanted is None else i in wanted)]
        if not todo:
            return
        # A leader profiled before (fp32, when the follow-up copies' leaders come) takes turns with the new ones
        # again: profiles taken a minute apart differ by up to 50% on the 2-core machine, in turns by a few %.
        again = [i for i in sorted(records)
                 if records[i].status == "ok" and (records[i].name in leaders or i in beside)]
        if len(todo) + len(again) > 1:
            with executors.timing_held():
                _profile_together(graph, job, executors, search, pairs, records, formats, built_by, done, listener,
                                  todo + again)
            continue
        for index in todo:
            screened = records[index]
            listener.candidate_started(job.module_name, f"{screened.name} (full profile)")
            # A leader screened by an earlier run whose build was pruned since is built again for its profile.
            profiled = _retime(graph, job, executors, search, pairs, formats, built_by, index, "profile")
            record = _merge_profile(screened, profiled)
            log.info("%s graph %s %s: full profile %s%s", job.module_name, graph.key, record.name, record.status,
                     f" ({record.error})" if record.error else "")
            done(index, record.name, record, checkpoint=True, finished=False)


# Eager and its copy in a follow-up precision are screened this many times more each, in turns, before the other
# copies are built or skipped on their ratio (``low_precision_skip_reason``).
COPY_ROUNDS = 2

# Leaders are profiled in this many rounds each, taking turns at every batch size: the 2-core machine has bursts of
# seconds in which every call runs up to ~1.5x slower, and profiles taken one after the other put a burst on one
# candidate only. Timed in turns in one process, two AOTInductor builds of the bench's BERT (fp32 and bf16, 4x32
# tokens) kept a ratio of 0.972-0.974 over four processes while each one's own figure moved by up to 80% from one
# process to the next (0.90-1.58 ms).
PROFILE_ROUNDS = 4
# Each round rests on this many calls at least, so that the rounds together rest on as many as one profile does:
# the floor is what a slow call pays for (ten calls of a ResNet-18 at batch 8, ~1 s a round, where the round's
# budget is an eighth of a second), and four rounds of ten made the leaders' profiles four times one profile.
ROUND_MIN_CALLS = -(-MIN_CALLS // PROFILE_ROUNDS)


def _profile_together(graph: Graph, job: Job, executors: ExecutorPool, search: Search,
                      pairs: list[tuple[RunnerSpec, str]], records: dict[int, CandidateRecord],
                      formats: dict[str, FormatState], built_by: dict[int, Executor], done: Callable[..., None],
                      listener: OptimizeListener, todo: list[int]) -> None:
    """The full profiles of the leaders at ``todo``, in ``PROFILE_ROUNDS`` rounds each that take turns at every
    batch size (each round ``profile_time_s / PROFILE_ROUNDS``; its runner stays loaded in its worker between
    rounds), combined per batch size by ``combine_rounds``. A leader whose round fails is out."""
    sizes: list[Optional[int]] = list(job.batch_sizes) if graph.batching else [None]
    rounds: dict[int, list[CandidateRecord]] = {i: [] for i in todo}
    failed: dict[int, CandidateRecord] = {}
    for index in todo:
        listener.candidate_started(job.module_name, f"{records[index].name} (full profile, in turns)")
    for bs in sizes:
        for _ in range(PROFILE_ROUNDS):
            for index in [i for i in todo if i not in failed]:
                result = _retime(graph, job, executors, search, pairs, formats, built_by, index, "profile",
                                 batch_sizes=(bs,) if bs is not None else None,
                                 profile_s=job.profile_time_s / PROFILE_ROUNDS, min_calls=ROUND_MIN_CALLS,
                                 rounds=True)
                if result.status != "ok":
                    failed[index] = _merge_profile(records[index], result)
                else:
                    rounds[index].append(result)
    names = {i: records[i].name for i in todo}
    for index in todo:
        if index in failed:
            record = failed[index]
        else:
            times = _summed_times(*rounds[index])
            points = [point for result in rounds[index] for point in result.profile]  # a round: one batch size
            profile = [combine_rounds([p for p in points if p.batch_size == bs]) for bs in sizes]
            record = _merge_profile(records[index], replace(rounds[index][-1], profile=profile, times=times))
        others = ", ".join(names[i] for i in todo if i != index)
        log.info("%s graph %s %s: full profile %s%s, %d rounds in turns with %s", job.module_name, graph.key,
                 record.name, record.status, f" ({record.error})" if record.error else "", PROFILE_ROUNDS, others)
        done(index, record.name, record, checkpoint=True, finished=False)


def _recheck_screens(graph: Graph, job: Job, executors: ExecutorPool, search: Search,
                     pairs: list[tuple[RunnerSpec, str]], records: dict[int, CandidateRecord],
                     formats: dict[str, FormatState], built_by: dict[int, Executor], done: Callable[..., None],
                     listener: OptimizeListener, rechecked: set[int]) -> None:
    """A second screen, from its build, for each candidate ``Search.rechecks`` names; once per candidate. Asked
    again after each second screen: one that comes out faster moves the best, and a candidate that led before may
    now miss the lead by a recheck's margin (a bf16 BERT build 25% behind an fp32 one whose second screen was 35%
    faster than its first)."""
    while True:
        wanted = {r.name for r in search.rechecks(records.values())}
        todo = [i for i in sorted(records) if records[i].name in wanted and i not in rechecked]
        if not todo:
            return
        index = todo[0]
        rechecked.add(index)
        runner, precision = pairs[index]
        fmt = artifact_dir(runner.format.value, precision, job.precision)
        if fmt in formats and formats[fmt].status == PRUNED:  # its build is gone: the first screen stands
            continue
        _second_screen(graph, job, executors, search, pairs, records, formats, built_by, done, listener, rechecked,
                       index, keep_below_ms=search.keep_below_ms(records.values()))


def _second_screen(graph: Graph, job: Job, executors: ExecutorPool, search: Search,
                   pairs: list[tuple[RunnerSpec, str]], records: dict[int, CandidateRecord],
                   formats: dict[str, FormatState], built_by: dict[int, Executor], done: Callable[..., None],
                   listener: OptimizeListener, rechecked: set[int], index: int, why: str = "", **task: object) -> None:
    """The candidate at ``index`` screened once more, from its build; the faster of its two screens stays its
    screen, and it joins ``rechecked`` (never a third). ``why`` ends the log line."""
    rechecked.add(index)
    screened = records[index]
    listener.candidate_started(job.module_name, f"{screened.name} (second screen)")
    again = _retime(graph, job, executors, search, pairs, formats, built_by, index, "screen", **task)
    first = screened.screen
    second = again.screen if again.status == "screened" else None
    faster = second if second is not None and first is not None and second.p50_ms < first.p50_ms else first
    log.info("%s graph %s %s: second screen %s%s", job.module_name, graph.key, screened.name,
             f"{second.p50_ms:.3f} ms against {first.p50_ms:.3f}" if second is not None and first is not None
             else f"{again.status} ({again.error})", why)
    done(index, screened.name, replace(screened, screen=faster), checkpoint=True, finished=False)


def copies_beside(module: Module, config: OptimizeConfig, device: str, alone: bool) -> bool:
    """Whether the module's pool has a worker for its follow-up precisions' copies, built beside its own candidates
    once eager's timing shows they will be tried: there are follow-up precisions here, and
    ``config.follow_ups_beside`` allows it."""
    return bool(follow_up_precisions(module.precision, device, config.precisions)) and \
        follow_ups_beside(config, device, module.__wrapped__, alone)


def optimize_module(module: Module, graphs: list[Graph], config: OptimizeConfig,
                    listener: OptimizeListener, hub: Optional[WorkerHub] = None, alone: bool = True) -> ModuleStatus:
    """Optimize one module's captured graphs, write its manifest and bind the winners; events go to ``listener``.
    Its candidates run on the ``hub``'s warm workers when given (the run's), else on workers of its own.
    ``alone``: no other module is optimized side by side with it (its follow-up copies may then build beside its
    own candidates: ``config.follow_ups_beside``)."""
    start = time.perf_counter()
    workspace = resolve_workspace(config)
    ensure_writable(workspace)
    folder = module_dir(workspace, module.name)
    claim_module_folder(folder)  # never a folder of the user's: this run writes into it, clean would delete it
    device = config.target_device or module_device(module.__wrapped__)
    # This process's own work for the module (hashing its weights, binding and warming its winners) holds the
    # run's timing gate as a build: another module optimized beside this one never times meanwhile.
    busy = hub.gate.task if hub is not None else contextlib.nullcontext
    with locked(folder, config.timeout_s), logging_to(folder / LOG_FILE, listener.log_handlers(), module.name):
        log.info("optimizing %s: %d graph(s) on %s", module.name, len(graphs), device)
        if module.__wrapped__.training:
            log.warning("module %s is in training mode; call .eval() before nav.optimize for stable results",
                        module.name)
        precision = module.precision  # read once: given, or from the weights (an fp16 module is not cast again)
        if module.precision_inferred:
            log.info("%s: precision %s, read from its weights (pass precision= to nav.Module to set it)",
                     module.name, precision)
        with busy():
            fp = fingerprint(module.__wrapped__)
        old = read_manifest(folder)
        discard_unvouched(folder, old.inductor_cache if old else None)  # before anything compiles into it
        old_graphs = old.graphs if old and old.fingerprint == fp and old.device == device else {}
        batch_sizes = config.profile_batch_sizes(captured_batch_sizes(graphs), device)
        checked_as = {p: tolerance_precision(p, module.__wrapped__, device) for p in PRECISIONS}
        # Every precision's tolerance keys the graph cache, whichever are tried: a run that adds or drops precisions
        # (precisions=None against ("fp32",)) reuses the candidates both try; a change of tolerance builds them again.
        keyed_tolerances = {p: config.tolerance_for(q) for p, q in checked_as.items()}
        tolerances = {p: keyed_tolerances[p] for p in candidate_precisions(precision, device, config.precisions)
                      + (precision,) + follow_up_precisions(precision, device, config.precisions)}
        if "fp32" in tolerances and checked_as["fp32"] == "tf32":
            log.info("%s: fp32 candidates are checked with the tf32 tolerance %s, as eager itself runs TF32 "
                     "convolutions/matmuls here (set torch.backends.cudnn.allow_tf32 = False for a strict check)",
                     module.name, tolerances["fp32"])
        job = Job(module.name, module.__wrapped__, module.nav_state.forward_func, {g.key: g for g in graphs}, folder,
                  device, precision, tolerances, config.verify_func, batch_sizes, config.max_batch_size,
                  config.profile_time_s, cache_environment(cache_dir(folder)))
        entries = dict(old_graphs)  # graphs not seen this time stay valid: same weights, same device
        workers = build_workers(config, device, module.__wrapped__)  # from cores and GPU memory unless given
        beside = copies_beside(module, config, device, alone)
        with module._nav_unpatched(), ExecutorPool(job, use_multiprocessing(config), config.timeout_s,
                                                   folder / LOG_FILE, workers + beside, hub) as executors:
            for graph in graphs:
                gkey = _graph_cache_key(graph, fp, device, precision, config, batch_sizes, keyed_tolerances)
                entries[graph.key] = _optimize_graph(graph, job, executors, config, device,
                                                     old_graphs.get(graph.key), gkey, listener, beside, alone)
        wrapped = type(module.__wrapped__)
        manifest = Manifest(module.name, fp, device, MANIFEST_VERSION, __version__, torch.__version__,
                            f"{wrapped.__module__}.{wrapped.__qualname__}", precision,
                            module.nav_state.forward_func, config.max_batch_size, list(batch_sizes),
                            dict(tolerances), entries, now(), precision_inferred=module.precision_inferred)
        # Bound first: its warm-up compiles into the module's inductor cache, whose checksum the manifest records.
        bind_start = time.perf_counter()
        with busy(), inductor_cache(folder):  # the warm-up compiles into this module's cache, nothing else
            optimized = bind(module, folder, manifest, fp, in_optimize=True)
        bind_s = time.perf_counter() - bind_start
        prune = not keep_artifacts(config)
        unused_cache = prune and not loads_from_inductor_cache(manifest, fallbacks=True)
        manifest.inductor_cache = None if unused_cache else checksum_to_record(folder)
        if prune:
            mark_unused(manifest)  # builds nothing will load: their records stay, their folders go below
        try:
            write_manifest(folder, manifest)  # last: a killed run leaves the old manifest
        except BaseException:
            module.nav_state.unbind()  # what is bound stands for a manifest on disk, or nothing
            raise
        # Earlier builds, and the pruned ones, go only now: the new manifest is in place.
        remove_unnamed_builds(folder, manifest, old)
        if unused_cache:
            remove_unused_cache(folder)
    statuses = [GraphStatus(g.key, entries[g.key].selected, entries[g.key].candidates, g.batching,
                            dict(g.batch_counts) if g.batching else {})
                for g in graphs]
    return ModuleStatus(module.name, folder, device, statuses, optimized, time.perf_counter() - start, tolerances,
                        precision=precision, precision_inferred=module.precision_inferred, bind_s=bind_s)
