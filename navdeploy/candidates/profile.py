"""Latency and throughput of one runner on one input, measured in windows until they agree."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch

from navdeploy.workspace.records import ProfilePoint

# measure's result, a candidate record's profile point, also importable under this name.
Measurement = ProfilePoint


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _window_cpu(run: Callable[[], object], window_s: float) -> list[float]:
    """Per-call wall times (s) of the calls made in one window."""
    times: list[float] = []
    window_end = time.perf_counter() + window_s
    while True:
        start = time.perf_counter()
        run()
        end = time.perf_counter()
        times.append(end - start)
        if end >= window_end:
            return times


_IN_FLIGHT = 2


def _window_cuda(run: Callable[[], object], window_s: float) -> list[float]:
    """Per-call times (s) of one window on the GPU, between CUDA events recorded around each call, calls
    following one another with up to ``_IN_FLIGHT`` queued: the time per call of a stream of calls, as a
    pipeline or server issues them, and as the benchmarks time modules (events around a loop). A sync per
    call instead lets the GPU idle while the CPU launches the next call (eager ResNet-50 fp16 read 10.5 ms
    that way, 6.8 ms between events over a loop). A runner that syncs inside shows its full time, host work
    included: its start event fires when the GPU is idle, i.e. at once. A GPU-bound runner shows its GPU
    time, its host work being hidden behind the previous call's kernels."""
    events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
    window_end = time.perf_counter() + window_s
    while True:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        events.append((start, end))
        # At most _IN_FLIGHT calls queued: the CPU could otherwise run hundreds of calls ahead of a GPU-bound
        # runner (the driver's launch queue is the only limit), and the window would last far past its end.
        if len(events) > _IN_FLIGHT:
            events[-_IN_FLIGHT - 1][1].synchronize()
        if time.perf_counter() >= window_end:
            break
    torch.cuda.synchronize()
    return [s.elapsed_time(e) / 1e3 for s, e in events]


def _quietest(windows: list[list[float]], min_calls: int) -> list[list[float]]:
    """The windows with the lowest means, enough of them for ``min_calls`` calls (or all): when the windows never
    agreed, another process's bursts slowed some of them (torch's threads stall while they last), and the quiet
    windows are the candidate's own cost. Every candidate of a busy run is read the same way, eager included."""
    chosen: list[list[float]] = []
    for w in sorted(windows, key=statistics.fmean):
        chosen.append(w)
        if sum(len(c) for c in chosen) >= min_calls:
            break
    return chosen


# The fewest calls a profile's figure rests on (unless that takes over ten times its budget).
MIN_CALLS = 10


def measure(run: Callable[[], object], batch_size: Optional[int], device: str, time_budget_s: float,
            window_count: int = 3, tolerance: float = 0.05, min_calls: int = MIN_CALLS) -> ProfilePoint:
    """Warm up, then time calls in windows of ~budget/10 until ``window_count`` window means are within
    ``tolerance`` of each other or the budget runs out; the budget starts after the warm-up. Percentiles come
    from the last windows' calls, at least ``min_calls`` of them unless that would take over ten times the
    budget (then ``stable`` is False: the figure rests on few calls); when the windows never agreed (``stable``
    False), from the quietest windows (``_quietest``). On CUDA the calls are timed with CUDA
    events, back to back (see ``_window_cuda``)."""
    for _ in range(2):  # first calls pay for lazy initialisation and allocator growth
        run()
    _sync(device)
    deadline = time.perf_counter() + time_budget_s
    window = _window_cuda if device == "cuda" else _window_cpu
    window_s = max(time_budget_s / 10, 0.005)
    windows: list[list[float]] = []
    stable = False
    while True:
        windows.append(window(run, window_s))
        if len(windows[-1]) * window_count < min_calls:  # windows too short to hold the floor: lengthen them
            window_s *= 2
        recent = [statistics.fmean(w) for w in windows[-window_count:]]
        measured = sum(len(w) for w in windows[-window_count:])
        agree = len(recent) == window_count and (max(recent) - min(recent)) <= tolerance * min(recent)
        if agree and measured >= min_calls:  # three windows of one call each agreeing is luck, not a figure
            stable = True
            break
        if time.perf_counter() >= deadline and (measured >= min_calls
                                                or time.perf_counter() >= deadline + 9 * time_budget_s):
            break
    chosen = windows[-window_count:] if stable else _quietest(windows, min_calls)
    calls = sorted(t for w in chosen for t in w)
    p50 = calls[len(calls) // 2]
    p90 = calls[min(len(calls) - 1, int(len(calls) * 0.9))]
    items = batch_size or 1
    return ProfilePoint(batch_size, p50 * 1e3, p90 * 1e3, items / statistics.fmean(calls), len(calls), stable)


def combine_rounds(points: list[ProfilePoint]) -> ProfilePoint:
    """One figure from the rounds of a profile taken in turns with other candidates' (at one batch size): the
    median round for latency and throughput, every round's calls counted, stable when every round was. A burst of
    load that slows one round of every candidate moves none of the medians."""
    median = statistics.median
    return ProfilePoint(points[0].batch_size, median(p.p50_ms for p in points), median(p.p90_ms for p in points),
                        median(p.throughput for p in points), sum(p.iterations for p in points),
                        all(p.stable for p in points))
