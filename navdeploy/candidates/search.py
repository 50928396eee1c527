"""The search policy: which candidates are built, in what order, and which are profiled in full.

Every default candidate that can run here is built and verified, the likely winners first (each runner's
``search_rank``). Every candidate, eager (the baseline) included, is first *screened*: timed on a few calls
(``SCREEN_SHARE`` of ``profile_time_s``) at the batch size the strategy compares candidates at. Once all are
screened, only the leaders (a screen within ``SCREEN_MARGIN`` of the best one) get the full profile, with its
stability rules (``profile.measure``); the others keep their screen figure, status "screened", and the reason.
Selection picks among fully profiled candidates only. Eager is a leader also when the best one beats it by no more
than a routed call costs (``select.ROUTING_COST_MS``): selection keeps eager then. Eager is screened first, alone,
before any build. Its full profile at every batch size is a timing no build may overlap (1.1 s of the example CNN's
12 s on the 2-core machine): it is taken only where eager may win.

A runner whose kernels are another runner's (``twin_of``: torch.compile's Python wrapper and guards around the
kernels AOTInductor compiles ahead of time; on CUDA also torch.compile's kernels without the CUDA-graph replay of
TorchCompileCUDAGraphs) is not built when one of those runners verified: it could win only by its wrapper being
faster than none, or launching kernels one by one being faster than replaying them as a graph. It is built when
they failed or are not tried.

Follow-up precisions (``precision.follow_up_precisions``: bf16 on a CPU that computes it, for an fp32 module) are
tried after that search, for a graph whose best build still takes ``FOLLOW_UP_MIN_MS`` or more a call, or any
graph of a module whose matmuls are wide (``precision.follow_up_min_ms``): the copies
of the runners that verified (those with ``follows_up``), screened and profiled as above, and selected among all.
Eager's copy comes first; when it is clearly slower than eager in the module's own precision, the other copies are
not built (``low_precision_skip_reason``): the precision's kernels do not pay on that graph here. Eager and its copy
are screened in turns for that decision, each runner loaded and verified once in the worker that times them
(``Task.rounds``). Where the copies are known to be tried before any build (below), eager's copy being clearly
*faster* decides the other way too: each of the module's own builds whose copy verified is not built
(``own_precision_skip_reason``; its copy stands for it, and it waits for that copy, to be built when the copy fails).

Where a spare worker is free (a CPU module optimized alone whose copies are not known to be tried yet), the
candidates are built on both workers and screened only once every build is done (``optimize.module``'s
``builds_first``): a screen waits for the builds in flight, so a chain that screens as it goes holds its next
build behind the other worker's longest one. Where eager's screen shows that the copies will be tried, eager's copy
is screened (in turns with eager) right after eager, while nothing builds, and then every build, the module's own
and the copies (``early_follow_up_pairs``), goes the same way on both workers, the likely winners first; a build
that eager's copy does not predict (``precision.eager_copy_predicts``) is built whatever it measured. A CPU module
optimized beside others does the same on its one worker, for its own candidates and then for its follow-up copies:
its screens would otherwise wait for the other modules' builds, one screen at a time. Eager and, where the copies
will be tried, eager's copy in turns with it are timed first, in one hold of the timing gate, before any build of
the module: every module beside it does the same, so all these timings come before the first build of any (asked
for later, they would wait out the other modules' builds while this worker idles).

A runner that runs eager's kernels uncompiled (``runs_eager_kernels``: the ExportedProgram, 0.74-1.35x eager's time
and never selected in the bench's pipelines) is not built once a verified candidate in its precision gives a
Python-backend Triton model an artifact to load (``eager_kernels_skip_reason``); it is built where none does, or
when named in ``runners=``.

``LatencyBudget`` compares candidates at every batch size, so under it every candidate is profiled in full.
``thorough=True`` restores the exhaustive search: every candidate built and profiled in full.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Mapping, Optional, Sequence

from navdeploy.candidates.precision import EARLY_FOLLOW_UP_FACTOR, FOLLOW_UP_MIN_MS
from navdeploy.candidates.select import ROUTING_COST_MS
from navdeploy.config import LatencyBudget, MaxThroughput, Strategy
from navdeploy.formats.base import RunnerSpec
from navdeploy.workspace.records import CandidateRecord

# A screen this much slower than the best screen cannot win: screens over a tenth of a second differ by a few
# percent from run to run on a quiet machine; the margin leaves room for that and for a busy one (at a load of 8
# on 2 cores two candidates' figures swapped by 19% between a quick and a thorough run).
SCREEN_MARGIN = 0.20
# The share of profile_time_s (the budget per batch size of a full profile) a screen may take.
SCREEN_SHARE = 0.2
# A screen at most this much slower than the best one is taken once more, seconds later, before the leaders are
# chosen; the faster of its two screens counts. The 2-core machine has bursts of seconds in which every call runs
# ~1.35x slower: a frozen bf16 BERT package that runs at 0.78x its fp32 package side by side read 26% and 23% slower
# in two screens that fell in one, and was screened out.
RECHECK_MARGIN = 0.60


def early_screen_rechecked(eager_ms: float, min_ms: float) -> bool:
    """Whether eager's one screen says a graph's follow-up copies are tried early (``precision.follow_ups_early``:
    eager at ``EARLY_FOLLOW_UP_FACTOR`` x ``min_ms`` or more) by no more than ``RECHECK_MARGIN``, which a burst
    can make: its second screen decides, the faster counting. A burst only slows calls, so a screen under the bar
    is not taken again. On the bench's GPT-2 with its cache, the decode graph's eager read 2.99 ms in its screen
    and 1.87 ms in the screens in turns that followed: its bf16 copies (AOTInductor's: a 13 s build) were built
    beside, and lost (0.60 against 0.35 ms)."""
    bar = EARLY_FOLLOW_UP_FACTOR * min_ms
    return min_ms > 0 and bar <= eager_ms <= bar * (1 + RECHECK_MARGIN)


def screen_time_s(profile_time_s: float) -> float:
    """The time budget of one screen."""
    return max(profile_time_s * SCREEN_SHARE, 0.02)


@dataclass(frozen=True)
class Search:
    """How one graph's candidates are searched.

    ``screens``: candidates are screened first and only the leaders profiled in full (False: thorough, or a
    strategy that compares every batch size). ``batch``: the batch size candidates are screened and compared at
    (None when the graph does not batch)."""

    thorough: bool
    screens: bool
    batch: Optional[int]

    def plan(self) -> str:
        """What a candidate's task does after it verifies: ``full`` (profile every batch size) or ``screen``."""
        return "screen" if self.screens else "full"

    def _timed(self, records: Iterable[CandidateRecord]) -> list[tuple[float, CandidateRecord]]:
        """The verified candidates with a screen (else a full profile) at ``batch``, and that figure."""
        timed = [(r.screen_ms(self.batch), r) for r in records if r.verified]
        return [(ms, r) for ms, r in timed if ms is not None]

    def leaders(self, records: Iterable[CandidateRecord], baseline: Optional[str] = None) -> list[CandidateRecord]:
        """The verified candidates whose screen is within ``SCREEN_MARGIN`` of the best one, and ``baseline`` (eager's
        name) when the best one beats it by less than that margin plus ``ROUTING_COST_MS``: selection keeps eager
        over a runner that saves less than routing a call to it costs, and compares only full profiles."""
        timed = self._timed(records)
        if not timed:
            return []
        best = min(ms for ms, _ in timed)
        return [r for ms, r in timed
                if ms <= best * (1 + SCREEN_MARGIN) + (ROUTING_COST_MS if r.name == baseline else 0.0)]

    def rechecks(self, records: Iterable[CandidateRecord]) -> list[CandidateRecord]:
        """The screened candidates of this run whose screen missed ``SCREEN_MARGIN`` of the best one by no more
        than ``RECHECK_MARGIN``: worth a second screen (a screen cached by an earlier run is not taken again)."""
        timed = self._timed(records)
        if not timed:
            return []
        best = min(ms for ms, _ in timed)
        return [r for ms, r in timed if r.status == "screened" and not r.cached
                and best * (1 + SCREEN_MARGIN) < ms <= best * (1 + RECHECK_MARGIN)]

    def keep_below_ms(self, records: Iterable[CandidateRecord]) -> Optional[float]:
        """The screen under which a worker keeps a candidate's runner loaded for its full profile."""
        timed = self._timed(records)
        return min(ms for ms, _ in timed) * (1 + SCREEN_MARGIN) if timed else None

    def screened_reason(self, record: CandidateRecord, records: Iterable[CandidateRecord]) -> str:
        """Why a screened candidate was not profiled in full: how far its screen was from the best one."""
        ms, best = min(self._timed(records), key=lambda pair: pair[0])
        mine = record.screen_ms(self.batch) or 0.0
        at = f"batch {self.batch}" if self.batch is not None else "its captured input"
        calls = f" over {record.screen.iterations} calls" if record.screen is not None else ""
        return (f"screened out: p50 {mine:.3f} ms at {at}{calls}, {100 * (mine / ms - 1):.0f}% slower than "
                f"{best.name} ({ms:.3f} ms); only candidates within {100 * SCREEN_MARGIN:.0f}% of the best are "
                "profiled in full (thorough=True profiles every one)")


def graph_search(strategy: Strategy, thorough: bool, batching: bool, captured_batch: Optional[int],
                 batch_sizes: Sequence[int]) -> Search:
    """The search of one graph: screening at the batch size its strategy compares candidates at (MinLatency: the
    profiled size selection reads for the captured batch; MaxThroughput: the largest profiled size)."""
    if not batching:
        return Search(thorough, not thorough and not isinstance(strategy, LatencyBudget), None)
    sizes = sorted(batch_sizes)
    if isinstance(strategy, MaxThroughput):
        batch = sizes[-1]
    else:
        batch = next((b for b in sizes if b >= (captured_batch or 1)), sizes[-1])
    return Search(thorough, not thorough and not isinstance(strategy, LatencyBudget), batch)


def search_order(pairs: Sequence[tuple[RunnerSpec, str]]) -> list[tuple[RunnerSpec, str]]:
    """Candidates in the order the search builds them: the baseline (first in ``pairs``) first, then by each
    runner's ``search_rank`` (the likely winners first; a runner with a ``twin_of`` after its twin)."""
    first, rest = pairs[0], list(pairs[1:])
    return [first] + sorted(rest, key=lambda pair: pair[0].search_rank)


def twin_skip_reason(runner: RunnerSpec, twins: Sequence[Optional[CandidateRecord]], search: Search) -> Optional[str]:
    """Why ``runner`` is not built (``twins``: the records of its ``twin_of`` runners in the same precision, None for
    those that have not run), or None when it is."""
    twin = next((t for t in twins if t is not None and t.verified), None)
    if search.thorough or not runner.twin_of or twin is None:
        return None
    verb = "fails" if len(runner.twin_of) == 1 else "fail"
    return (f"not built: {twin.name} verified, and {runner.name} runs the same kernels (the search builds it when "
            f"{' and '.join(runner.twin_of)} {verb}; thorough=True builds it)")


def eager_kernels_skip_reason(runner: RunnerSpec, loadable: Optional[CandidateRecord], search: Search,
                              named: bool) -> Optional[str]:
    """Why ``runner``, which runs eager's kernels uncompiled (``runs_eager_kernels``: the ExportedProgram), is not
    built, or None when it is. ``loadable``: a verified candidate in the same precision whose artifact a
    Python-backend Triton model loads (ONNX, TorchScript, AOTInductor), or None; ``named``: the user named the
    runner in ``runners=``. Its calls take eager's time give or take its graph's Python overhead (0.74-1.35x
    eager's in the bench's full profiles), so it does not win; what it is still needed for is the artifact of a
    Python-backend model where nothing else gives one, so it is built then, when named, and when thorough."""
    if search.thorough or named or not runner.runs_eager_kernels or loadable is None:
        return None
    return (f"not built: it runs eager's kernels uncompiled, and {loadable.name}'s artifact serves a Python-backend "
            "Triton model (naming it in runners= or thorough=True builds it)")


# How much slower than eager in the module's own precision eager's low-precision copy must be before the other
# copies are skipped; both are screened in turns first (the module's ``eager_copy_in_turns``). Screened so, eager
# bf16 read 7-8% slower than fp32 on the SD UNet in four runs, where AOTInductor bf16 lost to the best fp32 build by
# 10-50% whenever it was built; on the SD VAE it read 17-21% faster, and AOTInductor bf16 won. Eager's own full
# profile from the start of the run, used before, moved by 40% between runs (5.0-7.0 ms at batch 2 on the UNet).
LOW_PRECISION_SKIP_MARGIN = 0.03


def low_precision_skip_reason(runner: RunnerSpec, eager: Optional[CandidateRecord],
                              eager_here: Optional[CandidateRecord], search: Search,
                              predicted: bool = True) -> Optional[str]:
    """Why a follow-up precision's copy of ``runner`` is not built (``eager``: eager in the module's own precision;
    ``eager_here``: eager in the follow-up precision, built first), or None when it is.

    Eager in that precision ``LOW_PRECISION_SKIP_MARGIN`` or more slower than in the module's own means the
    precision's kernels (oneDNN's bf16 matmuls and convolutions, which the compiled runners call too) do not pay on
    this graph here: its copies could win only by their own fusions. On the SD UNet eager bf16 was 12-24% slower
    than fp32 and AOTInductor bf16 16% slower than AOTInductor fp32, a 14 s build for nothing; where eager bf16 was
    faster (ViT, VAE, MiniLM), the compiled bf16 copies were faster too. Thorough builds them all.

    ``predicted=False``: eager's copy says nothing about this one (``precision.eager_copy_predicts``), which is
    built whatever eager's copy measured."""
    if search.thorough or not predicted or eager is None or eager_here is None or runner.name == eager_here.runner:
        return None
    own, here = eager.screen_ms(search.batch), eager_here.screen_ms(search.batch)
    if not eager_here.verified or own is None or here is None or here < own * (1 + LOW_PRECISION_SKIP_MARGIN):
        return None
    at = f"batch {search.batch}" if search.batch is not None else "its captured input"
    return (f"not built: {eager_here.name} was {100 * (here / own - 1):.0f}% slower than {eager.name} ({here:.3f} "
            f"against {own:.3f} ms at {at}), so {eager_here.precision} kernels do not pay on this graph here "
            "(thorough=True builds it)")


# How much faster than eager in the module's own precision eager's low-precision copy must be, screened in turns,
# before the module's own builds whose copies verified are skipped. Where eager's bf16 copy ran 15-71% faster than
# eager fp32 on the 2-core CPU machine (ViT 15%, SD VAE 17-21% in turns, ResNet-18 36%, MiniLM 71%), AOTInductor
# bf16 beat AOTInductor fp32 by 33-87% (pipelines_cpu_session31.json); where it ran slower (GPT-2, BERT, SD UNet),
# the fp32 builds were kept anyway. The fp32 build of such a graph costs as long as its copy (MiniLM's 18 s) to lose.
# Not lower: the compiled copies do gain more from bf16 than eager's copy (benchmarks/bf16_copy_check.py: the SD VAE
# 0.88 in eager, 0.62 in AOTInductor), but eager's ratio in turns is noisy from minute to minute (the VAE's 0.51-1.04
# in 17 runs, the SD UNet's 0.89-1.24), and at margin 0 the UNet's fp32 builds were skipped once in 17 (eager bf16 11%
# faster), while its AOTInductor bf16 build runs 1.27-1.40x slower than its fp32 one: the pick lost ~30%
# (own_precision_margin_session33.txt).
OWN_PRECISION_SKIP_MARGIN = 0.13


def copy_clearly_faster(eager: Optional[CandidateRecord], eager_here: Optional[CandidateRecord],
                        search: Search) -> bool:
    """Whether eager's copy in a follow-up precision (``eager_here``) ran ``OWN_PRECISION_SKIP_MARGIN`` or more
    faster than eager in the module's own precision (``eager``), both screened in turns: the copies of the module's
    own builds then stand for them (``own_precision_skip_reason``). Never when thorough."""
    if search.thorough or eager is None or eager_here is None or not eager_here.verified:
        return False
    own, here = eager.screen_ms(search.batch), eager_here.screen_ms(search.batch)
    return own is not None and here is not None and here <= own * (1 - OWN_PRECISION_SKIP_MARGIN)


def own_precision_skip_reason(runner: RunnerSpec, copy: Optional[CandidateRecord], eager: Optional[CandidateRecord],
                              eager_here: Optional[CandidateRecord], search: Search) -> Optional[str]:
    """Why ``runner``, in the module's own precision, is not built, or None when it is: eager's copy in a follow-up
    precision ran clearly faster than eager (``copy_clearly_faster``), and ``copy`` (this runner's build in that
    precision, or its twin's) verified. That precision's kernels pay on this graph here, so the copy is expected to
    beat this build (``OWN_PRECISION_SKIP_MARGIN`` says on what evidence). Built when the copy failed, when thorough,
    and for eager itself."""
    if copy is None or not copy.verified or eager is None or runner.name == eager.runner or \
            not copy_clearly_faster(eager, eager_here, search):
        return None
    own, here = eager.screen_ms(search.batch), eager_here.screen_ms(search.batch)
    at = f"batch {search.batch}" if search.batch is not None else "its captured input"
    return (f"not built: {eager_here.name} was {100 * (1 - here / own):.0f}% faster than {eager.name} ({here:.3f} "
            f"against {own:.3f} ms at {at}), so {eager_here.precision} kernels pay on this graph here, and "
            f"{copy.name} verified (the search builds it when {copy.name} fails; thorough=True builds it)")


def early_follow_up_pairs(pairs: Sequence[tuple[RunnerSpec, str]], precisions: Sequence[str],
                          builds_first: Callable[[RunnerSpec, str], bool]) -> list[tuple[RunnerSpec, str]]:
    """The follow-up candidates tried beside the module's own ones, decided before their builds: each runner that
    ``follows_up``, in each of ``precisions``. Those for which ``builds_first`` holds come first (a copy whose build
    does not wait for eager's copy to be timed: ``precision.eager_copy_predicts``), so the chain starts with a build
    that overlaps the module's own builds rather than with a timing that waits for them; the order is kept within
    each group (a runner's ``twin_of`` stays before it)."""
    extra = _copies([runner for runner, _ in pairs if runner.follows_up], precisions, pairs)

    def later(pair: tuple[RunnerSpec, str]) -> bool:  # a twin's copy goes no earlier than its twin's
        runner, precision = pair
        return not builds_first(runner, precision) or any(
            later(other) for other in extra if other[1] == precision and other[0].name in runner.twin_of)

    return sorted(extra, key=later)


def follow_up_pairs(pairs: Sequence[tuple[RunnerSpec, str]], records: Mapping[int, CandidateRecord],
                    precisions: Sequence[str], best_ms: Optional[float],
                    min_ms: float = FOLLOW_UP_MIN_MS) -> list[tuple[RunnerSpec, str]]:
    """The candidates tried after the search in the module's own precision (``records``, by place in ``pairs``):
    each runner that ``follows_up`` and verified there, or was not built only because a twin verified (its copy
    is built when the twin's copy fails: ``twin_skip_reason``), in each of ``precisions``, when the graph's best
    build (``best_ms`` a call; None when nothing won) takes ``min_ms`` or more (``precision.follow_up_min_ms``);
    none otherwise."""
    if not precisions or best_ms is None or best_ms < min_ms:
        return []

    def twin_verified(i: int) -> bool:
        runner, precision = pairs[i]
        return records[i].status == "skipped" and any(
            records[j].verified for j in records if pairs[j][0].name in runner.twin_of and pairs[j][1] == precision)

    return _copies([pairs[i][0] for i in sorted(records)
                    if pairs[i][0].follows_up and (records[i].verified or twin_verified(i))], precisions, pairs)


def _copies(runners: Sequence[RunnerSpec], precisions: Sequence[str],
            pairs: Sequence[tuple[RunnerSpec, str]]) -> list[tuple[RunnerSpec, str]]:
    """Each of ``runners`` in each of ``precisions``, precision by precision, once, and not already in ``pairs``."""
    return list(dict.fromkeys((runner, p) for p in precisions for runner in runners if (runner, p) not in pairs))
