"""End-to-end timing of the user's callable over the dataloader, eager and with the selected runners in place."""

from __future__ import annotations

import contextlib
import logging
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


def measure_optimized(func: Callable, items: list[tuple[int, Any]], modules: list[Module], capture_s: float,
                       capture_timer: PassTimer, capture_timed_s: float, timed_items: int) -> PipelineTiming:
    """Eager figures from the capture pass (recording overhead taken out), optimized ones from one more pass."""
    overhead = sum(capture_timer.handler_s.values()) - sum(capture_timer.module_s.values())
    in_run = {m.name for m in modules}  # a module of another pipeline that this callable never called is not part of it
    timing = PipelineTiming(capture_s, max(capture_timed_s - overhead, 0.0), None, timed_items,
                            {n: s for n, s in capture_timer.module_s.items() if n in in_run})
    timer = PassTimer()
    try:
        with handlers(modules, lambda m, h: timer.wrap(m.name, h, False)), torch.no_grad():
            timing.optimized_s, _ = _timed_pass(func, items, timer)
        timing.module_optimized_s = dict(timer.module_s)
    except Exception as exc:  # noqa: BLE001 - a measurement must not fail the run
        timing.error = f"{type(exc).__name__}: {exc}"
        log.warning("navdeploy: timing the optimized pipeline failed: %s", timing.error)
    return timing
