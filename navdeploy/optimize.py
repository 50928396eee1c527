"""``nav.optimize`` and ``nav.load_optimized``: capture, then per module and graph build, verify, profile,
select, write the manifest, and swap the winner in place."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import logging
import os
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from navdeploy import __version__
from navdeploy.binding import bind
from navdeploy.candidate import Job, Task, artifact_dir, new_record
from navdeploy.capture import Graph, Recorder, split_sample
from navdeploy.config import (OptimizeConfig, build_workers, console_output, report_enabled, resolve_workspace,
                              use_multiprocessing)
from navdeploy.errors import CaptureError, DataloaderError, NavdeployError
from navdeploy.formats import FORMATS, RunnerSpec, runners_for
from navdeploy.isolation import ExecutorPool
from navdeploy.module import Module, registered_modules
from navdeploy.precision import candidate_name, candidate_precisions, tolerance_precision
from navdeploy.report import console
from navdeploy.select import select
from navdeploy.workspace import (LOG_FILE, MANIFEST_VERSION, cache_key, checkpoint_graph, checksum, ensure_writable,
                                 fingerprint, locked, module_dir, now, read_manifest, resume_entry, save_samples,
                                 write_json_atomic)

log = logging.getLogger("navdeploy")


@dataclass
class GraphStatus:
    """One input structure of a module: every candidate's record and the winner."""

    key: str
    selected: Optional[str]
    candidates: list[dict]
    batching: bool

    def candidate(self, runner: str) -> Optional[dict]:
        """The record of one runner, if it was tried."""
        return next((c for c in self.candidates if c["runner"] == runner), None)


@dataclass
class ModuleStatus:
    """What ``nav.optimize`` did for one module."""

    name: str
    folder: Path
    device: str
    graphs: list[GraphStatus]
    optimized: bool
    seconds: float
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)  # precision -> (atol, rtol)


@dataclass
class PipelineTiming:
    """End-to-end time of the callable over the dataloader, eager (the capture pass) and after the swap.

    ``eager_s`` is the capture pass minus navdeploy's recording overhead; ``optimized_s`` one pass with the
    selected runners in place. When the dataloader has two items or more the first is a warm-up and not timed
    (``items_timed`` says how many were). Per-module seconds are inclusive: a module called inside another
    counts in both. ``error`` is set when the optimized pass raised (then ``optimized_s`` is None)."""

    capture_s: float
    eager_s: float
    optimized_s: Optional[float]
    items_timed: int
    module_eager_s: dict[str, float] = field(default_factory=dict)
    module_optimized_s: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def speedup(self) -> Optional[float]:
        if not self.optimized_s or not self.eager_s:
            return None
        return self.eager_s / self.optimized_s

    def to_json(self) -> dict:
        return {"capture_s": self.capture_s, "eager_s": self.eager_s, "optimized_s": self.optimized_s,
                "items_timed": self.items_timed, "module_eager_s": self.module_eager_s,
                "module_optimized_s": self.module_optimized_s, "error": self.error}

    @classmethod
    def from_json(cls, data: dict) -> "PipelineTiming":
        return cls(float(data["capture_s"]), float(data["eager_s"]),
                   None if data.get("optimized_s") is None else float(data["optimized_s"]),
                   int(data.get("items_timed", 0)), dict(data.get("module_eager_s", {})),
                   dict(data.get("module_optimized_s", {})), data.get("error"))


@dataclass
class OptimizeStatus:
    """Returned by ``nav.optimize``: per module, per graph, every candidate and the selection; the pipeline's
    eager and optimized end-to-end time and where the HTML report was written."""

    modules: dict[str, ModuleStatus] = field(default_factory=dict)
    seconds: float = 0.0
    pipeline: Optional[PipelineTiming] = None
    workspace: Optional[Path] = None
    report_path: Optional[Path] = None
    command: Optional[str] = None  # how the run was started (the script), for reproduce commands

    def selected(self) -> dict[str, list[Optional[str]]]:
        """Module name -> the selected runner of each graph."""
        return {n: [g.selected for g in m.graphs] for n, m in self.modules.items()}


def _dataloader_items(dataloader: Iterable) -> list[tuple[int, Any]]:
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


@contextlib.contextmanager
def _handlers(modules: list[Module], make: Callable[[Module, Optional[Callable]], Callable]) -> Iterator[None]:
    """Give every module the handler ``make(module, current_handler)`` for the block, then put the old ones back."""
    saved = {m.name: m._self_handler for m in modules}
    for m in modules:
        m._self_handler = make(m, saved[m.name])
    try:
        yield
    finally:
        for m in modules:
            m._self_handler = saved[m.name]


def _sync() -> None:
    """Wait for queued CUDA work so wall-clock times mean something (only while navdeploy measures)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class _PassTimer:
    """Per-module seconds while the callable runs over the dataloader: wraps a module's handler for the pass.

    Only ``nav.optimize`` installs it, for the capture pass and one pass after the swap; the handlers of the
    live modules are restored afterwards, so calls outside optimize never pay for it."""

    def __init__(self) -> None:
        self.module_s: dict[str, float] = {}
        self.handler_s: dict[str, float] = {}
        self._depth = 0

    def reset(self) -> None:
        self.module_s = dict.fromkeys(self.module_s, 0.0)
        self.handler_s = dict.fromkeys(self.handler_s, 0.0)

    def wrap(self, name: str, handler: Optional[Callable], inner: bool) -> Callable:
        """``inner``: time the module's own call (what ``fn`` does) separately from the handler around it."""
        self.module_s.setdefault(name, 0.0)
        self.handler_s.setdefault(name, 0.0)

        def timed(fn: Callable, args: tuple, kwargs: dict) -> Any:
            def module_call(*a: Any, **k: Any) -> Any:
                _sync()
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    _sync()
                    self.module_s[name] += time.perf_counter() - t

            target = module_call if inner else fn
            _sync()
            t0 = time.perf_counter()
            try:
                return handler(target, args, kwargs) if handler is not None else target(*args, **kwargs)
            finally:
                _sync()
                spent = time.perf_counter() - t0
                self.handler_s[name] += spent
                if not inner:
                    self.module_s[name] += spent

        return timed


def _timed_pass(func: Callable, items: list[tuple[int, Any]], timer: _PassTimer) -> tuple[float, int]:
    """Run the callable over the items; the first is an untimed warm-up when there are two or more, as in the
    capture pass that gives the eager figure (binding already warmed the runners up). Returns (seconds, items timed)."""
    warmup = 1 if len(items) >= 2 else 0
    for _, sample in items[:warmup]:
        args, kwargs = split_sample(sample)
        func(*args, **kwargs)
    timer.reset()
    _sync()
    start = time.perf_counter()
    for _, sample in items[warmup:]:
        args, kwargs = split_sample(sample)
        func(*args, **kwargs)
    _sync()
    return time.perf_counter() - start, len(items) - warmup


def _measure_optimized(func: Callable, items: list[tuple[int, Any]], modules: list[Module], capture_s: float,
                       capture_timer: _PassTimer, capture_timed_s: float, timed_items: int) -> PipelineTiming:
    """Eager figures from the capture pass (recording overhead taken out), optimized ones from one more pass."""
    overhead = sum(capture_timer.handler_s.values()) - sum(capture_timer.module_s.values())
    in_run = {m.name for m in modules}  # a module of another pipeline that this callable never called is not part of it
    timing = PipelineTiming(capture_s, max(capture_timed_s - overhead, 0.0), None, timed_items,
                            {n: s for n, s in capture_timer.module_s.items() if n in in_run})
    timer = _PassTimer()
    try:
        with _handlers(modules, lambda m, h: timer.wrap(m.name, h, False)), torch.no_grad():
            timing.optimized_s, _ = _timed_pass(func, items, timer)
        timing.module_optimized_s = dict(timer.module_s)
    except Exception as exc:  # noqa: BLE001 - a measurement must not fail the run
        timing.error = f"{type(exc).__name__}: {exc}"
        log.warning("navdeploy: timing the optimized pipeline failed: %s", timing.error)
    return timing


def _command() -> Optional[str]:
    """The user's script, for the report's reproduce commands; None under a runner (pytest, python -m ...)."""
    script = sys.argv[0] if sys.argv else ""
    if not script.endswith(".py") or os.path.basename(script) == "__main__.py" or "site-packages" in script:
        return None
    return script


def _module_config(module: Module, config: Optional[OptimizeConfig]) -> OptimizeConfig:
    """The module's own config (with the run's workspace when it names none), else the run's, else defaults."""
    own = module.optimize_config
    if own is None:
        return config or OptimizeConfig()
    if own.workspace is None and config is not None and config.workspace is not None:
        return own.replace(workspace=config.workspace)
    return own


@contextlib.contextmanager
def _inductor_cache(workspace: Path) -> Iterator[None]:
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


def _run_capture(func: Callable, items: list[tuple[int, Any]],
                 after_item: Optional[Callable[[int], None]] = None) -> None:
    for i, (_, sample) in enumerate(items):
        args, kwargs = split_sample(sample)
        try:
            func(*args, **kwargs)
            if after_item is not None:
                after_item(i)
        except TypeError as exc:
            if i == 0 and isinstance(sample, (list, tuple)) and "argument" in str(exc):
                raise DataloaderError(
                    f"calling the callable with dataloader item 0 failed: {exc}. A tuple or list sample is unpacked "
                    "into positional arguments; to pass one list (e.g. a list of sentences) as a single argument, "
                    "wrap it: (batch_size, (sentences,)).") from exc
            raise


def _module_device(module: torch.nn.Module) -> str:
    for tensor in module.parameters():
        return tensor.device.type
    for tensor in module.buffers():
        return tensor.device.type
    return "cpu"


@contextlib.contextmanager
def _logging_to(path: Path, mode: str) -> Iterator[None]:
    """The navdeploy logger writes to the module's log file (and the console with ``logs``) for a while."""
    handlers: list[logging.Handler] = [logging.FileHandler(path)]
    handlers[0].setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    if mode == "logs":
        handlers.append(console.log_handler())
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


def _graph_cache_key(graph: Graph, fp: str, device: str, precision: str, config: OptimizeConfig,
                     batch_sizes: tuple[int, ...], tolerances: dict[str, tuple[float, float]]) -> str:
    shape = {k: v for k, v in graph.to_json().items() if k != "calls"}
    # The tolerances in effect, not only the user's: they follow the TF32 settings too.
    return cache_key(__version__, torch.__version__, fp, shape, device, precision, sorted(tolerances.items()),
                     batch_sizes, config.max_batch_size, config.profile_time_s)


def _valid_formats(old_entry: Optional[dict], folder: Path) -> dict[str, dict]:
    """Formats built by an earlier run whose artifacts are still intact."""
    valid = {}
    for fmt, state in (old_entry or {}).get("formats", {}).items():
        path = folder / fmt
        if state.get("status") == "ok" and path.is_dir() and checksum(path) == state.get("checksum"):
            valid[fmt] = state
    return valid


def _candidates(config: OptimizeConfig, device: str, module_precision: str) -> list[tuple[RunnerSpec, str]]:
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
                    old_entry: Optional[dict], gkey: str, progress: console.Progress) -> dict:
    folder = job.module_dir / graph.key
    save_samples(graph, folder)
    old_entry = resume_entry(job.module_dir, graph.key, gkey, old_entry)  # a killed run's completed candidates
    reusable = old_entry is not None and old_entry.get("cache_key") == gkey
    formats = _valid_formats(old_entry, folder) if reusable else {}
    previous = {c.get("name", c["runner"]): c for c in old_entry["candidates"]} if reusable else {}
    pairs = _candidates(config, device, job.precision)
    records: dict[int, dict] = {}  # by the candidate's place in ``pairs``: the manifest keeps that order
    lock = threading.Lock()  # chains run on several threads when the module has several build workers

    def done(index: int, name: str, record: dict, checkpoint: bool) -> None:
        with lock:
            records[index] = record
            if checkpoint:  # survives a kill -9 of this run
                checkpoint_graph(job.module_dir, graph.key, gkey, formats, [records[i] for i in sorted(records)])
        progress.advance(f"{job.module_name}: {name}" + (" (cached)" if record.get("cached") else ""))

    def run_chain(chain: list[tuple[int, RunnerSpec, str]]) -> None:
        with executors.borrow() as executor:
            for index, runner, precision in chain:
                name = candidate_name(runner.name, precision, job.precision)
                fmt = artifact_dir(runner.format.value, precision, job.precision)
                cached = previous.get(name)
                artifact_ok = FORMATS[runner.format].export is None or fmt in formats
                if cached and cached["status"] in ("ok", "failed") and (artifact_ok or cached["status"] == "failed"):
                    done(index, name, {**cached, "cached": True}, checkpoint=False)
                    continue
                reason = runner.unavailable_reason()
                if reason:  # decided here: no worker starts, and a builds_alone runner never holds up the others
                    done(index, name, {**new_record(runner, precision, job.precision), "status": "skipped",
                                       "error": reason}, checkpoint=True)
                    continue
                if formats.get(fmt, {}).get("status") == "failed":
                    done(index, name, {**new_record(runner, precision, job.precision), "step": "export",
                                       "error": formats[fmt]["error"]}, checkpoint=False)
                    continue
                progress.describe(f"{job.module_name}: {name}")
                record = executor.run(Task(graph.key, runner.name, export=not artifact_ok, precision=precision))
                state = None
                if record.get("exported"):
                    state = {"status": "ok", "checksum": record["artifact_checksum"],
                             "export_s": record["times"].get("export_s")}
                elif not artifact_ok and record["status"] == "failed" and record.get("step") in ("export", "isolation"):
                    state = {"status": "failed", "error": record["error"]}
                if state is not None:
                    with lock:
                        formats[fmt] = state
                log.info("%s graph %s %s: %s%s", job.module_name, graph.key, name, record["status"],
                         f" ({record['error']})" if record.get("error") else "")
                done(index, name, record, checkpoint=True)

    # One worker: every candidate in order, as one chain. Several: chains side by side (profiling still alone).
    executors.map(run_chain, [[(i, r, p) for i, (r, p) in enumerate(pairs)]] if executors.workers == 1
                  else _chains(pairs, job.precision))
    candidates = [records[i] for i in sorted(records)]
    batch = graph.inputs[0].opt_shape[0] if graph.batching and graph.inputs else None
    winner = select(candidates, config.strategy, batch)
    return {"graph": graph.to_json(), "cache_key": gkey, "formats": formats, "candidates": candidates,
            "selected": winner["name"] if winner else None, "updated": now()}


def _optimize_module(module: Module, graphs: list[Graph], config: OptimizeConfig, mode: str,
                     progress: console.Progress) -> ModuleStatus:
    start = time.perf_counter()
    workspace = resolve_workspace(config)
    ensure_writable(workspace)
    folder = module_dir(workspace, module.name)
    device = config.target_device or _module_device(module.__wrapped__)
    with locked(folder, config.timeout_s), _logging_to(folder / LOG_FILE, mode):
        log.info("optimizing %s: %d graph(s) on %s", module.name, len(graphs), device)
        if module.__wrapped__.training:
            log.warning("module %s is in training mode; call .eval() before nav.optimize for stable results",
                        module.name)
        fp = fingerprint(module.__wrapped__)
        old = read_manifest(folder)
        old_graphs = old["graphs"] if old and old.get("fingerprint") == fp and old.get("device") == device else {}
        batch_sizes = config.profile_batch_sizes(max(g.inputs[0].max_shape[0] if g.batching else 1 for g in graphs))
        checked_as = {p: tolerance_precision(p, module.__wrapped__, device)
                      for p in candidate_precisions(module.precision, device, config.precisions) + (module.precision,)}
        tolerances = {p: config.tolerance_for(q) for p, q in checked_as.items()}
        if checked_as.get("fp32") == "tf32":
            log.info("%s: fp32 candidates are checked with the tf32 tolerance %s, as eager itself runs TF32 "
                     "convolutions/matmuls here (set torch.backends.cudnn.allow_tf32 = False for a strict check)",
                     module.name, tolerances["fp32"])
        job = Job(module.name, module.__wrapped__, module._self_forward_func, {g.key: g for g in graphs}, folder,
                  device, module.precision, tolerances, config.verify_func, batch_sizes, config.max_batch_size,
                  config.profile_time_s)
        entries = dict(old_graphs)  # graphs not seen this time stay valid: same weights, same device
        with module._nav_unpatched(), ExecutorPool(job, use_multiprocessing(config), config.timeout_s,
                                                   folder / LOG_FILE, build_workers(config)) as executors:
            for graph in graphs:
                gkey = _graph_cache_key(graph, fp, device, module.precision, config, batch_sizes, tolerances)
                entries[graph.key] = _optimize_graph(graph, job, executors, config, device,
                                                     old_graphs.get(graph.key), gkey, progress)
        manifest = {"version": MANIFEST_VERSION, "navdeploy": __version__, "torch": torch.__version__,
                    "module": module.name, "class": f"{type(module.__wrapped__).__module__}."
                    f"{type(module.__wrapped__).__qualname__}", "fingerprint": fp, "device": device,
                    "precision": module.precision, "forward_func": module._self_forward_func,
                    "max_batch_size": config.max_batch_size, "batch_sizes": list(batch_sizes),
                    "tolerances": {p: list(t) for p, t in tolerances.items()},
                    "graphs": entries, "updated": now()}
        write_json_atomic(folder / "manifest.json", manifest)  # last: a killed run leaves the old manifest
        optimized = bind(module, folder, manifest, fp)
    statuses = [GraphStatus(g.key, entries[g.key]["selected"], entries[g.key]["candidates"], g.batching)
                for g in graphs]
    return ModuleStatus(module.name, folder, device, statuses, optimized, time.perf_counter() - start, tolerances)


def optimize(func: Callable, dataloader: Iterable, config: Optional[OptimizeConfig] = None) -> OptimizeStatus:
    """Optimize every ``nav.Module`` that ``func`` calls while it runs over ``dataloader``.

    Each dataloader item is ``(batch_size, sample)``: a tuple/list sample is positional arguments (a
    trailing dict is keyword arguments), a dict alone is keyword arguments, anything else is one argument.
    Modules with ``module.optimize_config`` set use it; the others use ``config`` (or the defaults).
    After it returns, the wrapped modules run their fastest verified runner; inputs they were not
    optimized for run eagerly.
    """
    if mp.current_process().name.startswith("navdeploy-"):
        raise NavdeployError("nav.optimize was called while navdeploy's worker process imported your script: the "
                             "script runs nav.optimize at import time. Put it under `if __name__ == \"__main__\":` "
                             "or set NAVDEPLOY_USE_MULTIPROCESSING=False.")
    if not callable(func):
        raise TypeError(f"nav.optimize needs a callable (a pipeline, function or bound method); got {type(func).__name__}.")
    if config is not None and not isinstance(config, OptimizeConfig):
        raise TypeError(f"config must be a nav.OptimizeConfig, got {type(config).__name__}.")
    items = _dataloader_items(dataloader)
    mode = console_output()
    start = time.perf_counter()
    gc.collect()  # pipelines dropped by the user must not count as wrapped modules of this run
    modules = registered_modules()
    if not modules:
        raise NavdeployError("no nav.Module to optimize: wrap the modules of your pipeline first, "
                             "e.g. pipe.unet = nav.Module(pipe.unet, name='unet').")
    configs = {m.name: _module_config(m, config) for m in modules}
    recorders = {m.name: Recorder(m.name, configs[m.name].sample_count, m._self_batching) for m in modules}
    capture_timer = _PassTimer()
    marks: dict[str, float] = {}

    def after_item(i: int) -> None:  # the first item is a warm-up when there are two or more
        if i == 0 and len(items) >= 2:
            _sync()
            marks["timed_from"] = time.perf_counter()
            capture_timer.reset()

    capture_start = time.perf_counter()
    with _handlers(modules, lambda m, _: recorders[m.name].record), \
            _handlers(modules, lambda m, h: capture_timer.wrap(m.name, h, True)), torch.no_grad():
        _run_capture(func, items, after_item)
    _sync()
    capture_end = time.perf_counter()
    capture_s = capture_end - capture_start
    capture_timed_s = capture_end - marks.get("timed_from", capture_start)
    # Modules optimized by an earlier call and not used by this callable keep what they have. A module that an
    # earlier optimize captured and that this callable did not call is another pipeline's: a warning. One never
    # captured and not called is most likely called through a method: an error (also after a load_optimized that
    # found nothing for it, the usual "load, else optimize" flow).
    modules = [m for m in modules if recorders[m.name].graphs or not m._self_bound]
    hint = ("If your code calls a method such as self.forward(x) or encode() instead of the module itself, pass "
            "forward_func='forward' (that method's name) to nav.Module.")
    earlier = [m.name for m in modules if not recorders[m.name].graphs and m._self_captured]
    if earlier:
        warnings.warn(f"navdeploy: wrapped module(s) {', '.join(map(repr, earlier))} (captured by an earlier "
                      f"optimize) were not called by this callable; they stay as they are. {hint}",
                      RuntimeWarning, stacklevel=2)
        modules = [m for m in modules if m.name not in earlier]
    uncalled = [m.name for m in modules if not recorders[m.name].graphs]
    if len(uncalled) == len(modules):  # also when nothing is left: every module was another pipeline's
        raise CaptureError(f"the callable called none of the wrapped modules while it ran over the dataloader. {hint}")
    if uncalled:
        raise CaptureError(
            f"wrapped module(s) {', '.join(map(repr, uncalled))} were never called while the callable ran over the "
            f"dataloader. {hint}")
    for m in modules:
        m._self_captured = True
    status = OptimizeStatus(workspace=resolve_workspace(config), command=_command())
    work = {m.name: recorders[m.name].finish() for m in modules}
    total = sum(len(work[m.name]) * len(_candidates(configs[m.name], configs[m.name].target_device
                                                    or _module_device(m.__wrapped__), m.precision)) for m in modules)
    with console.progress(total, enabled=mode != "logs") as progress:
        for m in modules:
            # torch.compile caches inside the workspace so reloads and re-runs compile from cache.
            with _inductor_cache(resolve_workspace(configs[m.name])):
                status.modules[m.name] = _optimize_module(m, work[m.name], configs[m.name], mode, progress)
    status.seconds = time.perf_counter() - start
    if report_enabled():
        status.pipeline = _measure_optimized(func, items, modules, capture_s, capture_timer, capture_timed_s,
                                             len(items) - (1 if len(items) >= 2 else 0))
        status.report_path = _write_report(status)
    console.print_status(status, detailed=mode == "detailed")
    return status


def _write_report(status: OptimizeStatus) -> Optional[Path]:
    """The HTML report of this run in ``<workspace>/reports``; a failure to write it only warns."""
    try:
        from navdeploy.report.html import write_run_report

        return write_run_report(status)
    except Exception as exc:  # noqa: BLE001 - the optimization itself succeeded
        log.warning("navdeploy: could not write the HTML report: %s: %s", type(exc).__name__, exc)
        warnings.warn(f"navdeploy: could not write the HTML report: {type(exc).__name__}: {exc}", RuntimeWarning,
                      stacklevel=3)
        return None


def load_optimized(workspace: Optional[str | Path] = None) -> dict[str, bool]:
    """Rebind every live ``nav.Module`` to the runners selected by an earlier ``nav.optimize``.

    Reads ``<workspace>/<name>/manifest.json`` for each module (workspace: the argument, the module's
    ``optimize_config.workspace``, ``$NAVDEPLOY_WORKSPACE`` or ``~/.cache/navdeploy``). Modules without a usable
    optimization keep running eagerly, with a warning. Returns module name -> whether it is optimized.
    """
    result = {}
    for m in registered_modules():
        ws = Path(workspace) if workspace is not None else resolve_workspace(m.optimize_config)
        with _inductor_cache(ws):
            result[m.name] = bind(m, module_dir(ws, m.name))
    return result
