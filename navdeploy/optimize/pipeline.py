"""End-to-end timing of the user's callable over the dataloader, eager and with the selected runners in place."""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from typing import Any, Callable, Iterator, Optional

import torch

from navdeploy.capture.pytree import split_sample
from navdeploy.inplace.module import Module
from navdeploy.optimize.status import PipelineTiming

log = logging.getLogger("navdeploy")


@contextlib.contextmanager
def handlers(modules: list[Module], make: Callable[[Module, Optional[Callable]], Callable]) -> Iterator[None]:
    """Give every module the handler ``make(module, current_handler)`` for the block, then put the old ones back."""
    with contextlib.ExitStack() as stack:
        for m in modules:
            stack.enter_context(m.nav_state.routed_through(make(m, m.nav_state.handler)))
        yield


def sync_cuda() -> None:
    """Wait for queued CUDA work so wall-clock times mean something (only while navdeploy measures)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class PassTimer:
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
                sync_cuda()
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    sync_cuda()
                    self.module_s[name] += time.perf_counter() - t

            target = module_call if inner else fn
            sync_cuda()
            t0 = time.perf_counter()
            try:
                return handler(target, args, kwargs) if handler is not None else target(*args, **kwargs)
            finally:
                sync_cuda()
                spent = time.perf_counter() - t0
                self.handler_s[name] += spent
                if not inner:
                    self.module_s[name] += spent

        return timed


def _timed_pass(func: Callable, items: list[tuple[int, Any]], timer: PassTimer) -> tuple[float, int]:
    """Run the callable over the items; the first is an untimed warm-up when there are two or more, as in the
    capture pass that gives the eager figure (binding already warmed the runners up). Returns (seconds, items timed)."""
    warmup = 1 if len(items) >= 2 else 0
    for _, sample in items[:warmup]:
        args, kwargs = split_sample(sample)
        func(*args, **kwargs)
    timer.reset()
    sync_cuda()
    start = time.perf_counter()
    for _, sample in items[warmup:]:
        args, kwargs = split_sample(sample)
        func(*args, **kwargs)
    sync_cuda()
    return time.perf_counter() - start, len(items) - warmup


def _compiles() -> int:
    """torch.compile graphs compiled in this process so far (0 when dynamo was never imported)."""
    import sys

    utils = sys.modules.get("torch._dynamo.utils")
    return int(utils.counters["stats"]["unique_graphs"]) if utils is not None else 0


def _one_pass(func: Callable, items: list[tuple[int, Any]], modules: list[Module], eager: bool) -> tuple[float, dict]:
    """One timed pass, every module eager (``eager``) or with what it is bound to; (seconds, per-module seconds)."""
    timer = PassTimer()
    with handlers(modules, lambda m, h: timer.wrap(m.name, None if eager else h, False)), torch.no_grad():
        seconds, _ = _timed_pass(func, items, timer)
    return seconds, dict(timer.module_s)


def _mad(values: list[float]) -> float:
    middle = statistics.median(values)
    return statistics.median(abs(v - middle) for v in values)


def compare(func: Callable, items: list[tuple[int, Any]], modules: list[Module], repeats: int,
            timing: PipelineTiming, warm: bool = True) -> PipelineTiming:
    """Fill ``timing`` with an A/B of the callable: a warm-up pass each way (``warm``; False when passes of both
    ran just before), then ``repeats`` eager and optimized passes alternating (eager first), medians and spreads;
    ``faster`` when the optimized median beats the eager one by more than either's median absolute deviation."""
    if warm:
        _one_pass(func, items, modules, eager=False)
        _one_pass(func, items, modules, eager=True)
    runs: dict[bool, list[tuple[float, dict]]] = {True: [], False: []}
    compiled = 0
    for _ in range(repeats):
        for eager in (True, False):
            before = _compiles()
            runs[eager].append(_one_pass(func, items, modules, eager))
            compiled += _compiles() != before
    names = {m.name for m in modules}

    def module_medians(passes: list[tuple[float, dict]]) -> dict[str, float]:
        return {n: statistics.median(p[1].get(n, 0.0) for p in passes) for n in sorted(names)}

    timing.eager_runs = [p[0] for p in runs[True]]
    timing.optimized_runs = [p[0] for p in runs[False]]
    timing.eager_s, timing.optimized_s = statistics.median(timing.eager_runs), statistics.median(timing.optimized_runs)
    timing.module_eager_s, timing.module_optimized_s = module_medians(runs[True]), module_medians(runs[False])
    timing.repeats, timing.compiled = repeats, compiled
    noise = max(_mad(timing.eager_runs), _mad(timing.optimized_runs))
    timing.faster = timing.optimized_s < timing.eager_s - noise
    return timing
