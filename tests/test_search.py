"""The search (issue 19): candidates screened on a few calls and only the leaders profiled in full, the Inductor
twin not built when AOTInductor verified, one torch.export shared by the formats that start from it, thorough=True
restoring the exhaustive search (building only what a quick run left out), warm workers reused across modules,
and the per-machine probe cache. Verdicts never rest on which candidate is faster: they check the search's own
rules against the figures it recorded."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import navdeploy as nav
from navdeploy.candidates.search import (
    RECHECK_MARGIN,
    SCREEN_MARGIN,
    eager_kernels_skip_reason,
    graph_search,
    search_order,
    twin_skip_reason,
)
from navdeploy.candidates.select import ROUTING_COST_MS
from navdeploy.formats import inductor_probe
from navdeploy.formats.registry import RUNNERS
from navdeploy.optimize.module import _chains, _reusable, candidate_pairs
from navdeploy.workspace.machine_cache import key_hash, probe_folder, read_result, write_result
from navdeploy.workspace.manifest import read_manifest
from navdeploy.workspace.records import CandidateRecord, ProfilePoint

CHEAP = ("TorchCPU", "TorchScriptCPU", "TorchExportCPU")  # no compiler, no ONNX export: seconds
FAST = dict(batch_sizes=(1, 2), max_batch_size=2, profile_time_s=0.05, pipeline_repeats=0)


def _record(name: str, status: str = "screened", screen_ms=None, profile_ms=None) -> CandidateRecord:
    runner = name.split("[")[0]
    record = CandidateRecord(name, runner, "x", "fp32", "cpu", status=status)
    if screen_ms is not None:
        record.screen = ProfilePoint(1, screen_ms, screen_ms, 1e3 / screen_ms, 40, True)
    if profile_ms is not None:
        record.profile = [ProfilePoint(1, profile_ms, profile_ms, 1e3 / profile_ms, 40, True),
                          ProfilePoint(2, 2 * profile_ms, 2 * profile_ms, 1e3 / profile_ms, 40, True)]
    return record


# --- the policy on records ------------------------------------------------------------------------------------
def test_only_candidates_within_the_margin_of_the_best_screen_lead():
    search = graph_search(nav.MinLatency(), False, True, 1, (1, 2, 4))
    eager = _record("TorchCPU", "ok", profile_ms=1.0)
    near = _record("OnnxCPU", screen_ms=0.5)
    close = _record("AOTInductorCPU", screen_ms=0.5 * (1 + SCREEN_MARGIN) * 0.99)
    slow = _record("TorchScriptCPU", screen_ms=0.9)
    broken = _record("TorchExportCPU", "failed")
    records = [eager, near, close, slow, broken]
    assert [r.name for r in search.leaders(records)] == ["OnnxCPU", "AOTInductorCPU"]
    reason = search.screened_reason(slow, records)
    assert reason.startswith("screened out: p50 0.900 ms at batch 1 over 40 calls, 80% slower than OnnxCPU")
    assert "thorough=True" in reason
    # Eager is compared by its screen, or by its full profile at the same batch size where it has one.
    assert {r.name for r in search.leaders([eager, slow])} == {"TorchCPU", "TorchScriptCPU"}  # 1.0 is within the margin
    assert {r.name for r in search.leaders([eager, near])} == {"OnnxCPU"}


def test_eager_leads_where_the_best_saves_less_than_a_routed_call_costs():
    # Selection keeps eager over a runner that beats it by less than ROUTING_COST_MS, and compares full profiles
    # only: eager is profiled in full then, though its screen missed the margin.
    search = graph_search(nav.MinLatency(), False, True, 1, (1, 2))
    best = _record("OnnxCPU", screen_ms=0.020)
    eager = _record("TorchCPU", screen_ms=0.020 * (1 + SCREEN_MARGIN) + ROUTING_COST_MS * 0.9)
    far = _record("TorchCPU", screen_ms=0.020 * (1 + SCREEN_MARGIN) + ROUTING_COST_MS * 1.1)
    assert {r.name for r in search.leaders([best, eager], "TorchCPU")} == {"OnnxCPU", "TorchCPU"}
    assert {r.name for r in search.leaders([best, eager])} == {"OnnxCPU"}  # another runner gets no such room
    assert {r.name for r in search.leaders([best, far], "TorchCPU")} == {"OnnxCPU"}


def test_a_screen_that_just_missed_the_lead_is_taken_again():
    search = graph_search(nav.MinLatency(), False, True, 1, (1, 2, 4))
    best = _record("AOTInductorCPU", screen_ms=1.0)
    missed = _record("AOTInductorCPU[bf16]", screen_ms=1.26)  # a frozen bf16 build screened in a burst of load
    far = _record("TorchExportCPU", screen_ms=1.0 * (1 + RECHECK_MARGIN) * 1.01)
    leader = _record("OnnxCPU", screen_ms=1.1)
    cached = _record("TorchScriptCPU", screen_ms=1.3)
    cached.cached = True  # screened by an earlier run: not taken again
    failed = _record("TorchCompileCPU", "failed")
    records = [best, missed, far, leader, cached, failed]
    assert [r.name for r in search.rechecks(records)] == ["AOTInductorCPU[bf16]"]
    assert search.rechecks([best, leader]) == []
    assert graph_search(nav.MinLatency(), True, True, 1, (1, 2, 4)).rechecks(records) == [missed]  # the rule only


def test_every_candidate_that_just_missed_the_lead_got_a_second_screen(tmp_path):
    torch.manual_seed(0)
    model = nav.Module(nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval(), name="rechecked")
    config = nav.OptimizeConfig(workspace=tmp_path, runners=CHEAP, **FAST)
    with torch.no_grad():
        nav.optimize(lambda x: model(x), [(1, torch.randn(1, 64)), (1, torch.randn(1, 64))], config)
    entry = next(iter(read_manifest(tmp_path / "rechecked").graphs.values()))
    search = graph_search(nav.MinLatency(), False, True, 1, (1, 2))
    log = (tmp_path / "rechecked" / "navdeploy.log").read_text()
    # A candidate still in the band after the run was screened twice (the faster screen is the one on record).
    for record in search.rechecks(entry.candidates):
        assert f"{record.name}: second screen" in log, (record.name, log[-3000:])
    for line in [x for x in log.splitlines() if "second screen" in x]:
        assert " ms against " in line  # both screens' figures are logged


def test_rounds_of_a_profile_combine_into_their_median():
    from navdeploy.candidates.profile import combine_rounds

    rounds = [ProfilePoint(2, ms, ms * 1.1, 2000 / ms, 20, stable) for ms, stable in
              ((1.0, True), (1.5, True), (1.1, False), (0.9, True))]  # one round in a burst of load
    combined = combine_rounds(rounds)
    assert combined.batch_size == 2 and combined.p50_ms == pytest.approx(1.05)
    assert combined.p90_ms == pytest.approx(1.155) and combined.throughput == pytest.approx(2000 / 1.05, rel=0.03)
    assert combined.iterations == 80 and combined.stable is False  # one round was not


def test_leaders_are_profiled_in_rounds_that_take_turns(tmp_path, monkeypatch):
    """Several leaders: each one's full profile is taken in PROFILE_ROUNDS rounds at every batch size, in turns
    with the others, and each keeps its runner loaded between rounds."""
    from navdeploy.candidates import search as search_module
    from navdeploy.optimize.module import PROFILE_ROUNDS, ROUND_MIN_CALLS

    monkeypatch.setattr(search_module, "SCREEN_MARGIN", 100.0)  # every screened candidate leads
    torch.manual_seed(0)
    model = nav.Module(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), name="in_turns")
    config = nav.OptimizeConfig(workspace=tmp_path, runners=CHEAP, use_multiprocessing=False, **FAST)
    with torch.no_grad():
        status = nav.optimize(model, [(1, torch.randn(1, 16)), (2, torch.randn(2, 16))], config)
    records = {c.name: c for c in status.modules["in_turns"].graphs[0].candidates}
    log = (tmp_path / "in_turns" / "navdeploy.log").read_text()
    for name in ("TorchScriptCPU", "TorchExportCPU"):
        record = records[name]
        assert record.status == "ok", (name, record.status, record.error)
        assert [p.batch_size for p in record.profile] == [1, 2]
        assert all(p.iterations >= PROFILE_ROUNDS * ROUND_MIN_CALLS for p in record.profile), record.profile
        assert f"{name}: full profile ok, {PROFILE_ROUNDS} rounds in turns with " in log, log[-3000:]
        assert record.times["load_s"] < 1.0  # loaded once for the rounds, not once a round
    assert status.modules["in_turns"].graphs[0].selected in records
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.__wrapped__(x), atol=1e-4, rtol=1e-3)


def test_the_strategy_says_where_candidates_are_screened():
    assert graph_search(nav.MinLatency(), False, True, 3, (1, 2, 4, 8)).batch == 4  # what selection reads for 3
    assert graph_search(nav.MinLatency(), False, True, 16, (1, 2, 4, 8)).batch == 8
    assert graph_search(nav.MaxThroughput(), False, True, 1, (1, 2, 4, 8)).batch == 8
    assert graph_search(nav.MinLatency(), False, False, None, (1,)).batch is None
    assert graph_search(nav.MinLatency(), False, True, 1, (1, 2)).plan() == "screen"  # eager's too
    assert graph_search(nav.LatencyBudget(1.0), False, True, 1, (1, 2)).plan() == "full"
    assert graph_search(nav.MinLatency(), True, True, 1, (1, 2)).plan() == "full"  # thorough


def test_likely_winners_are_built_first_and_the_twin_after_aoti():
    pairs = candidate_pairs(nav.OptimizeConfig(), "cpu", "fp32")
    names = [r.name for r, _ in pairs]
    assert names[0] == "TorchCPU" and names.index("AOTInductorCPU") < names.index("TorchCompileCPU")
    assert names.index("AOTInductorCPU") < names.index("OnnxCPU") < names.index("TorchExportCPU")
    assert search_order(pairs) == pairs


def test_the_twin_is_built_only_when_aoti_did_not_verify():
    compile_cpu = RUNNERS["TorchCompileCPU"]
    quick = graph_search(nav.MinLatency(), False, True, 1, (1, 2))
    thorough = graph_search(nav.MinLatency(), True, True, 1, (1, 2))
    aoti = _record("AOTInductorCPU", screen_ms=1.0)
    reason = twin_skip_reason(compile_cpu, [aoti], quick)
    assert reason and reason.startswith("not built: AOTInductorCPU verified") and "thorough=True" in reason
    assert twin_skip_reason(compile_cpu, [_record("AOTInductorCPU", "failed")], quick) is None
    assert twin_skip_reason(compile_cpu, [None], quick) is None  # AOTInductor not tried (runners=...)
    assert twin_skip_reason(compile_cpu, [aoti], thorough) is None
    assert twin_skip_reason(RUNNERS["OnnxCPU"], [aoti], quick) is None


def test_on_cuda_plain_torch_compile_is_built_only_when_neither_cuda_graphs_nor_aoti_verified():
    compile_cuda = RUNNERS["TorchCompileCUDA"]
    quick = graph_search(nav.MinLatency(), False, True, 2, (2,))
    graphs, aoti = _record("TorchCompileCUDAGraphs", screen_ms=1.0), _record("AOTInductorCUDA", screen_ms=1.0)
    failed = _record("AOTInductorCUDA", "failed")
    reason = twin_skip_reason(compile_cuda, [graphs, failed], quick)
    assert reason and reason.startswith("not built: TorchCompileCUDAGraphs verified")
    assert twin_skip_reason(compile_cuda, [None, aoti], quick).startswith("not built: AOTInductorCUDA verified")
    assert twin_skip_reason(compile_cuda, [_record("TorchCompileCUDAGraphs", "failed"), failed], quick) is None
    # It builds right after TorchCompileCUDAGraphs, in its chain: the search knows by then whether it must.
    pairs = candidate_pairs(nav.OptimizeConfig(), "cuda", "fp16")
    chain = next(c for c in _chains(pairs, "fp16") if c[0][1].name == "TorchCompileCUDAGraphs")
    assert [r.name for _, r, _ in chain] == ["TorchCompileCUDAGraphs", "TorchCompileCUDA"]


def test_a_screened_record_is_reused_unless_the_search_is_thorough():
    screened = _record("OnnxCPU", screen_ms=1.0)
    assert _reusable(screened, artifact_ok=True) and not _reusable(screened, artifact_ok=True, thorough=True)
    assert not _reusable(screened, artifact_ok=False)
    assert not _reusable(_record("TorchCompileCPU", "skipped"), artifact_ok=True)  # decided again each run
    data = screened.to_json()
    assert data["screen"]["p50_ms"] == 1.0 and CandidateRecord.from_json(data).screen == screened.screen
    assert "screen" not in _record("TorchCPU", "ok", profile_ms=1.0).to_json()  # old manifests' JSON unchanged


# --- real runs --------------------------------------------------------------------------------------------------
def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def _check_search_rules(graph, batch=1) -> None:
    """What the search promises, whatever the timings were: every verified candidate within the margin of the best
    screen was profiled in full, every screened one was not and says why, the winner was profiled in full."""
    by_name = {c.name: c for c in graph.candidates}
    timed = {c.name: c.screen_ms(batch) for c in graph.candidates if c.verified}
    sizes = [1, 2] if graph.batching else [None]
    best = min(timed.values())
    for name, ms in timed.items():
        c = by_name[name]
        room = ROUTING_COST_MS if name == "TorchCPU" else 0.0  # eager: also where the best saves less than routing
        if ms <= best * (1 + SCREEN_MARGIN) + room:
            assert c.status == "ok" and [p.batch_size for p in c.profile] == sizes, c
        else:
            assert c.status == "screened" and not c.profile and c.screen is not None, c
            assert c.error.startswith("screened out: ") and f"{ms:.3f} ms" in c.error
    assert graph.selected is not None and by_name[graph.selected].status == "ok"


def test_quick_search_then_thorough_builds_only_what_is_missing(tmp_path):
    module = nav.Module(_net(), name="search_quick")
    data = [(1, torch.randn(1, 16)), (2, torch.randn(2, 16))]
    quick = nav.optimize(module, data, nav.OptimizeConfig(workspace=tmp_path, runners=CHEAP, **FAST))
    graph = quick.modules["search_quick"].graphs[0]
    _check_search_rules(graph)
    manifest = read_manifest(tmp_path / "search_quick")  # the validated reader takes screened records
    assert {c.name: c.status for c in manifest.graphs[graph.key].candidates} == \
        {c.name: c.status for c in graph.candidates}

    full = nav.optimize(module, data, nav.OptimizeConfig(workspace=tmp_path, runners=CHEAP, thorough=True, **FAST))
    records = {c.name: c for c in full.modules["search_quick"].graphs[0].candidates}
    assert all(c.status == "ok" and len(c.profile) == 2 for c in records.values()), records
    for c in graph.candidates:  # fully profiled before: reused; screened before: profiled now, from its artifact
        assert records[c.name].cached == (c.status == "ok")
        assert records[c.name].cached or not records[c.name].exported

    again = nav.optimize(module, data, nav.OptimizeConfig(workspace=tmp_path, runners=CHEAP, **FAST))
    assert all(c.cached for c in again.modules["search_quick"].graphs[0].candidates)  # a quick run takes them all


def test_warm_workers_serve_every_module_of_a_run(tmp_path):
    first, second = nav.Module(_net(1), name="search_first"), nav.Module(_net(2), name="search_second")
    # One module after another (side by side, each module has a worker of its own: test_parallel_modules.py).
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "TorchScriptCPU"), parallel_modules=1,
                                **FAST)
    status = nav.optimize(lambda x: second(first(x).repeat(1, 4)), [(1, torch.randn(1, 16))], config)
    pids = {c.pid for m in status.modules.values() for g in m.graphs for c in g.candidates}
    assert len(pids) == 1 and os.getpid() not in pids  # one spawned worker, started once, for both modules


def test_the_exported_program_is_built_only_where_nothing_else_serves_model_py():
    quick, full = graph_search(nav.MinLatency(), False, True, 1, (1, 2)), graph_search(nav.MinLatency(), True, True,
                                                                                        1, (1, 2))
    program, script = RUNNERS["TorchExportCPU"], _record("TorchScriptCPU", "built")
    reason = eager_kernels_skip_reason(program, script, quick, named=False)
    assert reason.startswith("not built: it runs eager's kernels uncompiled, and TorchScriptCPU's artifact")
    assert eager_kernels_skip_reason(program, None, quick, named=False) is None  # model.py would have nothing
    assert eager_kernels_skip_reason(program, script, quick, named=True) is None  # runners=("TorchExportCPU", ..)
    assert eager_kernels_skip_reason(program, script, full, named=False) is None  # thorough builds everything
    assert eager_kernels_skip_reason(RUNNERS["OnnxCPU"], script, quick, named=False) is None
    assert RUNNERS["TorchExportCUDA"].runs_eager_kernels
    # It builds after a build model.py loads, in that build's chain, so that the search knows it was needed.
    chains = _chains(candidate_pairs(nav.OptimizeConfig(), "cpu", "fp32"), "fp32", 1)
    chain = next(c for c in chains if any(runner.name == "TorchExportCPU" for _, runner, _ in c))
    assert [runner.name for _, runner, _ in chain][-1] == "TorchExportCPU" and len(chain) == 2, chain


def test_the_exported_program_waits_for_a_loadable_build_then_is_skipped(tmp_path):
    """Default runners of two formats: TorchScript verifies first and the ExportedProgram is not built; with the
    ExportedProgram's format alone it is built, and a Triton repository of the Python backend loads it."""
    data = [(1, torch.randn(1, 16)), (2, torch.randn(2, 16))]
    both = nav.Module(_net(4), name="search_program_skipped")
    formats = (nav.Format.TORCHSCRIPT, nav.Format.TORCH_EXPORTEDPROGRAM)
    status = nav.optimize(both, data, nav.OptimizeConfig(workspace=tmp_path, target_formats=formats, **FAST))
    records = {c.name: c for c in status.modules["search_program_skipped"].graphs[0].candidates}
    assert records["TorchScriptCPU"].verified, records["TorchScriptCPU"].error
    program = records["TorchExportCPU"]
    assert program.status == "skipped" and "TorchScriptCPU's artifact serves" in program.error, program

    alone = nav.Module(_net(5), name="search_program_built")
    config = nav.OptimizeConfig(workspace=tmp_path, target_formats=(nav.Format.TORCH_EXPORTEDPROGRAM,), **FAST)
    status = nav.optimize(alone, data, config)
    records = {c.name: c for c in status.modules["search_program_built"].graphs[0].candidates}
    assert records["TorchExportCPU"].verified, records["TorchExportCPU"].error
    repo = nav.export_model_repository(tmp_path / "repo", backend="python", workspace=tmp_path)
    for name in ("search_program_skipped", "search_program_built"):  # each with an artifact its model.py loads
        assert (repo / name / "config.pbtxt").is_file() and any((repo / name / "1").rglob("model.p*")), name
    assert any((repo / "search_program_built" / "1").rglob("model.pt2"))  # the ExportedProgram's


@pytest.mark.slow
def test_aoti_twin_shared_export_and_thorough(tmp_path):
    """AOTInductor, ONNX and the ExportedProgram start from one torch.export; TorchCompileCPU is not built while
    AOTInductor verified, and a thorough run builds it (and only it)."""
    module = nav.Module(_net(3), name="search_twin", batching=False)  # static shapes: one compile each
    data = [(1, torch.randn(1, 16))]
    runners = ("TorchCPU", "AOTInductorCPU", "OnnxCPU", "TorchExportCPU", "TorchCompileCPU")
    quick = nav.optimize(module, data, nav.OptimizeConfig(workspace=tmp_path, runners=runners, **FAST))
    graph = quick.modules["search_twin"].graphs[0]
    records = {c.name: c for c in graph.candidates}
    assert records["AOTInductorCPU"].verified, records["AOTInductorCPU"].error
    twin = records["TorchCompileCPU"]
    assert twin.status == "skipped" and twin.error.startswith("not built: AOTInductorCPU verified"), twin
    by_worker: dict[int, list[str]] = {}  # a spare worker may build some of them beside AOTInductor (builds_first)
    for name in ("AOTInductorCPU", "OnnxCPU", "TorchExportCPU"):
        by_worker.setdefault(records[name].pid, []).append(name)
    for names in by_worker.values():  # the first to build in a worker ran its one torch.export, the others reused it
        assert [n for n in names if "torch_export_s" in records[n].times] == names[:1], (by_worker, records)
    assert "torch_export_s" in records["AOTInductorCPU"].times
    assert all(records[n].exported for n in ("AOTInductorCPU", "OnnxCPU", "TorchExportCPU"))
    _check_search_rules(graph, batch=None)

    full = nav.optimize(module, data, nav.OptimizeConfig(workspace=tmp_path, runners=runners, thorough=True, **FAST))
    records = {c.name: c for c in full.modules["search_twin"].graphs[0].candidates}
    assert records["TorchCompileCPU"].status == "ok" and not records["TorchCompileCPU"].cached
    assert not any(c.exported for c in records.values() if not c.cached)  # nothing exported again


# --- the machine cache and the probes ----------------------------------------------------------------------------
def test_probe_folders_are_keyed_and_an_unwritable_cache_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setenv("NAVDEPLOY_MACHINE_CACHE", str(tmp_path / "cache"))
    one = probe_folder("p", {"torch": "1"})
    assert one is not None and json.loads((one / "key.json").read_text()) == {"torch": "1"}
    assert probe_folder("p", {"torch": "1"}) == one
    assert probe_folder("p", {"torch": "2"}) != one and key_hash({"torch": "2"}) != key_hash({"torch": "1"})
    assert write_result(one, "r.json", {"problem": None}) and read_result(one, "r.json") == {"problem": None}

    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setenv("NAVDEPLOY_MACHINE_CACHE", str(blocker / "cache"))  # cannot be created (even as root)
    assert probe_folder("p", {"torch": "1"}) is None and not write_result(None, "r.json", {})
    monkeypatch.setattr(inductor_probe, "_isa_warmed", False)  # this process has not warmed yet, as a new one
    inductor_probe.warm_cpu_isa()  # without a cache it leaves the probe to Inductor, and does not fail
    assert not blocker.read_text()


@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="Inductor's ISA list is x86's")
def test_the_isa_checks_run_side_by_side():
    """Each ISA check compiles a test program (~4 s against torch's headers): the probe runs them at once, not one
    after another. Only the ISAs whose CPU flags this CPU has are checked."""
    class Isa:
        def __init__(self, name: str, barrier: threading.Barrier):
            self.name, self.barrier, self.checked = name, barrier, False

        def __str__(self) -> str:
            return self.name

        def __bool__(self) -> bool:
            self.checked = True
            self.barrier.wait()  # broken (an error) unless both checks are inside at once
            return True

    together = threading.Barrier(2, timeout=10)
    isas = [Isa("avx512", together), Isa("avx2", together), Isa("amx_tile", threading.Barrier(1))]
    probe = SimpleNamespace(x86_isa_checker=lambda: ["avx2", "avx512"], supported_vec_isa_list=isas)
    inductor_probe._check_side_by_side(probe)
    assert [i.checked for i in isas] == [True, True, False]


def test_probe_children_report_crashes_and_errors():
    assert inductor_probe.run_probe_child("print('navdeploy-probe-ok')", [], 60) == (None, True)
    why, definitive = inductor_probe.run_probe_child("import ctypes; ctypes.string_at(0)", [], 60)
    assert definitive and why.startswith("the probe died with SIGSEGV"), why
    why, definitive = inductor_probe.run_probe_child("raise RuntimeError('no kernel image')", [], 60)
    assert definitive and "RuntimeError: no kernel image" in why


def test_a_cached_aoti_answer_is_used_and_a_new_key_probes_again(tmp_path, monkeypatch):
    monkeypatch.setenv("NAVDEPLOY_MACHINE_CACHE", str(tmp_path))
    monkeypatch.setattr(inductor_probe, "_aoti_problems", {})
    folder = probe_folder("aoti-cpu", inductor_probe.cpu_key())
    write_result(folder, "aoti.json", {"problem": "recorded by an earlier probe"})
    assert inductor_probe.aoti_problem("cpu") == "recorded by an earlier probe"
    assert [p.name for p in tmp_path.iterdir()] == [folder.name]  # no other probe ran


def test_callers_of_the_aoti_probe_meanwhile_wait_for_its_one_answer(tmp_path, monkeypatch):
    """The probe starts in the background before capture (``start_availability_checks``); the search asking
    meanwhile waits for that probe's answer instead of starting a second one."""
    import threading

    monkeypatch.setenv("NAVDEPLOY_MACHINE_CACHE", str(tmp_path / "machine"))
    monkeypatch.setattr(inductor_probe, "_aoti_problems", {})
    runs = tmp_path / "runs"
    # A real child, slower than the callers' start: it logs each run and answers "works".
    monkeypatch.setattr(inductor_probe, "_AOTI_CHILD", f"import time; open({str(runs)!r}, 'a').write('x'); "
                                                       "time.sleep(1.0); print('navdeploy-probe-ok')")
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(inductor_probe.aoti_problem("cpu"))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert answers == [None, None, None] and runs.read_text() == "x"


@pytest.mark.slow
def test_aoti_probe_and_isa_programs_are_kept_per_machine(tmp_path, monkeypatch):
    """The AOTInductor probe's child builds and runs a real package here, and its answer is kept. Its Inductor
    compiled the ISA test programs into the machine cache: a process with another inductor cache (a new
    workspace) finds them instead of compiling them, and its cache holds none. Once a probe recorded that every
    ISA's program loaded, a later process takes the loads as recorded (no child Python per ISA) and picks the same
    ISA; a record that says otherwise leaves the loads to the children."""
    machine = tmp_path / "machine"
    monkeypatch.setenv("NAVDEPLOY_MACHINE_CACHE", str(machine))
    monkeypatch.setattr(inductor_probe, "_aoti_problems", {})
    assert inductor_probe.aoti_problem("cpu") is None
    (folder,) = machine.glob("aoti-cpu-*")
    assert read_result(folder, "aoti.json")["problem"] is None
    programs = {p: p.stat().st_mtime_ns for p in machine.glob("inductor-cpu-isa-*/**/*.so")}
    assert programs  # the probe's child warmed the ISA probe in the machine cache

    script = textwrap.dedent("""
        from navdeploy.formats.inductor_probe import warm_cpu_isa
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        warm_cpu_isa()
        print("isa", pick_vec_isa())
    """)
    env = dict(os.environ, NAVDEPLOY_MACHINE_CACHE=str(machine), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "ws2"),
               PYTHONPATH=str(Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and out.stdout.startswith("isa "), out.stderr[-2000:]
    assert {p: p.stat().st_mtime_ns for p in machine.glob("inductor-cpu-isa-*/**/*.so")} == programs  # reused
    assert not list((tmp_path / "ws2").rglob("*.so"))

    # The answer is kept, and never taken as Inductor config: cpp.vec_isa_ok is part of torch.compile's cache
    # keys, and a worker setting it left the user's process (where the winner is bound) nothing to find.
    (isa_folder,) = machine.glob("inductor-cpu-isa-*")
    answer = read_result(isa_folder, inductor_probe.ISA_RESULT)
    assert answer is not None and answer["loaded"], answer
    check = "from torch._inductor import config; from navdeploy.formats import inductor_probe; " \
            "inductor_probe.warm_cpu_isa(); print(config.cpp.vec_isa_ok)"
    again = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300, env=env)
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == "None", again.stderr[-2000:]

    counted = textwrap.dedent("""
        import subprocess
        loads = []
        run = subprocess.run
        def counting(cmd, *args, **kwargs):
            if "LoadLibrary" in " ".join(map(str, cmd)):
                loads.append(cmd)
            return run(cmd, *args, **kwargs)
        subprocess.run = counting
        from navdeploy.formats.inductor_probe import warm_cpu_isa
        from torch._inductor.cpu_vec_isa import pick_vec_isa
        warm_cpu_isa()
        print("isa", pick_vec_isa(), "loads", len(loads))
    """)
    assert answer["all_load"] is True, answer  # every ISA of this CPU loaded: the next process takes it as read
    taken = subprocess.run([sys.executable, "-c", counted], capture_output=True, text=True, timeout=300, env=env)
    assert taken.returncode == 0, taken.stderr[-2000:]
    assert taken.stdout.split() == ["isa", *out.stdout.split()[1:], "loads", "0"], (taken.stdout, out.stdout)
    write_result(isa_folder, inductor_probe.ISA_RESULT, dict(answer, all_load=False))
    probed = subprocess.run([sys.executable, "-c", counted], capture_output=True, text=True, timeout=300, env=env)
    assert probed.returncode == 0 and probed.stdout.split()[:-1] == taken.stdout.split()[:-1], probed.stderr[-2000:]
    assert int(probed.stdout.split()[-1]) >= len(answer["loaded"]), probed.stdout  # children load them, as Inductor's


def test_a_job_never_takes_the_isa_probes_momentary_cache(tmp_path, monkeypatch):
    """The ISA probe points this process's inductor cache at the machine cache for a moment (on a thread beside the
    builds); a module's job made meanwhile waits and takes the module's cache, not the machine's."""
    from navdeploy.workspace.inductor import cache_environment

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    inside, release, seen = threading.Event(), threading.Event(), {}

    def probe() -> None:
        with inductor_probe._inductor_cache_at(tmp_path / "machine"):
            inside.set()
            release.wait(5)

    prober = threading.Thread(target=probe)
    prober.start()
    assert inside.wait(5)
    reader = threading.Thread(target=lambda: seen.update(cache_environment(tmp_path / "module_cache")))
    reader.start()
    reader.join(0.3)
    assert reader.is_alive()  # it waits for the probe to put the module's cache back
    release.set()
    prober.join(5)
    reader.join(5)
    assert seen["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "module_cache")


@pytest.mark.slow
def test_loading_an_aoti_package_probes_the_isa_in_the_machine_cache(tmp_path, monkeypatch):
    """Loading a CPU package runs Inductor's ISA probe. The AOTInductor runner warms it from the machine cache
    first: in a process whose inductor cache is new (the user's process at the end of optimize, whose cache is
    the module's) it compiled the test programs there again, ~7 s of the bind."""
    machine = tmp_path / "machine"
    monkeypatch.setenv("NAVDEPLOY_MACHINE_CACHE", str(machine))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "build_cache"))
    module = torch.nn.Linear(8, 4).eval()
    x = torch.randn(2, 8)
    with torch.no_grad():
        package = torch._inductor.aoti_compile_and_package(torch.export.export(module, (x,)),
                                                           package_path=str(tmp_path / "m.pt2"))
        expected = module(x)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import types, torch
        from navdeploy.formats import aoti
        run = aoti._load(types.SimpleNamespace(artifact={package!r}, device="cpu"))
        print("out", run([torch.load({str(tmp_path / "x.pt")!r})])[0].tolist())
    """)
    env = dict(os.environ, NAVDEPLOY_MACHINE_CACHE=str(machine), TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "fresh"),
               PYTHONPATH=str(Path(__file__).parent.parent))
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    line = next(s for s in out.stdout.splitlines() if s.startswith("out "))
    torch.testing.assert_close(torch.tensor(eval(line[4:])), expected)
    assert list(machine.glob("inductor-cpu-isa-*/**/*.so"))
    assert not list((tmp_path / "fresh").rglob("*.so"))  # no ISA test program compiled into the new cache


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run on the GPU host)")
def test_aoti_cuda_probe_is_kept_and_decides_the_candidate(tmp_path, monkeypatch):
    """On a GPU: the probe's answer is kept per machine and a second process-level lookup reads it; where
    AOTInductor packages do not work, AOTInductorCUDA is skipped with the probe's reason instead of building."""
    monkeypatch.setenv("NAVDEPLOY_MACHINE_CACHE", str(tmp_path / "machine"))
    monkeypatch.setattr(inductor_probe, "_aoti_problems", {})
    first = inductor_probe.aoti_problem("cuda")
    (folder,) = (tmp_path / "machine").glob("aoti-cuda-*")
    assert read_result(folder, "aoti.json")["problem"] == first
    monkeypatch.setattr(inductor_probe, "_aoti_problems", {})
    assert inductor_probe.aoti_problem("cuda") == first  # from the machine cache
    module = nav.Module(_net().cuda(), name="search_aoti_cuda")
    config = nav.OptimizeConfig(workspace=tmp_path / "ws", runners=("TorchCUDA", "AOTInductorCUDA"), **FAST)
    status = nav.optimize(module, [(1, torch.randn(1, 16, device="cuda"))], config)
    record = status.modules["search_aoti_cuda"].graphs[0].candidate("AOTInductorCUDA")
    if first is not None:
        assert record.status == "skipped" and record.error == first, record
    else:
        assert record.status != "skipped", record


def test_table_and_report_say_what_was_screened_and_skipped(tmp_path):
    from rich.console import Console

    from navdeploy.capture.recorder import Recorder
    from navdeploy.optimize.status import GraphStatus, ModuleStatus, OptimizeStatus
    from navdeploy.report.console import status_tables
    from navdeploy.report.html import render_workspace_report
    from navdeploy.workspace.manifest import write_manifest
    from navdeploy.workspace.records import GraphEntry, Manifest

    eager = _record("TorchCPU", "ok", profile_ms=1.0)
    screened = _record("TorchScriptCPU[fp16]", screen_ms=2.0)
    screened.error = "screened out: p50 2.000 ms at batch 1 over 40 calls, 100% slower than TorchCPU (1.000 ms)"
    skipped = _record("TorchCompileCPU", "skipped")
    skipped.error = "not built: AOTInductorCPU verified, and TorchCompileCPU runs the same kernels"
    candidates = [eager, screened, skipped]
    status = OptimizeStatus({"m": ModuleStatus("m", tmp_path / "m", "cpu", [GraphStatus("g", "TorchCPU", candidates,
                                                                                        True)], True, 1.0)})
    console = Console(record=True, width=200)
    for part in status_tables(status):
        console.print(part)
    text = console.export_text()
    assert "2.000*" in text and "TorchScriptCPU[fp16] screened: screened out: p50 2.000 ms" in text
    assert "TorchCompileCPU skipped: not built: AOTInductorCPU verified" in text

    recorder = Recorder("m", 4, None)
    recorder.record(nn.Linear(4, 4), (torch.randn(1, 4),), {})
    graph = recorder.finish()[0]
    entry = GraphEntry(graph, "key", {}, candidates, "TorchCPU", "now")
    write_manifest(tmp_path / "m", Manifest("m", "fp", "cpu", graphs={graph.key: entry}, batch_sizes=[1, 2]))
    page = render_workspace_report(tmp_path).read_text()
    assert "Screened out" in page and "100% slower than TorchCPU" in page and "not built: AOTInductorCPU" in page
    assert read_manifest(tmp_path / "m").graphs[graph.key].candidates[1].screen.p50_ms == 2.0


def test_thorough_comes_from_the_config_then_the_run_defaults_then_the_environment(monkeypatch):
    from navdeploy.config import run_defaults, thorough
    from navdeploy.errors import ConfigError

    assert thorough(nav.OptimizeConfig()) is False
    monkeypatch.setenv("NAVDEPLOY_THOROUGH", "1")
    assert thorough(nav.OptimizeConfig()) is True
    assert thorough(nav.OptimizeConfig(thorough=False)) is False  # the config wins
    monkeypatch.delenv("NAVDEPLOY_THOROUGH")
    with run_defaults(thorough=True):  # what `navdeploy optimize --thorough` sets
        assert thorough(nav.OptimizeConfig()) is True
    assert thorough(nav.OptimizeConfig()) is False
    with pytest.raises(ConfigError, match="thorough='yes'"):
        nav.OptimizeConfig(thorough="yes")


def test_candidates_are_screened_and_profiled_on_the_typical_sample_at_each_batch_size(tmp_path):
    """A classifier captured on a short batch of 2, then the long batch of 4 its pipeline spends its time on: every
    candidate is timed (and checked at each profiled batch size) on the long one grown or cut to that size, not on
    the first capture."""
    from navdeploy.candidates.build import Job, WorkerState, _inputs_at
    from navdeploy.capture.recorder import Recorder

    module = nn.Linear(8, 4).eval()
    recorder = Recorder("typical", 8, None)
    for batch, length in ((2, 12), (4, 32)):
        recorder.record(module, (torch.randn(batch, length, 8),), {})
    graph = recorder.finish()[0]
    job = Job("typical", module, None, {graph.key: graph}, tmp_path, "cpu", "fp32", {"fp32": (1e-4, 1e-3)}, None,
              (1, 4, 8), 8, 0.05)
    state = WorkerState()
    for batch in (1, 4, 8):
        (inputs,) = _inputs_at(job, graph, state, batch)
        assert tuple(inputs.shape) == (batch, 32, 8)
        (expected,) = state.reference(job, graph, batch)[1]
        assert torch.allclose(expected, module(inputs))


def test_a_bound_runner_is_warmed_up_on_what_was_profiled(tmp_path):
    """The bind warms every captured shape, then every other profiled batch size with the typical sample grown or
    cut to it, the inputs the profile timed: no call of a profiled shape pays for a compile."""
    from navdeploy.capture.recorder import Recorder
    from navdeploy.inplace.binding import warm_up_inputs

    module = nn.Linear(8, 4).eval()
    recorder = Recorder("warm", 8, None)
    for batch, length in ((2, 12), (4, 32)):
        recorder.record(module, (torch.randn(batch, length, 8),), {})
    graph = recorder.finish()[0]
    record = CandidateRecord("TorchCPU", "TorchCPU", "torch", "fp32", "cpu", status="ok",
                             profile=[ProfilePoint(b, 1.0, 1.0, 1.0, 10) for b in (1, 2, 4, 8)])
    manifest_graph = type(graph).from_json(graph.to_json())  # as bind reads it: no samples of its own
    warmed = [(batch, tuple(inputs[0].shape)) for batch, inputs in warm_up_inputs(manifest_graph, record,
                                                                                    graph.samples)]
    assert warmed == [(None, (2, 12, 8)), (None, (4, 32, 8)), (1, (1, 32, 8)), (2, (2, 32, 8)), (8, (8, 32, 8))]


def test_a_round_uses_the_runner_its_worker_loaded_for_the_round_before(tmp_path):
    """Rounds that take turns (eager and its copy screened in turns, leaders profiled in turns) load and verify a
    runner once per worker: the next round times the loaded one. A task that is not a round loads it again."""
    from navdeploy.candidates.build import Job, Task, WorkerState, run_task
    from navdeploy.capture.recorder import Recorder

    module = nn.Sequential(nn.Linear(16, 16), nn.ReLU()).eval()
    recorder = Recorder("rounds", 4, None)
    recorder.record(module, (torch.randn(2, 16),), {})
    graph = recorder.finish()[0]
    job = Job("rounds", module, None, {graph.key: graph}, tmp_path, "cpu", "fp32", {"fp32": (1e-4, 1e-3)}, None,
              (1, 2, 4), 4, 0.05)
    state = WorkerState()

    def screen(rounds: bool):
        record = run_task(job, Task(graph.key, "TorchCPU", export=False, precision="fp32", plan="screen",
                                    screen_batch=2, rounds=rounds), state)
        assert record.status == "screened" and record.screen is not None, (record.status, record.error)
        return record

    first = screen(rounds=True)
    assert "verify_s" in first.times  # loaded and checked against eager
    again = screen(rounds=True)
    assert "verify_s" not in again.times and "load_s" not in again.times, again.times
    assert "verify_s" in screen(rounds=False).times


def test_each_captured_batch_size_is_timed_at_the_shapes_its_calls_came_in():
    """A graph called at 2x12 and 4x32 tokens is timed at batch 2 on its 2x12 sample, not on the typical 4x32 one cut
    to 2 (a frozen bf16 BERT build is much slower at 12 tokens than at 32, and a 2x32 figure let it win a mix it
    lost); sizes the pipeline never called take the typical sample grown or cut."""
    from navdeploy.candidates.build import Job, WorkerState
    from navdeploy.capture.recorder import Recorder

    module = torch.nn.Sequential(torch.nn.Linear(8, 8)).eval()
    recorder = Recorder("mix", 8, None)
    for batch, length in ((2, 12), (4, 32)):
        recorder.record(module, (torch.randn(batch, length, 8),), {})
    graph = recorder.finish()[0]
    assert graph.batching and graph.typical_batch == 4 and graph.batch_weights == {2: 1, 4: 1}
    assert [tuple(t.shape) for t in graph.sample_for(2).inputs] == [(2, 12, 8)]
    assert graph.sample_for(4) is graph.typical_sample and graph.sample_for(8) is graph.typical_sample
    job = Job("mix", module, None, {graph.key: graph}, Path("/nonexistent"), "cpu", "fp32", {"fp32": (1e-4, 1e-3)},
              None, (1, 2, 4, 8), 8, 0.05)
    state = WorkerState()
    shapes = {b: tuple(state.reference(job, graph, b)[0][0].shape) for b in (1, 2, 4, 8)}
    assert shapes == {1: (1, 32, 8), 2: (2, 12, 8), 4: (4, 32, 8), 8: (8, 32, 8)}
    inputs, outputs = state.reference(job, graph, 2)
    torch.testing.assert_close(outputs[0], module(inputs[0]))  # the reference is eager on those very inputs
