"""Choosing the winner among the verified, profiled candidates."""

from __future__ import annotations

from typing import Callable, Mapping, Optional, Sequence

from navdeploy.config import LatencyBudget, MaxThroughput, Strategy
from navdeploy.workspace.records import CandidateRecord, ProfilePoint


def _at_batch(profile: list[ProfilePoint], batch_size: Optional[int]) -> Optional[ProfilePoint]:
    """The measurement at ``batch_size``, else the nearest larger, else the largest one."""
    if not profile:
        return None
    if batch_size is None:
        return profile[0]
    sized = sorted(profile, key=lambda m: m.batch_size or 0)
    for m in sized:
        if (m.batch_size or 0) >= batch_size:
            return m
    return sized[-1]


# What routing a call to a runner costs on top of the runner itself (route lookup, staleness checks, output
# checks): a runner must beat eager by more than this at the captured batch, or eager (no routing at all) stays.
# It measured 18k instructions per call (callgrind; 63k before the route memo and the shared version counter), 2.6 us
# on the 2-core CPU machine (3-4 us under load), plus about 0.1 us per buffer (read one by one): bench_core.py.
ROUTING_COST_MS = 0.005


def call_ms(record: CandidateRecord, batch_size: Optional[int],
            batch_weights: Optional[Mapping[int, int]] = None) -> float:
    """A profiled candidate's median latency at ``batch_size``, or its mean per call over the ``batch_weights`` mix
    (captured calls per batch size) when the pipeline used several sizes."""
    if batch_weights:
        total = sum(batch_weights.values())
        return sum(n * _at_batch(record.profile, b).p50_ms for b, n in batch_weights.items()) / total
    return _at_batch(record.profile, batch_size).p50_ms


def select(candidates: Sequence[CandidateRecord], strategy: Strategy,
           batch_size: Optional[int], eager: Optional[str] = None,
           batch_weights: Optional[Mapping[int, int]] = None) -> Optional[CandidateRecord]:
    """The winning candidate record (``status == "ok"`` only), or None when none is correct.

    ``batch_size`` is the batch the pipeline used most, at which latency is compared; ``batch_weights`` (captured
    calls per batch size), when the pipeline used several, makes it the mean latency per call over that mix (a
    retrieval flow embedding 1 query and 8 documents per request runs both sizes). Under ``MinLatency`` a runner
    whose gain over ``eager`` (that candidate's name) is smaller than ``ROUTING_COST_MS`` loses to it: a call
    routed to it would cost more than the runner saves.
    """
    ok = [c for c in candidates if c.ok and c.profile]
    if not ok:
        return None

    def latency(c: CandidateRecord) -> float:
        return call_ms(c, batch_size, batch_weights)

    if isinstance(strategy, MaxThroughput):
        return max(ok, key=lambda c: max(m.throughput for m in c.profile))
    if isinstance(strategy, LatencyBudget):
        within = [(m.throughput, c) for c in ok for m in c.profile if m.p50_ms <= strategy.ms]
        if within:
            return max(within, key=lambda pair: pair[0])[1]
    best = min(ok, key=latency)
    baseline = next((c for c in ok if c.name == eager), None)
    if baseline is not None and best is not baseline and latency(best) > latency(baseline) - ROUTING_COST_MS:
        return baseline
    return best


def own_precision_fallback(candidates: Sequence[CandidateRecord], winner: Optional[CandidateRecord],
                           module_precision: str, strategy: Strategy, batch_size: Optional[int],
                           eager: Optional[str] = None,
                           batch_weights: Optional[Mapping[int, int]] = None) -> Optional[CandidateRecord]:
    """When ``winner`` runs in another precision than the module's own (a cast copy): the winner among the
    candidates in the module's own precision (``select`` over those), else None."""
    if winner is None or winner.precision_in(module_precision) == module_precision:
        return None
    own = [c for c in candidates if c.precision_in(module_precision) == module_precision]
    return select(own, strategy, batch_size, eager, batch_weights)


# A candidate in a lower precision than the module's own must beat the best candidate in the module's own
# precision by more than this to win: a tie is not worth its rounding (GPT-2's decode step on the H200: fp16
# 2.330 ms against fp32 2.333 ms, tokens identical either way, yet fp16 was selected).
PRECISION_MARGIN = 0.05


def prefer_own_precision(winner: Optional[CandidateRecord], fallback: Optional[CandidateRecord],
                         latency_ms: Callable[[CandidateRecord], float]) -> tuple[Optional[CandidateRecord],
                                                                               Optional[CandidateRecord]]:
    """(winner, fallback) as the graph keeps them: the own-precision ``fallback`` wins instead (and there is no
    fallback) when the low-precision ``winner`` is not faster than it by more than ``PRECISION_MARGIN``."""
    if winner is None or fallback is None or latency_ms(winner) * (1 + PRECISION_MARGIN) < latency_ms(fallback):
        return winner, fallback
    return fallback, None
