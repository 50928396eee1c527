"""A CPU module's follow-up precision copies (bf16) built beside its own candidates, on a second worker, once
eager's profile shows they will be tried: the rule, the setting, the order of the side chain, and a real optimize
whose bf16 AOTInductor build overlaps the fp32 one while no timing overlaps any build."""

from __future__ import annotations

import pytest
import torch
from stand_ins import SlowInBf16, WaitsInEager
from torch import nn

import navdeploy as nav
from navdeploy import config as config_module
from navdeploy.candidates.precision import EARLY_FOLLOW_UP_FACTOR, cpu_computes_bf16, follow_ups_early
from navdeploy.candidates.search import RECHECK_MARGIN, early_follow_up_pairs, early_screen_rechecked
from navdeploy.config import follow_ups_beside
from navdeploy.optimize.module import candidate_pairs


def test_follow_ups_are_known_early_for_wide_matmuls_or_a_slow_eager():
    assert follow_ups_early(None, 0.0)  # wide matmuls: tried whatever the builds measure
    assert follow_ups_early(EARLY_FOLLOW_UP_FACTOR * 1.0, 1.0)
    assert not follow_ups_early(EARLY_FOLLOW_UP_FACTOR * 1.0 - 0.01, 1.0)  # the best build may well be < 1 ms
    assert not follow_ups_early(None, 1.0)


def test_the_side_chain_starts_with_a_build_and_keeps_twins_after_theirs():
    pairs = candidate_pairs(nav.OptimizeConfig(), "cpu", "fp32")
    names = [r.name for r, _ in pairs]
    assert "AOTInductorCPU" in names and "TorchCompileCPU" in names  # TorchCompileCPU is AOTInductorCPU's twin

    extra = early_follow_up_pairs(pairs, ("bf16",), lambda r, p: r.name == "AOTInductorCPU")
    order = [r.name for r, _ in extra]
    assert order[0] == "AOTInductorCPU" and all(p == "bf16" for _, p in extra)
    assert order.index("TorchCompileCPU") > order.index("AOTInductorCPU")
    assert {r.name for r, _ in extra} == {r.name for r, _ in pairs if r.follows_up}  # no ONNX, no ExportedProgram
    assert not any(pair in pairs for pair in extra)

    # A twin whose own copy would build first still waits for its twin's.
    twin_first = [r.name for r, _ in early_follow_up_pairs(pairs, ("bf16",), lambda r, p: r.name == "TorchCompileCPU")]
    assert twin_first.index("TorchCompileCPU") > twin_first.index("AOTInductorCPU")
    assert twin_first[0] == names[0]  # nothing builds first: eager's copy leads, as in the module's own order


def test_follow_ups_beside_only_for_a_cpu_module_alone_with_cores_and_memory(monkeypatch):
    gib = 1 << 30
    monkeypatch.delenv("NAVDEPLOY_BUILD_WORKERS", raising=False)
    monkeypatch.setattr(config_module, "_host_cores", lambda: 2)
    monkeypatch.setattr(config_module, "_free_memory", lambda: 64 * gib)
    module, config = nn.Linear(8, 8), nav.OptimizeConfig()
    assert follow_ups_beside(config, "cpu", module, alone=True)
    assert not follow_ups_beside(config, "cpu", module, alone=False)  # another module takes the other core
    assert not follow_ups_beside(config, "cuda", module, alone=True)
    assert not follow_ups_beside(nav.OptimizeConfig(build_workers=1), "cpu", module, alone=True)  # the user's number
    assert not follow_ups_beside(nav.OptimizeConfig(use_multiprocessing=False), "cpu", module, alone=True)
    monkeypatch.setenv("NAVDEPLOY_BUILD_WORKERS", "1")
    assert not follow_ups_beside(config, "cpu", module, alone=True)
    monkeypatch.delenv("NAVDEPLOY_BUILD_WORKERS")
    monkeypatch.setattr(config_module, "_host_cores", lambda: 1)
    assert not follow_ups_beside(config, "cpu", module, alone=True)
    monkeypatch.setattr(config_module, "_host_cores", lambda: 2)
    monkeypatch.setattr(config_module, "_free_memory", lambda: 1024)  # two more copies do not fit
    assert not follow_ups_beside(config, "cpu", module, alone=True)


@pytest.mark.slow
@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic: no bf16 copies are tried")
@pytest.mark.skipif(config_module._host_cores() < 2, reason="one core: nothing builds beside")
def test_bf16_copies_build_beside_the_fp32_candidates_and_never_during_a_timing(tmp_path):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 256)).eval()  # wide: bf16 is tried
    # Eager's bf16 copy is slower: the fp32 build is built (its copy does not stand for it), and the bf16 one too
    # (eager's copy does not predict a frozen build of a matmul module).
    model = nav.Module(SlowInBf16(mlp), name="wide_mlp")
    data = [(2, torch.randn(2, 256)) for _ in range(2)]
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "AOTInductorCPU"), batch_sizes=(2,),
                                max_batch_size=2, profile_time_s=0.1)
    status = nav.optimize(model, data, config)
    candidates = {c.name: c for c in status.modules["wide_mlp"].graphs[0].candidates}
    assert set(candidates) == {"TorchCPU", "AOTInductorCPU", "TorchCPU[bf16]", "AOTInductorCPU[bf16]"}, candidates
    for c in candidates.values():
        assert c.verified, (c.name, c.status, c.error)
    log = (status.modules["wide_mlp"].folder / "navdeploy.log").read_text()
    assert "beside the fp32 candidates" in log, log[-3000:]

    fp32, bf16 = candidates["AOTInductorCPU"], candidates["AOTInductorCPU[bf16]"]
    assert fp32.pid != bf16.pid  # a worker each
    assert bf16.window.start < fp32.window.verified and fp32.window.start < bf16.window.verified, \
        (fp32.window, bf16.window)  # the two builds overlapped
    windows = {c.name: c.window for c in candidates.values()}
    builds = {name: (w.start, w.verified) for name, w in windows.items()}
    timings = {name: (w.profile, w.end) for name, w in windows.items()}

    def overlap(x: tuple[float, float], y: tuple[float, float]) -> bool:
        return x[0] < y[1] and y[0] < x[1]

    for name, timing in timings.items():  # no timing overlapped anything else (the gate)
        for other in windows:
            if other != name:
                assert not overlap(builds[other], timing) and not overlap(timings[other], timing), \
                    f"{other} ran while {name} was timed: {windows}"
    x = torch.randn(2, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(x), mlp(x), atol=0.05, rtol=0.05)  # within bf16's tolerance at worst


@pytest.mark.slow
@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic: no spare worker for copies")
@pytest.mark.skipif(config_module._host_cores() < 2, reason="one core: nothing builds beside")
def test_without_early_copies_the_spare_worker_builds_the_own_candidates_before_any_screen(tmp_path):
    """A narrow, fast module (no bf16 copies known to be tried after eager's profile): its own candidates build on
    both workers, every build before the first screen, and each is then screened from its build."""
    torch.manual_seed(0)
    small = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16)).eval()  # eager far under 2 ms a call
    model = nav.Module(small, name="narrow_mlp")
    data = [(2, torch.randn(2, 32)) for _ in range(2)]
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "AOTInductorCPU", "TorchScriptCPU",
                                                             "OnnxCPU"),
                                batch_sizes=(2,), max_batch_size=2, profile_time_s=0.1)
    status = nav.optimize(model, data, config)
    candidates = {c.name: c for c in status.modules["narrow_mlp"].graphs[0].candidates}
    assert set(candidates) == {"TorchCPU", "AOTInductorCPU", "TorchScriptCPU", "OnnxCPU"}, candidates
    for c in candidates.values():
        assert c.status in ("ok", "screened"), (c.name, c.status, c.error)  # never left "built"
        assert c.window is not None and c.window.profile is not None and c.window.end is not None, c
    log = (status.modules["narrow_mlp"].folder / "navdeploy.log").read_text()
    assert "beside the fp32 candidates" not in log and "AOTInductorCPU: built" in log, log[-3000:]

    others = [c for name, c in candidates.items() if name not in ("TorchCPU", "AOTInductorCPU")]
    aoti = candidates["AOTInductorCPU"]
    assert {c.pid for c in others} != {aoti.pid}  # the spare worker took some of them
    assert any(c.window.start < aoti.window.verified for c in others), \
        {n: c.window for n, c in candidates.items()}  # built while AOTInductor built
    first_screen = min(c.window.profile for name, c in candidates.items() if name != "TorchCPU")
    assert all(c.window.verified <= first_screen for name, c in candidates.items() if name != "TorchCPU")
    windows = {c.name: c.window for c in candidates.values()}
    builds = {name: (w.start, w.verified) for name, w in windows.items()}
    timings = {name: (w.profile, w.end) for name, w in windows.items()}
    for name, timing in timings.items():  # no timing overlapped a build
        for other in windows:
            if other != name:
                assert not (builds[other][0] < timing[1] and timing[0] < builds[other][1]), (other, name, windows)
    x = torch.randn(2, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), small(x), atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic: no bf16 copies are tried")
def test_the_copies_are_decided_on_eager_and_its_copy_screened_in_turns(tmp_path, monkeypatch):
    """Eager's copy is screened again in turns with eager (the gate held), and the other copies are built or
    skipped on those medians, not on eager's profile from the start of the run."""
    import re

    from navdeploy.candidates import search as search_module
    from navdeploy.optimize.module import COPY_ROUNDS

    monkeypatch.setattr(search_module, "LOW_PRECISION_SKIP_MARGIN", -0.9)  # any ratio skips: the reason shows it
    torch.manual_seed(0)
    model = nav.Module(nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512)).eval(), name="copy_turns")
    data = [(8, torch.randn(8, 512)) for _ in range(2)]
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "TorchScriptCPU"), batch_sizes=(8,),
                                max_batch_size=8, profile_time_s=0.1)
    status = nav.optimize(model, data, config)
    candidates = {c.name: c for c in status.modules["copy_turns"].graphs[0].candidates}
    log = (status.modules["copy_turns"].folder / "navdeploy.log").read_text()
    found = re.search(r"TorchCPU\[bf16\]: ([\d.]+) ms against TorchCPU's ([\d.]+) \(medians of (\d) and (\d) screens "
                      r"in turns\)", log)
    assert found, log[-3000:]
    assert (int(found[3]), int(found[4])) == (COPY_ROUNDS + 1, COPY_ROUNDS)
    skipped = candidates["TorchScriptCPU[bf16]"]
    assert skipped.status == "skipped" and f"({found[1]} against {found[2]} ms" in skipped.error, skipped.error
    if follow_ups_beside(config, "cpu", model.__wrapped__, alone=True):
        # The spare worker's first task is eager's copy, screened (and in turns) before any other build starts:
        # in a chain beside the builds, its screen waited for them while that worker idled.
        copy, build = candidates["TorchCPU[bf16]"], candidates["TorchScriptCPU"]
        assert copy.window.end <= build.window.start, (copy.window, build.window)
        log_lines = [line for line in log.splitlines() if "[worker]" not in line]
        assert sum("TorchCPU[bf16]: screened" in line for line in log_lines) == 1, log[-3000:]  # not built again
    x = torch.randn(8, 512)
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.__wrapped__(x), atol=1e-4, rtol=1e-3)  # an fp32 winner


def test_an_eager_screen_just_over_the_early_bar_is_screened_again():
    bar = EARLY_FOLLOW_UP_FACTOR * 1.0
    assert early_screen_rechecked(bar, 1.0) and early_screen_rechecked(bar * (1 + RECHECK_MARGIN), 1.0)
    assert not early_screen_rechecked(bar * (1 + RECHECK_MARGIN) + 0.01, 1.0)  # clearly over: no burst makes that
    assert not early_screen_rechecked(bar - 0.01, 1.0)  # under the bar: a burst only slows calls
    assert not early_screen_rechecked(5.0, 0.0)  # wide matmuls: tried whatever eager reads


@pytest.mark.slow
@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic: no bf16 copies are tried")
def test_the_early_decision_takes_the_faster_of_two_eager_screens_where_the_first_is_just_over(tmp_path):
    """Eager's screen decides whether the bf16 copies build beside the module's own candidates; one just over the
    bar (within RECHECK_MARGIN) is taken again, and the faster of the two decides and stays eager's screen."""
    import re

    torch.manual_seed(0)
    # Narrow (no wide matmuls): the bar is EARLY_FOLLOW_UP_FACTOR x 1 ms = 2 ms, and eager takes ~2.6 ms a call.
    model = nav.Module(WaitsInEager(nn.Linear(16, 16).eval(), 0.0025).eval(), name="bar_recheck")
    x = torch.randn(2, 16)
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU",), batch_sizes=(2,), max_batch_size=2,
                                profile_time_s=0.1)
    status = nav.optimize(model, [(2, x) for _ in range(2)], config)
    log = (status.modules["bar_recheck"].folder / "navdeploy.log").read_text()
    found = re.search(r"TorchCPU: second screen ([\d.]+) ms against ([\d.]+) \(the first was within 60% of the "
                      r"2.00 ms from which the follow-up copies are tried beside\)", log)
    assert found, log[-3000:]
    eager = next(c for c in status.modules["bar_recheck"].graphs[0].candidates if c.name == "TorchCPU")
    assert eager.screen is not None
    assert eager.screen.p50_ms == pytest.approx(min(float(found[1]), float(found[2])), abs=1e-3)
