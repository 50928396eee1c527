"""The orchestration of ``nav.optimize``: capture every wrapped module's calls, then optimize each module,
emitting events (``events.py``) for whoever shows the run; ``navdeploy.api`` chooses the listeners."""

from __future__ import annotations

import gc
import multiprocessing as mp
import time
from typing import Callable, Iterable, Optional

import torch

from navdeploy.candidates.imports_ahead import defining_modules
from navdeploy.candidates.isolation import WorkerHub
from navdeploy.capture.recorder import Recorder
from navdeploy.config import (
    OptimizeConfig,
    build_workers,
    parallel_modules,
    resolve_workspace,
    use_multiprocessing,
    weight_bytes,
)
from navdeploy.errors import NavdeployError
from navdeploy.formats.registry import start_availability_checks
from navdeploy.inplace.registry import registered_modules
from navdeploy.optimize.dataloader import dataloader_items, run_capture, script_command
from navdeploy.optimize.events import NullListener, OptimizeListener
from navdeploy.optimize.module import (
    candidate_pairs,
    copies_beside,
    module_config,
    module_device,
    optimize_module,
)
from navdeploy.optimize.never_slower import check_pipeline, module_tolerance
from navdeploy.optimize.participants import modules_to_optimize, nested
from navdeploy.optimize.pipeline import handlers, sync_cuda
from navdeploy.optimize.status import OptimizeStatus
from navdeploy.workspace.layout import MANIFEST, module_dir
from navdeploy.workspace.manifest import read_manifest


def run_optimize(func: Callable, dataloader: Iterable, config: Optional[OptimizeConfig] = None,
                 listener: OptimizeListener = NullListener(), measure_pipeline: bool = True) -> OptimizeStatus:
    """Optimize every ``nav.Module`` that ``func`` calls while it runs over ``dataloader``, telling ``listener``.

    ``measure_pipeline`` times ``func`` eager against optimized afterwards and reverts modules that make it no
    faster (``status.pipeline``; ``config.pipeline_repeats`` alternating passes of each, 0 skips it).
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
        raise TypeError("nav.optimize needs a callable (a pipeline, function or bound method); "
                        f"got {type(func).__name__}.")
    if config is not None and not isinstance(config, OptimizeConfig):
        raise TypeError(f"config must be a nav.OptimizeConfig, got {type(config).__name__}.")
    items = dataloader_items(dataloader)
    start = time.perf_counter()
    gc.collect()  # pipelines dropped by the user must not count as wrapped modules of this run
    modules = registered_modules()
    if not modules:
        raise NavdeployError("no nav.Module to optimize: wrap the modules of your pipeline first, "
                             "e.g. pipe.unet = nav.Module(pipe.unet, name='unet').")
    configs = {m.name: module_config(m, config) for m in modules}
    pairs = {m.name: candidate_pairs(configs[m.name], configs[m.name].target_device or module_device(m.__wrapped__),
                                     m.precision) for m in modules}
    start_availability_checks(runner for m in modules for runner, _ in pairs[m.name])
    recorders = {m.name: Recorder(m.name, configs[m.name].sample_count, m.nav_state.batching,
                                   m.nav_state.output_mapping) for m in modules}
    devices = [configs[m.name].target_device or module_device(m.__wrapped__) for m in modules]
    at_once = 1 if nested(modules) else parallel_modules(config or OptimizeConfig(), [m.__wrapped__ for m in modules],
                                                         devices)
    alone = at_once == 1 or len(modules) == 1  # no module is optimized side by side with another
    with WorkerHub() as hub:
        # The first modules' workers import torch while the pipeline is captured; later modules reuse them. Not
        # when every module was optimized before: a re-run is usually answered from the cache, with no worker.
        first = configs[modules[0].name]
        if use_multiprocessing(first) and any(
                not (module_dir(resolve_workspace(configs[m.name]), m.name) / MANIFEST).is_file() for m in modules):
            # A module alone whose bf16 copies may build beside its own candidates gets its second worker now: once
            # eager's screen says they will, a worker that starts then delays them by its start (3-4 s).
            spare = alone and any(copies_beside(m, configs[m.name], d, alone) for m, d in zip(modules, devices))
            hub.prestart(build_workers(first) * at_once + spare, defining_modules(m.__wrapped__ for m in modules))
        capture_start = time.perf_counter()
        with handlers(modules, lambda m, _: recorders[m.name].record), torch.no_grad():
            run_capture(func, items)
        sync_cuda()
        capture_s = time.perf_counter() - capture_start
        modules = modules_to_optimize(modules, recorders)
        if not modules:  # every module stayed eager, each with its warning: nothing to build or report
            return OptimizeStatus(seconds=time.perf_counter() - start, workspace=resolve_workspace(config))
        alone = alone or len(modules) == 1  # the others stayed eager: this one is optimized alone
        for m in modules:
            m.nav_state.captured = True
        status = OptimizeStatus(workspace=resolve_workspace(config), command=script_command())
        work = {m.name: recorders[m.name].finish() for m in modules}
        total = sum(len(work[m.name]) * len(pairs[m.name]) for m in modules)
        listener.candidates_started(total)
        try:
            # Side by side when there are cores to spare: each module's job carries its own inductor cache
            # (torch.compile and AOTInductor compile into the module's folder, so reloads and re-runs compile from
            # cache), and the hub's timing gate keeps every build away from every timing.
            # The largest first, so that a small module's optimize fills the end rather than a large one's.
            order = sorted(modules, key=lambda m: -weight_bytes(m.__wrapped__)) if at_once > 1 else modules
            # The last module waited for a slot: as it starts, the larger modules beside it are ending. It is
            # optimized as alone, its candidates on two workers where its copies may build beside (the SD text
            # encoder's builds took ~8 s on one worker while the other core idled).
            tail = order[-1] if len(order) > at_once > 1 else None
            done = hub.modules(lambda m: optimize_module(m, work[m.name], configs[m.name], listener, hub,
                                                         alone or m is tail), order, at_once)
            results = {m.name: module_status for m, module_status in zip(order, done)}
            for m in modules:
                status.modules[m.name] = results[m.name]
        finally:
            listener.candidates_finished()
    status.seconds = time.perf_counter() - start
    repeats = (config or OptimizeConfig()).pipeline_repeats
    if measure_pipeline and repeats:
        # Eager against optimized, the whole callable: modules whose runners make it no faster go back to eager.
        status.pipeline = check_pipeline(func, items, modules, {n: s.folder for n, s in status.modules.items()},
                                         repeats, capture_s, len(items) - (1 if len(items) >= 2 else 0),
                                         {n: module_tolerance(s) for n, s in status.modules.items()})
        for name in status.pipeline.reverted:
            status.modules[name].optimized = False
            status.modules[name].reverted = status.pipeline.reverted[name]
        for name in status.pipeline.fell_back:  # the fallbacks in the module's own precision run now
            status.modules[name].optimized = any(m.is_optimized for m in modules if m.name == name)
            manifest = read_manifest(status.modules[name].folder)
            for graph in status.modules[name].graphs if manifest is not None else ():
                entry = manifest.graphs.get(graph.key)
                graph.selected = entry.selected if entry is not None else graph.selected
    listener.run_finished(status)
    return status

