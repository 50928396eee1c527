"""The pipeline check after the swap: the whole callable, eager against optimized, in this process; a module
whose runner makes the pipeline no faster goes back to eager, and stays eager after load_optimized."""

from __future__ import annotations

import torch

import navdeploy as nav
from navdeploy.inplace.binding import bind
from navdeploy.optimize.never_slower import check_pipeline
from navdeploy.optimize.status import PipelineTiming
from navdeploy.report.console import pipeline_lines
from navdeploy.workspace.manifest import read_manifest


def test_a_runner_that_makes_the_pipeline_no_faster_goes_back_to_eager(tmp_path, choose_candidate):
    torch.manual_seed(0)
    module = nav.Module(torch.nn.Linear(4, 4).eval(), name="check_slow")
    config = nav.OptimizeConfig(runners=("TorchExportCPU",), batch_sizes=(1,), max_batch_size=1,
                                profile_time_s=0.02, workspace=tmp_path, use_multiprocessing=False,
                                pipeline_repeats=0)  # the check below runs on its own
    x = torch.randn(1, 4)

    def pipeline(x):
        for _ in range(200):  # many calls a pass: a tiny Linear through an ExportedProgram costs more than eager
            y = module(x)
        return y

    with torch.no_grad():
        nav.optimize(pipeline, [(1, x), (1, x)], config=config)
    choose_candidate(module, tmp_path, "TorchExportCPU")  # a runner no faster than eager for this module
    timing = check_pipeline(pipeline, [(1, x), (1, x)], [module], {module.name: tmp_path / module.name},
                            repeats=5, capture_s=0.0, items_timed=1)
    assert timing.error is None
    assert list(timing.reverted) == [module.name] and "not faster than eager" in timing.reverted[module.name]
    assert not module.is_optimized and module.nav_state.bound  # bound, as eager
    assert len(timing.eager_runs) == len(timing.optimized_runs) in (5, 10)  # 10: timed again when unsure
    # Every module is eager now: the verdict says so, and the figures are those that led to the revert (eager
    # timed against eager again would be a ratio of noise, printed as "faster").
    assert timing.faster is False
    assert f"{timing.optimized_s * 1e3:.2f} ms" in timing.reverted[module.name]
    assert "not faster beyond noise: as eager" in pipeline_lines(timing)[0]
    manifest = read_manifest(tmp_path / module.name)
    assert manifest.reverted == timing.reverted[module.name]
    assert bind(module, tmp_path / module.name) and not module.is_optimized  # a fresh process keeps it eager
    with torch.no_grad():
        torch.testing.assert_close(module(x), module.__wrapped__(x))


def test_when_eager_wins_every_graph_the_pipeline_is_not_timed_against_itself(tmp_path):
    """Eager against eager is a ratio of noise (a 9.10x "faster" was seen): nothing is timed, and the console says
    why instead of a ratio."""
    torch.manual_seed(0)
    module = nav.Module(torch.nn.Linear(4, 4).eval(), name="check_all_eager")
    config = nav.OptimizeConfig(runners=("TorchCPU",), batch_sizes=(1,), max_batch_size=1, profile_time_s=0.02,
                                workspace=tmp_path, use_multiprocessing=False)
    x = torch.randn(1, 4)
    with torch.no_grad():
        status = nav.optimize(module, [(1, x), (1, x), (1, x)], config=config)
    assert not module.is_optimized and status.modules[module.name].graphs[0].selected == "TorchCPU"
    timing = status.pipeline
    assert timing is not None and timing.faster is False and timing.error is None
    assert timing.optimized_s is None and not timing.eager_runs and not timing.optimized_runs
    assert timing.speedup is None
    assert pipeline_lines(timing)[0] == "pipeline end to end: not timed, every module runs eagerly"


def test_pipeline_timing_round_trips_through_json():
    timing = PipelineTiming(0.5, 0.01, 0.005, 2, {"a": 0.004}, {"a": 0.002}, None, 5, [0.01] * 5, [0.005] * 5,
                            True, {"b": "why"}, 1)
    assert PipelineTiming.from_json(timing.to_json()) == timing
    old = {"capture_s": 0.5, "eager_s": 0.01, "optimized_s": 0.005, "items_timed": 2}  # a report of an earlier version
    assert PipelineTiming.from_json(old).repeats == 0


def test_in_use_says_eager_for_a_reverted_module_while_selected_keeps_the_winner(tmp_path):
    from navdeploy.optimize.status import GraphStatus, ModuleStatus, OptimizeStatus
    from navdeploy.workspace.records import CandidateRecord

    def module(name: str, selected: str, reverted=None) -> ModuleStatus:
        records = [CandidateRecord(r, r, "torch", "fp32", "cpu", "ok") for r in ("TorchCPU", "OnnxCPU")]
        return ModuleStatus(name, tmp_path, "cpu", [GraphStatus("g", selected, records, True)], reverted is None,
                            1.0, reverted=reverted)

    status = OptimizeStatus(modules={"kept": module("kept", "OnnxCPU"), "eager_won": module("eager_won", "TorchCPU"),
                                     "back": module("back", "OnnxCPU", reverted="not faster")})
    assert status.selected() == {"kept": ["OnnxCPU"], "eager_won": ["TorchCPU"], "back": ["OnnxCPU"]}
    assert status.in_use() == {"kept": ["OnnxCPU"], "eager_won": ["eager"], "back": ["eager"]}


def _scripted(eager_ms: list[float], optimized_ms: list[float], warm_passes: int = 2):
    """A callable whose passes sleep as scripted: ``compare`` runs the warm-up passes, then eager and optimized
    passes alternating (eager first), one call a pass with one item."""
    import time

    order = [0.0] * warm_passes + [ms for pair in zip(eager_ms, optimized_ms) for ms in pair]
    calls = iter(order)

    def pipeline(x):
        time.sleep(next(calls, 0.0) / 1e3)
        return x

    return pipeline


def test_an_unsure_pipeline_check_is_timed_again_with_twice_the_passes():
    """Optimized lower but within the spread: one more A/B with twice the passes decides, so a burst of load during
    a few passes does not revert a faster module."""
    from navdeploy.optimize.never_slower import _measure

    first_eager, first_optimized = [40.0, 48.0, 32.0], [36.0, 44.0, 28.0]  # medians 40 and 36, spread 8 each
    again_eager, again_optimized = [40.0] * 6, [20.0] * 6
    pipeline = _scripted(first_eager + again_eager, first_optimized + again_optimized)
    timing = PipelineTiming(0.0, 0.0, None, 1)
    _measure(pipeline, [(1, torch.zeros(1))], [], 3, timing)
    assert timing.repeats == 6 and len(timing.eager_runs) == len(timing.optimized_runs) == 6
    assert timing.faster is True and timing.optimized_s < 0.03 < timing.eager_s


def test_a_pipeline_check_that_is_not_unsure_is_not_timed_again():
    from navdeploy.optimize.never_slower import _measure

    pipeline = _scripted([20.0, 24.0, 16.0], [30.0, 34.0, 26.0])  # optimized slower: no second look
    timing = PipelineTiming(0.0, 0.0, None, 1)
    _measure(pipeline, [(1, torch.zeros(1))], [], 3, timing)
    assert timing.repeats == 3 and timing.faster is False and timing.optimized_s > timing.eager_s
