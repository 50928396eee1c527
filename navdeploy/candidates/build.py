"""One candidate, start to end: export its format (if not built yet), load the runner, verify it against
eager on every kept sample and at every profiled batch size, then screen or profile it (``Task.plan``). Runs in
the worker child (or in-process when isolation is off); returns a
:class:`~navdeploy.workspace.records.CandidateRecord` and never raises."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from navdeploy.candidates.precision import candidate_name, cast_inputs, cast_module, needs_cast
from navdeploy.candidates.profile import MIN_CALLS, measure
from navdeploy.candidates.search import SCREEN_MARGIN, screen_time_s
from navdeploy.candidates.verify import LOW_PRECISIONS, Comparison, compare, conform
from navdeploy.capture.flat_module import FlatModule
from navdeploy.capture.graph import Graph
from navdeploy.errors import WorkspaceError
from navdeploy.formats.base import BuildContext, LoadContext, RunnerSpec, canonical_strides
from navdeploy.formats.registry import FORMATS, RUNNERS
from navdeploy.inplace.staleness import watch_module_dicts
from navdeploy.workspace.atomic import is_disk_error, writing
from navdeploy.workspace.fingerprint import checksum
from navdeploy.workspace.layout import artifact_dir, artifact_path, build_dir
from navdeploy.workspace.records import BuildWindow, CandidateRecord

log = logging.getLogger("navdeploy")


@dataclass
class Job:
    """What the worker needs to try candidates of one module. Sent to the child once (cloudpickled)."""

    module_name: str
    module: torch.nn.Module
    forward_func: Optional[str]
    graphs: dict[str, Graph]
    module_dir: Path
    device: str
    precision: str  # the module's own precision
    tolerances: dict[str, tuple[float, float]]  # candidate precision -> (atol, rtol) against eager
    verify_func: Optional[Callable]
    batch_sizes: tuple[int, ...]
    max_batch_size: int
    profile_time_s: float
    # The module's inductor cache variables (``workspace.inductor.cache_environment``): what a worker sets before
    # it builds, and what a build in this process runs under.
    cache_environment: dict[str, Optional[str]] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """Try ``runner`` in ``precision`` on graph ``graph_key``; ``export``: whether its artifact must be (re)built;
    else ``artifact_checksum`` names the build to load (None: the format's folder of an earlier version).

    ``plan`` says what follows verification: ``full`` profiles every batch size; ``screen`` times a few calls at
    ``screen_batch`` (status "screened"), keeping the runner loaded when its screen is under ``keep_below_ms``;
    ``profile`` profiles in full a candidate screened earlier (its kept runner, else loaded and verified again);
    ``build`` stops after verification (status "built"): the candidate is screened by a later ``screen`` task,
    which loads and verifies its build again.

    ``batch_sizes``, ``profile_s`` and ``min_calls`` narrow a ``profile`` to one round of several (the batch sizes
    to time, the budget for each, the fewest calls each rests on).

    ``rounds``: the task is one round of several that take turns with other candidates' (leaders' full profiles,
    ``optimize.module._profile_together``; eager and its copy in a follow-up precision screened in turns,
    ``eager_copy_in_turns``): it uses the runner this worker loaded for an earlier round, or kept after its screen,
    without loading and verifying it again, and keeps it loaded for the next round.

    ``retime``: the task times a candidate verified earlier (a screen or profile from its build). Without
    ``export`` it asks for timing as it starts rather than entering as a build first: a build that other modules
    start meanwhile would otherwise be admitted beside it, and its timing would wait that build out. What it does
    before timing (loading and verifying the build again where its worker does not hold the runner, a torch.compile
    runner compiling from the cache, a worker started again) then runs alone too."""

    graph_key: str
    runner: str
    export: bool
    precision: str
    artifact_checksum: Optional[str] = None
    plan: str = "full"
    screen_batch: Optional[int] = None
    keep_below_ms: Optional[float] = None
    batch_sizes: Optional[tuple[int, ...]] = None
    profile_s: Optional[float] = None
    min_calls: Optional[int] = None
    retime: bool = False
    rounds: bool = False

    @property
    def times_only(self) -> bool:
        """Whether the task only times a build verified earlier (``retime`` without ``export``)."""
        return self.retime and not self.export


def prepare(module: torch.nn.Module, forward_func: Optional[str], graph: Graph, runner: RunnerSpec, precision: str,
            module_precision: str, cache: Optional[dict] = None) -> tuple[FlatModule, Callable]:
    """The flat module a candidate exports or runs, and the cast its inputs need.

    Runners that cast (torch-based, ONNX) get a float-cast copy of the module and cast float inputs;
    runners whose builder takes the precision (TensorRT) get the module as it is.

    The module's parameter and buffer dicts are first swapped for the watched ones a bind gives it
    (``watch_module_dicts``; a no-op where they are already): torch.compile's cache keys name the kind of dict a
    parameter is read from, so a candidate compiled with plain dicts left the bind of its winner nothing to find
    in the cache (the worker's side of the same problem: ``isolation._main_module_last``)."""
    watch_module_dicts(module)
    cast = runner.precision_by == "cast" and needs_cast(precision, module_precision)
    key = (graph.key, precision if cast else module_precision)
    if cache is not None and key in cache:
        flat = cache[key]
    else:
        flat = FlatModule(cast_module(module, precision) if cast else module, graph.input_spec, forward_func,
                          graph.output_spec)
        if cache is not None:
            cache[key] = flat
    if cast:
        return flat, lambda inputs: cast_inputs(inputs, precision)
    return flat, lambda inputs: inputs


def expand_batch(inputs: list[torch.Tensor], batch_size: int) -> list[torch.Tensor]:
    """Inputs grown or cut to ``batch_size`` along axis 0 by repeating their rows (0-d tensors unchanged)."""
    out = []
    for t in inputs:
        if t.dim() == 0:
            out.append(t)
            continue
        reps = math.ceil(batch_size / t.shape[0])
        # A clone, not a slice: torch.compile guards on a view's base, so a warm-up on views compiles a graph that a
        # user's own (non-view) tensors of the same shape miss, and their first call compiles again.
        out.append(t.repeat(reps, *([1] * (t.dim() - 1)))[:batch_size].clone(memory_format=torch.contiguous_format))
    return out


def _unit_dynamic_axes(graph: Graph, inputs: list[torch.Tensor], max_batch_size: int) -> list[tuple[int, int]]:
    """(input, axis) pairs of the axes exported as dynamic (those that varied, the batch axis) that are 1 here."""
    return [(i, a) for i, (t, axes) in enumerate(zip(inputs, graph.dynamic_axes(max_batch_size)))
            for a in sorted(axes) if a < t.dim() and t.shape[a] == 1]


def _grow_axis(t: torch.Tensor, axis: int, size: int) -> torch.Tensor:
    return t.repeat_interleave(size, dim=axis).clone(memory_format=torch.contiguous_format)


def export_example(graph: Graph, max_batch_size: int) -> list[torch.Tensor]:
    """Example inputs for exporters, with every axis that varied in the capture larger than 1: exporters such as
    torch.export specialise an axis of size 1 (and then fail, or refuse the other sizes). The first kept sample
    where that already holds, else the first sample with those axes grown to 2 by repeating their entries."""
    for sample in graph.samples:
        if not _unit_dynamic_axes(graph, sample.inputs, max_batch_size):
            return [canonical_strides(t) for t in sample.inputs]  # what the AOTInductor runner passes at run time
    inputs = list(graph.samples[0].inputs)
    for i, axis in _unit_dynamic_axes(graph, inputs, max_batch_size):
        inputs[i] = _grow_axis(inputs[i], axis, 2)
    return [canonical_strides(t) for t in inputs]


@dataclass
class WorkerState:
    """Per-process caches of one job: flat modules, eager references at profiled batch sizes, what the formats of
    the current graph share (its ExportedProgram) and the runners kept loaded for a full profile after screening."""

    flat: dict[tuple[str, str], FlatModule] = field(default_factory=dict)
    references: dict[tuple[str, int], list[torch.Tensor]] = field(default_factory=dict)
    # Called before a candidate profiles; a worker waits there until no other candidate builds (timing_gate.py).
    before_profile: Optional[Callable[[], None]] = None
    # Called when a build's native compile starts (``BuildContext.compiling``); a worker tells its parent.
    compiling: Callable[[], None] = field(default=lambda: None)
    graph_key: Optional[str] = None  # the graph the caches below belong to
    shared: dict[str, dict] = field(default_factory=dict)  # by precision: BuildContext.shared
    kept: dict[str, tuple[float, Callable]] = field(default_factory=dict)  # candidate name -> (screen ms, run)
    in_rounds: dict[str, Callable] = field(default_factory=dict)  # runners loaded for a profile in rounds

    def enter_graph(self, graph_key: str) -> None:
        """Drop what belongs to another graph: its ExportedProgram and kept runners hold weights."""
        if graph_key != self.graph_key:
            self.graph_key = graph_key
            self.shared.clear()
            self.kept.clear()
            self.in_rounds.clear()

    def keep(self, name: str, screen_ms: float, run: Callable, below_ms: Optional[float]) -> None:
        """Keep ``run`` loaded when its screen may lead; drop kept runners that a faster screen left behind."""
        if below_ms is not None and screen_ms > below_ms:
            return
        self.kept[name] = (screen_ms, run)
        best = min(ms for ms, _ in self.kept.values())
        for other in [n for n, (ms, _) in self.kept.items() if ms > best * (1 + SCREEN_MARGIN)]:
            del self.kept[other]

    def flat_module(self, job: Job, graph: Graph) -> FlatModule:
        """The module in its own precision: the eager reference."""
        key = (graph.key, job.precision)
        if key not in self.flat:
            self.flat[key] = FlatModule(job.module, graph.input_spec, job.forward_func, graph.output_spec)
        return self.flat[key]

    def reference(self, job: Job, graph: Graph, batch_size: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        inputs = expand_batch(graph.sample_for(batch_size).inputs, batch_size)
        key = (graph.key, batch_size)
        if key not in self.references:
            with torch.no_grad():
                self.references[key] = list(self.flat_module(job, graph)(*inputs))
        return inputs, self.references[key]


def _export(job: Job, graph: Graph, runner_format, flat: FlatModule, cast: Callable, precision: str,
            graph_dir: Path, fmt_key: str, shared: Optional[dict] = None,
            timings: Optional[dict] = None, compiling: Callable[[], None] = lambda: None) -> tuple[float, Path, str]:
    """Export into ``<fmt_key>.tmp-<pid>`` and, once complete, move it into a build folder of its own beside the
    others (``<fmt_key>.<checksum>``): a killed run or a failed write never leaves a half-written artifact behind,
    and never touches the build the current manifest names. Returns the seconds taken, the build folder and its
    checksum. A full disk, read-only file system or permission problem raises a WorkspaceError naming the folder
    (and the free space). ``shared`` holds what exporters of one graph and precision share in this worker (the
    one torch.export); ``timings`` receives the exporters' own figures; ``compiling`` is called when only compilers
    are left to run (``BuildContext.compiling``)."""
    spec = FORMATS[runner_format]
    tmp = graph_dir / f"{fmt_key}.tmp-{os.getpid()}"
    start = time.perf_counter()
    try:
        with writing(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        example = cast(export_example(graph, job.max_batch_size))
        ctx = BuildContext(flat, example, graph, graph.dynamic_axes(job.max_batch_size), tmp,
                           job.device, precision, job.module_dir, shared, timings if timings is not None else {},
                           compiling)
        with writing(tmp, disk_only=True):  # the exporter's other OSErrors are its own failure, as they are
            spec.export(ctx)
        if not (tmp / spec.artifact).exists():
            raise RuntimeError(f"exporter wrote no {spec.artifact}")
        # Hashed here, while this candidate still counts as a build: never beside another's profiling.
        digest = checksum(tmp)
        final = graph_dir / build_dir(fmt_key, digest)
        with writing(final):
            if final.is_dir() and checksum(final) == digest:
                shutil.rmtree(tmp)  # the same build is there already (its name is its checksum)
            else:
                shutil.rmtree(final, ignore_errors=True)  # a folder whose bytes are not its name's: no build at all
                os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return time.perf_counter() - start, final, digest


def _current_device(inputs: list[torch.Tensor]) -> contextlib.AbstractContextManager:
    """The inputs' GPU as the current device while profiling: CUDA events and syncs act on the current device,
    and a module on cuda:1 would otherwise be timed on cuda:0's stream."""
    gpu = next((t.device for t in inputs if t.is_cuda), None)
    return torch.cuda.device(gpu) if gpu is not None else contextlib.nullcontext()


def new_record(runner: RunnerSpec, precision: str, module_precision: str) -> CandidateRecord:
    """A candidate's record before it runs: failed until proven otherwise."""
    return CandidateRecord(candidate_name(runner.name, precision, module_precision), runner.name,
                           runner.format.value, precision, runner.device)


def run_task(job: Job, task: Task, state: WorkerState) -> CandidateRecord:
    """Try one candidate. A failure is a record with ``status == "failed"`` and the ``error``, never a raise."""
    runner = RUNNERS[task.runner]
    record = new_record(runner, task.precision, job.precision)
    record.pid = os.getpid()
    window = record.window = BuildWindow(start=time.time())
    try:
        return _try_candidate(job, task, state, runner, record)
    finally:
        window.end = time.time()


def _fail(record: CandidateRecord, step: str, error: str) -> CandidateRecord:
    record.status, record.step, record.error = "failed", step, error
    return record


def _verify(job: Job, graph: Graph, run: Callable, record: CandidateRecord, task: Task,
            state: WorkerState) -> Comparison:
    """Every kept sample, and a batch at every profiled size when the graph batches, against eager."""
    atol, rtol = job.tolerances[task.precision]
    scale = task.precision in LOW_PRECISIONS or job.precision in LOW_PRECISIONS
    start = time.perf_counter()
    result = Comparison()
    for i, sample in enumerate(graph.samples):
        actual = conform(run(sample.inputs), graph.outputs)
        compare(sample.outputs, actual, atol, rtol, result, job.verify_func, f"sample {i}: ", scale)
    for bs in job.batch_sizes if graph.batching else ():
        inputs, expected = state.reference(job, graph, bs)
        compare(expected, conform(run(inputs), graph.outputs), atol, rtol, result, None, f"batch size {bs}: ", scale)
    record.times["verify_s"] = time.perf_counter() - start
    record.max_abs_err, record.max_rel_err = result.max_abs_err, result.max_rel_err
    return result


def _inputs_at(job: Job, graph: Graph, state: WorkerState, batch_size: Optional[int]) -> list[torch.Tensor]:
    return state.reference(job, graph, batch_size)[0] if graph.batching else graph.typical_sample.inputs


def _time(job: Job, graph: Graph, run: Callable, record: CandidateRecord, task: Task, state: WorkerState) -> None:
    """After the timing gate let it run alone: the screen (``plan == "screen"``) or the full profile."""
    record.window.verified = time.time()
    if state.before_profile is not None:
        state.before_profile()
    record.window.profile = time.time()
    start = time.perf_counter()
    if task.plan == "screen":
        inputs = _inputs_at(job, graph, state, task.screen_batch)
        with _current_device(inputs):
            record.screen = measure(lambda: run(inputs), task.screen_batch if graph.batching else None, job.device,
                                    screen_time_s(job.profile_time_s))
        record.times["screen_s"] = time.perf_counter() - start
        record.status = "screened"
        state.keep(record.name, record.screen.p50_ms, run, task.keep_below_ms)
        return
    sized = [(bs, _inputs_at(job, graph, state, bs)) for bs in task.batch_sizes or job.batch_sizes] \
        if graph.batching else [(None, graph.typical_sample.inputs)]
    for bs, inputs in sized:
        with _current_device(inputs):
            record.profile.append(measure(lambda inputs=inputs: run(inputs), bs, job.device,
                                          task.profile_s or job.profile_time_s,
                                          min_calls=task.min_calls or MIN_CALLS))
    record.times["profile_s"] = time.perf_counter() - start
    record.status = "ok"


def _try_candidate(job: Job, task: Task, state: WorkerState, runner: RunnerSpec,
                   record: CandidateRecord) -> CandidateRecord:
    graph = job.graphs[task.graph_key]
    state.enter_graph(graph.key)
    spec = FORMATS[runner.format]  # the runner can run here: optimize skips the others before they get a task
    step = "export"
    try:
        with torch.no_grad():
            # Screened (or timed a round) in this worker and still loaded: verified already.
            run = state.in_rounds.get(record.name) if task.rounds else None
            if run is None and (task.plan == "profile" or task.rounds) and record.name in state.kept:
                run = state.kept.pop(record.name)[1]
            if run is None:
                flat, cast = prepare(job.module, job.forward_func, graph, runner, task.precision, job.precision,
                                     state.flat)
                artifact = None
                if spec.export is not None:
                    graph_dir = job.module_dir / graph.key
                    fmt_key = artifact_dir(spec.format.value, task.precision, job.precision)
                    if task.export:
                        shared = state.shared.setdefault(task.precision, {})
                        record.times["export_s"], folder, record.artifact_checksum = _export(
                            job, graph, runner.format, flat, cast, task.precision, graph_dir, fmt_key, shared,
                            record.times, state.compiling)
                        record.exported = True
                    else:
                        folder = artifact_path(graph_dir, fmt_key, task.artifact_checksum)
                    artifact = folder / spec.artifact
                step = "load"
                start = time.perf_counter()
                loaded = runner.load(LoadContext(artifact, flat, graph, job.device, task.precision))
                run = lambda inputs: loaded(cast(inputs))
                record.times["load_s"] = time.perf_counter() - start

                step = "verify"
                result = _verify(job, graph, run, record, task, state)
                if not result.ok:
                    return _fail(record, "verify", result.reason)
                if task.plan == "build":
                    record.status, record.window.verified = "built", time.time()
                    return record
            if task.rounds:  # loaded for the next round too
                state.in_rounds[record.name] = run

            step = "profile"
            _time(job, graph, run, record, task, state)
    except Exception as exc:  # noqa: BLE001 - a failing candidate must never stop the others
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        _fail(record, step, f"{step}: {type(exc).__name__}: {first}"[:500])
        # A full disk or an unwritable folder is not the candidate's fault: the next run tries it again.
        record.transient = isinstance(exc, WorkspaceError) or is_disk_error(exc)
        log.info("%s/%s failed in %s:\n%s", job.module_name, runner.name, step, traceback.format_exc())
    return record
