"""Fast unit tests of navdeploy.verify, navdeploy.select and navdeploy.profile."""

from __future__ import annotations

import math

import pytest
import torch

import navdeploy as nav
from navdeploy.candidates.profile import measure
from navdeploy.candidates.select import select
from navdeploy.candidates.verify import Comparison, compare, conform
from navdeploy.capture.graph import TensorSpec
from navdeploy.workspace.records import CandidateRecord, ProfilePoint

# --- verify.compare ---------------------------------------------------------------------------------------


def test_compare_within_tolerance():
    e = [torch.tensor([1.0, 2.0, -3.0]), torch.ones(2, 2)]
    a = [e[0] + 5e-5, e[1].clone()]
    result = compare(e, a, atol=1e-4, rtol=0.0, result=Comparison())
    assert result.ok and result.reason is None
    assert 4e-5 < result.max_abs_err < 6e-5
    assert result.max_rel_err > 0


def test_compare_rtol_scales_with_magnitude():
    e = [torch.tensor([1000.0])]
    assert compare(e, [torch.tensor([1000.5])], atol=0.0, rtol=1e-3, result=Comparison()).ok
    assert not compare(e, [torch.tensor([1002.0])], atol=0.0, rtol=1e-3, result=Comparison()).ok


@pytest.mark.parametrize("scale_atol", [False, True], ids=["fp32", "low precision"])
def test_an_output_smaller_than_atol_is_checked_against_its_own_magnitude(scale_atol):
    # A randomly initialised classifier's logits (~3e-5, below fp32's atol of 1e-4): zeros, or logits of the wrong
    # sign, passed the check; a correct runner's reordering error (~1e-6 of the magnitude) still passes.
    torch.manual_seed(0)
    logits = [torch.randn(4, 10) * 1e-5]
    atol, rtol = (1e-2, 1e-2) if scale_atol else (1e-4, 1e-3)
    for wrong in (torch.zeros(4, 10), -logits[0], logits[0].roll(1, dims=1)):
        result = compare(logits, [wrong], atol=atol, rtol=rtol, result=Comparison(), scale_atol=scale_atol)
        assert not result.ok and "atol scaled to the output's largest magnitude" in result.reason
    close = logits[0] * (1 + 1e-6)
    assert compare(logits, [close], atol=atol, rtol=rtol, result=Comparison(), scale_atol=scale_atol).ok
    # An output of ordinary size keeps the plain atol (an all-zero output too: there is no magnitude to scale by).
    assert compare([torch.ones(3)], [torch.ones(3) + 5e-5], atol=1e-4, rtol=0.0, result=Comparison()).ok
    assert compare([torch.zeros(3)], [torch.full((3,), 5e-5)], atol=1e-4, rtol=0.0, result=Comparison()).ok


def test_compare_beyond_tolerance_reports_max_abs_error():
    e = [torch.zeros(3), torch.zeros(4)]
    a = [torch.zeros(3), torch.tensor([0.0, 0.5, -0.25, 0.0])]
    result = compare(e, a, atol=1e-3, rtol=1e-3, result=Comparison(), where="sample 2: ")
    assert not result.ok
    assert result.max_abs_err == pytest.approx(0.5)
    assert result.reason.startswith("sample 2: output 1")
    assert "max abs error 0.5" in result.reason and "atol=0.001" in result.reason


def test_compare_accumulates_over_samples_and_keeps_first_reason():
    result = Comparison()
    compare([torch.zeros(1)], [torch.ones(1)], 1e-4, 0, result, where="s0: ")
    compare([torch.zeros(1)], [torch.full((1,), 3.0)], 1e-4, 0, result, where="s1: ")
    compare([torch.zeros(1)], [torch.zeros(1)], 1e-4, 0, result, where="s2: ")
    assert not result.ok and result.reason.startswith("s0: ")
    assert result.max_abs_err == pytest.approx(3.0)


def test_compare_shape_mismatch():
    result = compare([torch.zeros(2, 3)], [torch.zeros(3, 2)], 1.0, 1.0, Comparison())
    assert not result.ok and "shape (3, 2) differs from eager (2, 3)" in result.reason


def test_compare_output_count_mismatch():
    result = compare([torch.zeros(1), torch.zeros(1)], [torch.zeros(1)], 1.0, 1.0, Comparison())
    assert not result.ok and "returned 1 outputs, eager returned 2" in result.reason


def test_compare_non_finite():
    e = [torch.tensor([1.0, 2.0])]
    bad = compare(e, [torch.tensor([1.0, float("nan")])], 1.0, 1.0, Comparison())
    assert not bad.ok and "non-finite" in bad.reason
    inf = compare(e, [torch.tensor([1.0, float("inf")])], 1.0, 1.0, Comparison())
    assert not inf.ok
    same = [torch.tensor([1.0, float("nan"), float("inf")])]
    assert compare(same, [same[0].clone()], 1e-6, 0, Comparison()).ok  # matching non-finite values are fine


def test_compare_integer_and_empty_outputs():
    assert compare([torch.arange(5)], [torch.arange(5)], 0, 0, Comparison()).ok
    assert not compare([torch.arange(5)], [torch.arange(5) + 1], 0, 0, Comparison()).ok
    assert compare([torch.zeros(0, 3)], [torch.zeros(0, 3)], 0, 0, Comparison()).ok


def test_compare_verify_func():
    e, a = [torch.ones(2)], [torch.ones(2)]
    calls = []

    def vf(expected, actual):
        calls.append((expected, actual))
        return False

    result = compare(e, a, 1.0, 1.0, Comparison(), verify_func=vf)
    assert not result.ok and "verify_func returned False" in result.reason
    assert calls and calls[0][0] is e and calls[0][1] is a
    assert compare(e, a, 1.0, 1.0, Comparison(), verify_func=lambda x, y: True).ok


def test_conform_casts_dtype():
    spec = TensorSpec("float32", "cpu", [2], [2], [2])
    half = torch.tensor([1.5, -2.0], dtype=torch.float16)
    (out,) = conform([half], [spec])
    assert out.dtype == torch.float32 and torch.equal(out, torch.tensor([1.5, -2.0]))
    same = torch.ones(2)
    assert conform([same], [spec])[0] is same  # no copy when it already matches
    int_spec = TensorSpec("int64", "cpu", [2], [2], [2])
    assert conform([torch.tensor([1, 2], dtype=torch.int32)], [int_spec])[0].dtype == torch.int64


# --- select ---------------------------------------------------------------------------------------------

def rec(runner, rows, status="ok"):
    return CandidateRecord(runner, runner, "torch", "fp32", "cpu", status=status,
                           profile=[ProfilePoint(b, p50, p50 * 1.2, tp) for b, p50, tp in rows])


# A: fastest at batch 1; B: fastest at batch 8 and the highest throughput; C: failed but "fastest".
A = rec("A", [(1, 1.0, 1000.0), (8, 6.0, 1333.0)])
B = rec("B", [(1, 2.0, 500.0), (8, 4.0, 2000.0)])
C = rec("C", [(1, 0.1, 10000.0), (8, 0.2, 40000.0)], status="failed")
ALL = [A, B, C]


def test_min_latency_at_captured_batch():
    assert select(ALL, nav.MinLatency(), batch_size=1).runner == "A"
    assert select(ALL, nav.MinLatency(), batch_size=8).runner == "B"
    assert select(ALL, nav.MinLatency(), batch_size=5).runner == "B"  # nearest larger measured batch
    assert select(ALL, nav.MinLatency(), batch_size=64).runner == "B"  # largest measured batch
    assert select(ALL, nav.MinLatency(), batch_size=None).runner == "A"  # first measurement


def test_min_latency_over_the_captured_batch_mix():
    # A: 1.0 ms at 1, 6.0 at 8; B: 2.0 and 4.0. One call of each size: A 3.5 ms a call on average, B 3.0.
    assert select(ALL, nav.MinLatency(), batch_size=1, batch_weights={1: 1, 8: 1}).runner == "B"
    assert select(ALL, nav.MinLatency(), batch_size=1, batch_weights={1: 3, 8: 1}).runner == "A"  # 2.25 vs 2.5
    assert select(ALL, nav.MinLatency(), batch_size=1, batch_weights=None).runner == "A"


def test_max_throughput():
    assert select(ALL, nav.MaxThroughput(), batch_size=1).runner == "B"


def test_latency_budget():
    assert select(ALL, nav.LatencyBudget(5.0), batch_size=1).runner == "B"  # B@8 in budget: 2000/s
    assert select(ALL, nav.LatencyBudget(3.0), batch_size=1).runner == "A"  # only batch 1 fits: A 1000/s
    # nothing meets the budget: falls back to min latency
    assert select(ALL, nav.LatencyBudget(0.5), batch_size=8).runner == "B"
    assert select(ALL, nav.LatencyBudget(0.5), batch_size=1).runner == "A"


@pytest.mark.parametrize("strategy", [nav.MinLatency(), nav.MaxThroughput(), nav.LatencyBudget(100.0)])
def test_failed_candidates_never_selected(strategy):
    for status in ("failed", "timeout", "incorrect", "error"):
        cands = [rec("X", [(1, 0.01, 1e6)], status=status), rec("Y", [(1, 9.0, 1.0)])]
        assert select(cands, strategy, batch_size=1).runner == "Y"


@pytest.mark.parametrize("strategy", [nav.MinLatency(), nav.MaxThroughput(), nav.LatencyBudget(100.0)])
def test_none_when_no_candidate_ok(strategy):
    assert select([], strategy, 1) is None
    assert select([C, rec("D", [(1, 1.0, 1.0)], status="failed")], strategy, 1) is None
    assert select([rec("E", [])], strategy, 1) is None


def test_non_batching_profile():
    cands = [rec("A", [(None, 2.0, 500.0)]), rec("B", [(None, 1.0, 1000.0)])]
    assert select(cands, nav.MinLatency(), None).runner == "B"
    assert select(cands, nav.MinLatency(), 1).runner == "B"


# --- profile.measure ------------------------------------------------------------------------------------

def test_measure_tiny_function():
    x = torch.randn(16, 16)
    calls = []

    def run():
        calls.append(1)
        return x @ x

    m = measure(run, batch_size=4, device="cpu", time_budget_s=0.1)
    assert m.batch_size == 4
    assert m.iterations >= 3 and len(calls) >= m.iterations + 2  # warm-up calls are not counted
    assert 0 < m.p50_ms <= m.p90_ms < 100
    assert math.isfinite(m.throughput) and m.throughput > 0
    # throughput is batch / mean latency, so it is in the same ballpark as batch / p50
    assert 0.05 < m.throughput / (4 / (m.p50_ms / 1e3)) < 20
    assert isinstance(m.stable, bool)


def test_measure_respects_budget_and_no_batch():
    import time

    start = time.perf_counter()
    m = measure(lambda: sum(range(100)), batch_size=None, device="cpu", time_budget_s=0.05)
    assert time.perf_counter() - start < 2.0
    assert m.batch_size is None and m.throughput > 0 and m.p50_ms > 0


def test_a_slow_candidate_is_timed_on_at_least_ten_calls_after_its_warm_up():
    """Windows of one call each that agree are luck: a candidate is ranked on ten timed calls or more."""
    import time

    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.01)

    m = measure(slow, batch_size=1, device="cpu", time_budget_s=0.02)  # windows of 5 ms: one call each
    assert m.iterations >= 10 and len(calls) >= m.iterations + 2


def test_a_round_of_a_profile_in_turns_rests_on_its_share_of_the_calls():
    """A leader profiled in PROFILE_ROUNDS rounds needs ROUND_MIN_CALLS a round, not ten: together the rounds rest
    on as many calls as one profile, and a slow call does not pay the floor once per round."""
    import time

    from navdeploy.candidates.profile import MIN_CALLS
    from navdeploy.optimize.module import PROFILE_ROUNDS, ROUND_MIN_CALLS

    assert PROFILE_ROUNDS * ROUND_MIN_CALLS >= MIN_CALLS > PROFILE_ROUNDS * (ROUND_MIN_CALLS - 1)
    calls = []

    def slow():
        calls.append(1)
        time.sleep(0.02)

    m = measure(slow, batch_size=1, device="cpu", time_budget_s=0.02, min_calls=ROUND_MIN_CALLS)
    assert ROUND_MIN_CALLS <= m.iterations < MIN_CALLS and len(calls) < MIN_CALLS, (m, len(calls))


def test_a_candidate_too_slow_for_ten_calls_is_flagged_not_stable():
    import time

    m = measure(lambda: time.sleep(0.05), batch_size=1, device="cpu", time_budget_s=0.01)  # 10x budget: ~2 calls
    assert m.iterations < 10 and not m.stable


def test_a_gain_smaller_than_the_routing_cost_keeps_eager():
    from navdeploy.candidates.select import ROUTING_COST_MS

    eager = rec("TorchCPU", [(1, 0.100, 10000.0)])
    barely = rec("OnnxCPU", [(1, 0.100 - ROUTING_COST_MS / 2, 10500.0)])  # faster, but by less than routing costs
    clearly = rec("TorchScriptCPU", [(1, 0.100 - 2 * ROUTING_COST_MS, 16000.0)])
    assert select([eager, barely], nav.MinLatency(), batch_size=1, eager="TorchCPU") is eager
    assert select([eager, barely, clearly], nav.MinLatency(), batch_size=1, eager="TorchCPU") is clearly
    assert select([eager, barely], nav.MinLatency(), batch_size=1) is barely  # no baseline named: plain minimum


def test_windows_that_never_agree_are_read_from_the_quietest_ones(monkeypatch):
    """A busy machine: after two quiet windows every window is slowed by bursts of another process, by a varying
    amount, so no three agree. The figure is the candidate's quiet cost, not the bursts' (the last windows')."""
    from navdeploy.candidates import profile

    scales = iter([1, 2, 3] * 10_000)  # each window's bursts are another size: no three windows agree
    windows = iter([[0.001] * 6, [0.001] * 6])

    def window(run, window_s):
        scale = next(scales)
        return next(windows, None) or [0.001, 0.05 * scale, 0.09 * scale, 0.13 * scale]

    monkeypatch.setattr(profile, "_window_cpu", window)
    m = profile.measure(lambda: None, batch_size=1, device="cpu", time_budget_s=0.01)
    assert not m.stable
    assert m.p50_ms == pytest.approx(1.0) and m.iterations >= 10, m
