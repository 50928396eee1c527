"""``nav.optimize`` and ``nav.load_optimized``: capture, then per module and graph build, verify, profile,
select, write the manifest, and swap the winner in place."""

from __future__ import annotations

import contextlib
import gc
import multiprocessing as mp
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import torch

from navdeploy import __version__
from navdeploy.binding import bind
from navdeploy.candidate import Job, Task, artifact_dir, new_record
from navdeploy.capture import Graph, Recorder, split_sample
from navdeploy.config import OptimizeConfig, console_output, resolve_workspace, use_multiprocessing
from navdeploy.errors import CaptureError, DataloaderError, NavdeployError
from navdeploy.formats import EAGER_RUNNER, FORMATS, RunnerSpec, runners_for
from navdeploy.isolation import Executor
from navdeploy.module import Module, registered_modules
from navdeploy.precision import candidate_name, candidate_precisions
from navdeploy.report import console
from navdeploy.select import select
from navdeploy.workspace import (LOG_FILE, MANIFEST_VERSION, cache_key, checksum, ensure_writable, fingerprint,
                                 locked, module_dir, now, read_manifest, save_samples, write_json_atomic)

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


@dataclass
class OptimizeStatus:
    """Returned by ``nav.optimize``: per module, per graph, every candidate and the selection."""

    modules: dict[str, ModuleStatus] = field(default_factory=dict)
    seconds: float = 0.0

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
def _recording(modules: list[Module], recorders: dict[str, Recorder]) -> Iterator[None]:
    saved = {m.name: m._self_handler for m in modules}
    for m in modules:
        m._self_handler = recorders[m.name].record
    try:
        yield
    finally:
        for m in modules:
            m._self_handler = saved[m.name]


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
    """TORCHINDUCTOR_CACHE_DIR inside the workspace for the duration of the block, unless the user set it."""
    if "TORCHINDUCTOR_CACHE_DIR" in os.environ:
        yield
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(workspace / "inductor_cache")
    try:
        yield
    finally:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)


def _run_capture(func: Callable, items: list[tuple[int, Any]]) -> None:
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
                     batch_sizes: tuple[int, ...]) -> str:
    shape = {k: v for k, v in graph.to_json().items() if k != "calls"}
    return cache_key(__version__, torch.__version__, fp, shape, device, precision, config.tolerances,
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


def _optimize_graph(graph: Graph, job: Job, executor: Executor, config: OptimizeConfig, device: str,
                    old_entry: Optional[dict], gkey: str, progress: console.Progress) -> dict:
    folder = job.module_dir / graph.key
    save_samples(graph, folder)
    reusable = old_entry is not None and old_entry.get("cache_key") == gkey
    formats = _valid_formats(old_entry, folder) if reusable else {}
    previous = {c.get("name", c["runner"]): c for c in old_entry["candidates"]} if reusable else {}
    candidates = []
    for runner, precision in _candidates(config, device, job.precision):
        name = candidate_name(runner.name, precision, job.precision)
        fmt = artifact_dir(runner.format.value, precision, job.precision)
        cached = previous.get(name)
        artifact_ok = FORMATS[runner.format].export is None or fmt in formats
        if cached and cached["status"] in ("ok", "failed") and (artifact_ok or cached["status"] == "failed"):
            candidates.append({**cached, "cached": True})
            progress.advance(f"{job.module_name}: {name} (cached)")
            continue
        if formats.get(fmt, {}).get("status") == "failed":
            candidates.append({**new_record(runner, precision, job.precision), "step": "export",
                               "error": formats[fmt]["error"]})
            progress.advance(f"{job.module_name}: {name}")
            continue
        progress.describe(f"{job.module_name}: {name}")
        record = executor.run(Task(graph.key, runner.name, export=not artifact_ok, precision=precision))
        if record.get("exported"):
            formats[fmt] = {"status": "ok", "checksum": checksum(folder / fmt),
                            "export_s": record["times"].get("export_s")}
        elif not artifact_ok and record["status"] == "failed" and record.get("step") in ("export", "isolation"):
            formats[fmt] = {"status": "failed", "error": record["error"]}
        log.info("%s graph %s %s: %s%s", job.module_name, graph.key, name, record["status"],
                 f" ({record['error']})" if record.get("error") else "")
        candidates.append(record)
        progress.advance(f"{job.module_name}: {name}")
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
        tolerances = {p: config.tolerance_for(p)
                      for p in candidate_precisions(module.precision, device, config.precisions) + (module.precision,)}
        job = Job(module.name, module.__wrapped__, module._self_forward_func, {g.key: g for g in graphs}, folder,
                  device, module.precision, tolerances, config.verify_func, batch_sizes, config.max_batch_size,
                  config.profile_time_s)
        entries = dict(old_graphs)  # graphs not seen this time stay valid: same weights, same device
        with module._nav_unpatched(), Executor(job, use_multiprocessing(config), config.timeout_s,
                                               folder / LOG_FILE) as executor:
            for graph in graphs:
                gkey = _graph_cache_key(graph, fp, device, module.precision, config, batch_sizes)
                entries[graph.key] = _optimize_graph(graph, job, executor, config, device,
                                                     old_graphs.get(graph.key), gkey, progress)
        manifest = {"version": MANIFEST_VERSION, "navdeploy": __version__, "torch": torch.__version__,
                    "module": module.name, "class": f"{type(module.__wrapped__).__module__}."
                    f"{type(module.__wrapped__).__qualname__}", "fingerprint": fp, "device": device,
                    "precision": module.precision, "forward_func": module._self_forward_func,
                    "max_batch_size": config.max_batch_size, "batch_sizes": list(batch_sizes),
                    "graphs": entries, "updated": now()}
        write_json_atomic(folder / "manifest.json", manifest)  # last: a killed run leaves the old manifest
        optimized = bind(module, folder, manifest, fp)
    statuses = [GraphStatus(g.key, entries[g.key]["selected"], entries[g.key]["candidates"], g.batching)
                for g in graphs]
    return ModuleStatus(module.name, folder, device, statuses, optimized, time.perf_counter() - start)


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
    with _recording(modules, recorders), torch.no_grad():
        _run_capture(func, items)
    # Modules optimized by an earlier call and not used by this callable keep what they have.
    modules = [m for m in modules if recorders[m.name].graphs or not m._self_bound]
    uncalled = [m.name for m in modules if not recorders[m.name].graphs]
    if uncalled:
        raise CaptureError(
            f"wrapped module(s) {', '.join(map(repr, uncalled))} were never called while the callable ran over the "
            "dataloader. If your code calls a method such as self.forward(x) or encode() instead of the module "
            "itself, pass forward_func='forward' (that method's name) to nav.Module.")
    status = OptimizeStatus()
    work = {m.name: recorders[m.name].finish() for m in modules}
    total = sum(len(work[m.name]) * len(_candidates(configs[m.name], configs[m.name].target_device
                                                    or _module_device(m.__wrapped__), m.precision)) for m in modules)
    with console.progress(total, enabled=mode != "logs") as progress:
        for m in modules:
            # torch.compile caches inside the workspace so reloads and re-runs compile from cache.
            with _inductor_cache(resolve_workspace(configs[m.name])):
                status.modules[m.name] = _optimize_module(m, work[m.name], configs[m.name], mode, progress)
    status.seconds = time.perf_counter() - start
    console.print_status(status, detailed=mode == "detailed")
    return status


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
