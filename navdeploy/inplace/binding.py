"""Swapping the selected runners into live ``nav.Module``s, from a module's manifest.

The same path serves the end of ``nav.optimize`` and ``nav.load_optimized()`` in a fresh process, so
what is tested once is what users get in both.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
import warnings
from pathlib import Path
from typing import Iterator, Optional

import torch

from navdeploy.candidates.build import expand_batch, prepare
from navdeploy.candidates.verify import conform
from navdeploy.capture.graph import Graph, Sample, median_sample, tensors_of_kind
from navdeploy.formats.base import Format, LoadContext, RunFn
from navdeploy.formats.registry import EAGER_RUNNER, FORMATS, RUNNERS
from navdeploy.inplace.handler import OptimizedHandler
from navdeploy.inplace.module import Module
from navdeploy.inplace.staleness import WeightsWatch, watch_module_dicts
from navdeploy.workspace.fingerprint import checksum, fingerprint
from navdeploy.workspace.inductor import pointed_at, private_copy, user_cache_dir
from navdeploy.workspace.layout import artifact_path
from navdeploy.workspace.manifest import load_manifest
from navdeploy.workspace.records import CandidateRecord, GraphEntry, Manifest
from navdeploy.workspace.samples import load_samples

log = logging.getLogger("navdeploy")


def _load_runner(module: Module, folder: Path, graph: Graph, entry: GraphEntry, device: str,
                 module_precision: str) -> RunFn:
    record = entry.selected_candidate()
    if record is None:
        raise RuntimeError(f"the manifest names {entry.selected!r} but holds no record of it")
    runner = RUNNERS[record.runner]
    precision = record.precision_in(module_precision)
    spec = FORMATS[runner.format]
    flat, cast = prepare(module.__wrapped__, module.nav_state.forward_func, graph, runner, precision, module_precision)
    artifact = None
    if spec.export is not None:
        fmt = record.artifact_dir(module_precision)
        state = entry.formats.get(fmt)
        fmt_dir = artifact_path(folder / graph.key, fmt, state.checksum if state is not None else None)
        if not fmt_dir.is_dir() or state is None or checksum(fmt_dir) != state.checksum:
            raise RuntimeError(f"artifact {fmt_dir} is missing or was modified (checksum mismatch)")
        artifact = fmt_dir / spec.artifact
    loaded = runner.load(LoadContext(artifact, flat, graph, device, precision))
    run = loaded if precision == module_precision else (lambda inputs: loaded(cast(inputs)))
    samples = load_samples(folder / graph.key, device=device)
    captured = samples[0].inputs
    # Warm-up, and proof the runner works in this process. On CUDA each shape is called 3 times: CUDA-graph
    # runners warm up on the first call and record on the second.
    calls = 3 if device == "cuda" else 1
    with torch.no_grad():
        for _ in range(calls):
            conform(run(captured), graph.outputs)  # a failure here rejects the runner: the graph stays eager
    for batch_size, inputs in warm_up_inputs(graph, record, samples):
        try:
            # None: a plain call, which the first call above already made with the captured inputs.
            for kind in graph.call_kinds if inputs is captured else [None, *graph.call_kinds]:
                kinded = inputs if kind is None else tensors_of_kind(kind, inputs)
                with torch.inference_mode(kind is not None and kind[0] == "I"), torch.no_grad():
                    for _ in range(calls):
                        run(kinded)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory at the largest batch: the runner stays,
            # and a call of that size that fails again falls back to eager, as any failing runner call does
            at = f"batch size {batch_size}" if batch_size is not None else "a captured shape"
            log.warning("module %s: warm-up at %s failed: %s", module.name, at, exc)
    return run


def warm_up_inputs(graph: Graph, record: CandidateRecord,
                   samples: list[Sample]) -> Iterator[tuple[Optional[int], list[torch.Tensor]]]:
    """What a bound runner is warmed up with after its first call (each in every kind of call the capture saw,
    ``Graph.call_kinds``: torch.compile guards on inference mode and inference tensors), so that no call the
    pipeline makes pays for a compile: the first sample, each further captured shape (a decoder's cache length of
    1, then 2: torch.compile specialises a size of 1), and every profiled batch size (:func:`extra_warm_up_sizes`)
    with the graph's typical sample grown or cut to it, as the profile called it (a size the pipeline called at is
    profiled on its own kept sample, ``Graph.sample_for``: that shape is among the samples above)."""
    captured = samples[0].inputs
    yield None, captured
    seen = [[tuple(t.shape) for t in captured]]
    for sample in samples[1:]:
        shapes = [tuple(t.shape) for t in sample.inputs]
        if shapes not in seen:
            seen.append(shapes)
            yield None, sample.inputs
    typical = median_sample(samples, graph.typical_batch).inputs  # Graph.typical_sample: what each size was profiled on
    for batch_size in extra_warm_up_sizes(graph, record, typical):
        yield batch_size, expand_batch(typical, batch_size)


def extra_warm_up_sizes(graph: Graph, record: CandidateRecord, captured: list[torch.Tensor]) -> list[int]:
    """The batch sizes besides the captured one that a bound runner is warmed up at: every batch size it was
    profiled at. torch.compile runners compile again for a second batch size (with the batch axis symbolic; on
    the CPU a first call at a new size takes 9 s) and CUDA-graph runners record a graph per shape, so without this
    the first request of a new batch size would pay for a compile."""
    if not graph.batching:
        return []
    batch = next((t.shape[0] for t in captured if t.dim() > 0), None)
    return sorted({m.batch_size for m in record.profile if m.batch_size} - {batch})


# Formats whose runners run code from the inductor cache when they load (torch.compile's graphs; AOTInductor
# takes its lock there and compiles helpers into it).
_INDUCTOR_FORMATS = (Format.TORCH, Format.TORCH_AOTI)


def loads_from_inductor_cache(manifest: Manifest, fallbacks: bool = False) -> bool:
    """Whether a selected runner of the module (or, with ``fallbacks``, a graph's fallback, which the pipeline
    check may bind instead) loads code from its inductor cache (torch.compile, AOTInductor)."""
    records = [e.selected_candidate() for e in manifest.graphs.values()]
    if fallbacks:
        records += [e.fallback_candidate() for e in manifest.graphs.values()]
    uses = [RUNNERS[c.runner] for c in records if c is not None and c.runner in RUNNERS]
    return any(r.format in _INDUCTOR_FORMATS and r.name not in EAGER_RUNNER.values() for r in uses)


def _inductor_cache_for(module: Module, folder: Path, manifest: Manifest,
                        in_optimize: bool) -> contextlib.AbstractContextManager:
    """Where the selected runners find the module's inductor cache while they load and warm up."""
    if in_optimize or user_cache_dir() is not None or not loads_from_inductor_cache(manifest):
        return contextlib.nullcontext()
    return pointed_at(private_copy(folder, manifest.inductor_cache, module.name))


def _warn(module: Module, message: str) -> bool:
    log.warning("module %s runs eagerly: %s", module.name, message)
    warnings.warn(f"navdeploy: module {module.name!r} runs eagerly: {message}", RuntimeWarning, stacklevel=4)
    return False


def bind(module: Module, folder: Path, manifest: Optional[Manifest] = None, fingerprint_: Optional[str] = None,
         in_optimize: bool = False) -> bool:
    """Route ``module`` to the runners its manifest selected. Returns False (module stays eager, with one
    warning) when there is nothing usable: no manifest, an unreadable or hand-edited one, changed weights,
    missing or modified artifacts. It never raises for what it finds in the workspace.

    torch.compile and AOTInductor runners load from a private copy of the module's inductor cache that matched
    the manifest's checksum (:mod:`navdeploy.workspace.inductor`): nothing is written into the workspace. With
    ``in_optimize`` (the end of ``nav.optimize``, whose scope points at the workspace's cache, and which records
    the cache's checksum after this) they load from the workspace's cache itself."""
    module.nav_state.unbind()  # every path that does not bind leaves the module eager
    start = time.perf_counter()
    if manifest is None:
        manifest, problem = load_manifest(folder)
        if problem:
            return _warn(module, f"{problem}. Re-run nav.optimize to rebuild it.")
    if manifest is None:
        return _warn(module, f"no optimization found in {folder}. Run nav.optimize first, or point "
                     "NAVDEPLOY_WORKSPACE (or load_optimized(workspace)) at the workspace it used.")
    if manifest.module != module.name:
        return _warn(module, f"the manifest in {folder} belongs to module {manifest.module!r}.")
    try:
        current = fingerprint_ or fingerprint(module.__wrapped__)
    except Exception as exc:  # noqa: BLE001 - an unusual parameter type must not break the pipeline
        return _warn(module, f"its weights cannot be fingerprinted ({type(exc).__name__}: {exc}).")
    if manifest.fingerprint != current:
        return _warn(module, "it changed (weights, added parameters such as LoRA adapters, or code) since it was "
                     "optimized; the stale artifacts are not used. Re-run nav.optimize to optimize it again.")
    device = manifest.device
    if device == "cuda" and not torch.cuda.is_available():
        return _warn(module, "it was optimized for CUDA but no GPU is present.")
    if manifest.reverted:
        log.warning("module %s runs eagerly: nav.optimize's pipeline check put it back to eager (%s)", module.name,
                    manifest.reverted)
        module.nav_state.bind(None)
        return True  # the pipeline check chose eager for it: bound, as eager
    if manifest.fell_back:
        log.info("module %s runs its best candidates in its own precision (%s): nav.optimize's pipeline check chose "
                 "them over the winners in another precision (%s)", module.name, manifest.precision,
                 manifest.fell_back)
    selected = {key: entry.selected for key, entry in manifest.graphs.items()}
    if selected and all(name in EAGER_RUNNER.values() for name in selected.values()):  # eager, own precision
        module.nav_state.bind(None)
        log.info("module %s bound in %.1f s: eager won everywhere (a plain pass-through, no routing)", module.name,
                 time.perf_counter() - start)
        return True
    graphs: dict[str, tuple[Graph, RunFn]] = {}
    problems = []
    eager_keys = set()  # graphs eager won: their calls go to the module's own forward, not through a flat runner
    watch_module_dicts(module.__wrapped__)  # before the runners load: what their guards read stays as it is
    cache_counts = _compile_cache_counts()
    with _inductor_cache_for(module, folder, manifest, in_optimize):
        for key, entry in manifest.graphs.items():
            name = entry.selected
            if not name:
                continue  # every candidate failed: this input structure runs eagerly
            if name in EAGER_RUNNER.values():
                eager_keys.add(key)
                continue
            try:
                graphs[key] = (entry.graph, _load_runner(module, folder, entry.graph, entry, device,
                                                         manifest.precision))
            except Exception as exc:  # noqa: BLE001 - a broken artifact must not break the user's pipeline
                problems.append(f"cannot load {name} for graph {key} ({type(exc).__name__}: {exc})")
    if problems:
        scope = "those input structures run" if graphs else "it runs"
        log.warning("module %s: %s", module.name, "; ".join(problems))
        warnings.warn(f"navdeploy: module {module.name!r}: {'; '.join(problems)}; {scope} eagerly. Re-run "
                      "nav.optimize to rebuild.", RuntimeWarning, stacklevel=3)
    if not graphs:
        if eager_keys and not problems:  # eager won every graph that has a winner: a plain pass-through
            module.nav_state.bind(None)
            return True
        return False
    watch = WeightsWatch(module.__wrapped__, module.nav_state)  # calls the runner no longer stands for run eagerly
    module.nav_state.bind(OptimizedHandler(module.name, graphs, manifest.max_batch_size,
                                           module.nav_state.output_mapping, watch, eager_keys))
    log.info("module %s bound in %.1f s: %s%s", module.name, time.perf_counter() - start,
             {k: manifest.graphs[k].selected for k in graphs}, compile_cache_use(cache_counts))
    return True


def _compile_cache_counts() -> dict[str, int]:
    """torch.compile's cache counters of this process (only read when torch._dynamo is already imported)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    if dynamo is None:
        return {}
    counters = dynamo.counters
    return {f"{group}.{name}": counters[group][name] for group, names in _CACHE_COUNTERS.items() for name in names}


_CACHE_COUNTERS = {"inductor": ("fxgraph_cache_hit", "fxgraph_cache_miss", "fxgraph_cache_bypass"),
                   "aot_autograd": ("autograd_cache_hit", "autograd_cache_miss", "autograd_cache_bypass")}


def compile_cache_use(before: dict[str, int]) -> str:
    """What the bind's compiles found in the inductor cache since ``before`` (torch's counters), e.g. ``" (compile
    caches: fxgraph_cache_hit 1, autograd_cache_hit 1)"``; empty when nothing compiled. A miss here is a compile
    from scratch: what makes a bind take a minute instead of seconds."""
    after = _compile_cache_counts()
    used = {key.split(".")[1]: after[key] - before.get(key, 0) for key in after if after[key] > before.get(key, 0)}
    return f" (compile caches: {', '.join(f'{k} {v}' for k, v in used.items())})" if used else ""
