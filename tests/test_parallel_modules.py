"""Modules optimized side by side (``parallel_modules``): their builds overlap, no timing of one overlaps anything of
another, each module's log and inductor cache stay its own, and the results are those of one module at a time."""

from __future__ import annotations

import threading
import time
from typing import Callable

import pytest
import torch
from stand_ins import FastInBf16, SlowInBf16
from torch import nn

import navdeploy as nav
from navdeploy.candidates.isolation import WorkerHub
from navdeploy.candidates.precision import cpu_computes_bf16
from navdeploy.config import default_parallel_modules, parallel_modules
from navdeploy.errors import ConfigError
from navdeploy.optimize.participants import nested
from navdeploy.workspace.inductor import cache_environment

RUNNERS = ("TorchCPU", "TorchScriptCPU", "TorchExportCPU", "OnnxCPU")


def test_parallel_modules_setting(monkeypatch):
    modules = [nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)]
    assert parallel_modules(nav.OptimizeConfig(parallel_modules=2), modules, ["cpu"] * 3) == 2
    assert parallel_modules(nav.OptimizeConfig(parallel_modules=8), modules, ["cpu"] * 3) == 3  # no more than modules
    assert parallel_modules(nav.OptimizeConfig(parallel_modules=2), modules[:1], ["cpu"]) == 1
    assert parallel_modules(nav.OptimizeConfig(parallel_modules=2, use_multiprocessing=False), modules,
                            ["cpu"] * 3) == 1  # in-process candidates run one at a time anyway
    monkeypatch.setenv("NAVDEPLOY_PARALLEL_MODULES", "1")
    assert parallel_modules(nav.OptimizeConfig(), modules, ["cpu"] * 3) == 1
    assert parallel_modules(nav.OptimizeConfig(parallel_modules=3), modules, ["cpu"] * 3) == 3  # the config wins
    monkeypatch.setenv("NAVDEPLOY_PARALLEL_MODULES", "all")
    with pytest.raises(ConfigError, match="NAVDEPLOY_PARALLEL_MODULES='all'"):
        parallel_modules(nav.OptimizeConfig(), modules, ["cpu"] * 3)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="parallel_modules="):
            nav.OptimizeConfig(parallel_modules=bad)


def test_default_parallel_modules_from_cores_devices_and_memory():
    gib = 1 << 30
    assert default_parallel_modules(["cpu", "cpu"], 2, 64 * gib, [gib, gib]) == 2
    assert default_parallel_modules(["cpu"] * 8, 16, 64 * gib, [gib] * 8) == 4  # at most 4
    assert default_parallel_modules(["cpu", "cpu"], 1, 64 * gib, [gib, gib]) == 1  # one core
    assert default_parallel_modules(["cpu", "cuda"], 16, 64 * gib, [gib, gib]) == 1  # not measured on a GPU
    # 3 copies of the two largest must fit in half the free memory: 2 x 3 x 4 GiB > 16 GiB, 3 x 4 GiB fits.
    assert default_parallel_modules(["cpu", "cpu"], 4, 32 * gib, [4 * gib, 4 * gib]) == 1
    assert default_parallel_modules(["cpu", "cpu"], 4, 64 * gib, [4 * gib, 4 * gib]) == 2
    assert default_parallel_modules(["cpu", "cpu"], 4, None, [4 * gib, 4 * gib]) == 2  # memory unknown


def test_a_module_inside_another_is_not_optimized_beside_it():
    inner = nav.Module(nn.Linear(2, 2), name="inner_n")
    outer = nav.Module(nn.Sequential(inner, nn.ReLU()), name="outer_n")
    alone = nav.Module(nn.Linear(2, 2), name="alone_n")
    assert nested([inner, outer]) and nested([outer, inner])
    assert not nested([inner, alone]) and not nested([outer, alone])


def test_each_module_job_carries_its_own_inductor_cache(tmp_path, monkeypatch):
    """What a worker compiles into is named by the module's job, not read from this process's variables of the
    moment (another module, optimized beside it, may have them pointed at its own cache)."""
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    a, b = cache_environment(tmp_path / "a"), cache_environment(tmp_path / "b")
    assert a == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "a"), "TRITON_CACHE_DIR": str(tmp_path / "a" / "triton")}
    assert b["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "b")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "users"))  # the user's cache stays the user's
    assert cache_environment(tmp_path / "a")["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "users")


def test_a_build_of_one_module_holds_off_the_timing_of_another():
    """Every pool of a hub takes the hub's gate: a timing in one module's pool waits for a build in another's."""
    hub = WorkerHub()
    events: list[str] = []
    building, release = threading.Event(), threading.Event()

    def build() -> None:
        with hub.gate.task():
            building.set()
            release.wait(5)
            events.append("build ends")

    def timing() -> None:
        with hub.gate.task() as slot:
            slot.timing()
            events.append("timing")

    _second_waits_for_first(build, building, timing, release)
    assert events == ["build ends", "timing"]
    hub.close()


def test_a_retiming_waiting_on_a_timing_goes_before_a_build_that_waits_too():
    """A task that only times an earlier build (``Task.times_only``: screens and profiles from a build) asks for
    timing as it enters the gate. A build of another module that waits beside it therefore starts after it; entering
    as a build first, both were admitted together when the timing ahead of them ended, and the screen waited the
    whole build out."""
    from navdeploy.candidates.build import Task
    from navdeploy.candidates.isolation import runs_alone

    retime = Task("g", "OnnxCPU", export=False, precision="fp32", plan="screen", retime=True)
    assert runs_alone(retime)  # what Executor.run enters the gate with
    assert not runs_alone(Task("g", "OnnxCPU", export=True, precision="fp32", plan="screen", retime=True))
    assert not runs_alone(Task("g", "OnnxCPU", export=False, precision="fp32", plan="screen"))
    hub = WorkerHub()
    events: list[str] = []
    timing, release = threading.Event(), threading.Event()

    def first_timing() -> None:
        with hub.gate.task(exclusive=True):
            timing.set()
            release.wait(5)
            events.append("timing ends")

    def screen() -> None:
        with hub.gate.task(exclusive=runs_alone(retime)) as slot:
            slot.timing()  # what the worker asks before it times (at once when it holds the gate already)
            events.append("screen")
            time.sleep(0.2)
            events.append("screen ends")

    def build() -> None:
        with hub.gate.task():
            events.append("build")

    one = threading.Thread(target=first_timing, daemon=True)
    one.start()
    assert timing.wait(5)
    others = [threading.Thread(target=screen, daemon=True), threading.Thread(target=build, daemon=True)]
    others[0].start()
    deadline = time.monotonic() + 5
    while hub.gate._waiting == 0 and time.monotonic() < deadline:  # the screen waits for timing; then the build
        time.sleep(0.01)
    others[1].start()
    time.sleep(0.1)  # the build waits too (it cannot start while a timing is waiting or running)
    release.set()
    for thread in [one, *others]:
        thread.join(5)
    assert events == ["timing ends", "screen", "screen ends", "build"]
    hub.close()


def _second_waits_for_first(first: Callable[[], None], started: threading.Event, second: Callable[[], None],
                            release: threading.Event) -> None:
    """Run ``first`` on a thread and, once it set ``started``, ``second`` on another: ``second`` still waits 0.3 s
    later; then ``release`` is set and both end."""
    one = threading.Thread(target=first, daemon=True)
    one.start()
    assert started.wait(5)
    two = threading.Thread(target=second, daemon=True)
    two.start()
    two.join(0.3)
    assert two.is_alive()
    release.set()
    one.join(5)
    two.join(5)


def _no_timing_overlapped_a_build(windows: dict) -> None:
    """No candidate's timing (from its profile to its end) overlapped another's build (its start to verified)."""
    for key, w in windows.items():
        for other, o in windows.items():
            if other != key:
                assert not (o.start < w.end and w.profile < o.verified), f"{other} built while {key} was timed"


def _pipeline(prefix: str = "side", seed: int = 0):
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    a, b = nav.Module(mlp, name=f"{prefix}_mlp"), nav.Module(cnn, name=f"{prefix}_cnn")

    def pipeline(x, image):
        return torch.cat([a(x), b(image)], dim=1)

    data = [(2, (torch.randn(2, 16), torch.randn(2, 3, 16, 16))) for _ in range(2)]
    return pipeline, data, (mlp, cnn)


def test_modules_side_by_side_build_together_time_alone_and_log_apart(tmp_path):
    pipeline, data, (mlp, cnn) = _pipeline()
    config = nav.OptimizeConfig(workspace=tmp_path, runners=RUNNERS, batch_sizes=(1, 2), max_batch_size=2,
                                profile_time_s=0.2, thorough=True, parallel_modules=2)
    status = nav.optimize(pipeline, data, config)
    records = {name: [c for g in status.modules[name].graphs for c in g.candidates] for name in status.modules}
    assert list(status.modules) == ["side_mlp", "side_cnn"]  # the user's order, whichever finished first
    for name, candidates in records.items():
        assert all(c.status == "ok" for c in candidates), [(name, c.runner, c.error) for c in candidates]
    assert {c.pid for c in records["side_mlp"]}.isdisjoint({c.pid for c in records["side_cnn"]})  # own workers
    windows = {(name, c.runner): c.window for name, candidates in records.items() for c in candidates}
    builds = {key: (w.start, w.verified) for key, w in windows.items()}
    profiles = {key: (w.profile, w.end) for key, w in windows.items()}

    def overlap(x: tuple[float, float], y: tuple[float, float]) -> bool:
        return x[0] < y[1] and y[0] < x[1]

    assert any(overlap(builds[x], builds[y]) for x in builds for y in builds if x[0] != y[0]), \
        f"no two modules built side by side: {windows}"
    for key, profiling in profiles.items():
        for other in windows:
            if other != key:  # nothing of any module ran while a candidate profiled
                assert not overlap(builds[other], profiling) and not overlap(profiles[other], profiling), \
                    f"{other} ran while {key} profiled: {windows}"
    for name, other in (("side_mlp", "side_cnn"), ("side_cnn", "side_mlp")):
        text = (status.modules[name].folder / "navdeploy.log").read_text()
        assert f"optimizing {name}" in text and other not in text, text[-3000:]
    x, image = data[0][1]
    with torch.no_grad():
        torch.testing.assert_close(pipeline(x, image), torch.cat([mlp(x), cnn(image)], dim=1), atol=1e-4, rtol=1e-3)


def test_modules_side_by_side_build_everything_before_their_screens(tmp_path):
    """Beside another module a screen waits for its builds in flight and stops its next ones: each module builds all
    its candidates first (status "built" in the log), then screens them back to back; still no timing overlaps a
    build of either module."""
    pipeline, data, (mlp, cnn) = _pipeline("first")
    config = nav.OptimizeConfig(workspace=tmp_path, runners=RUNNERS, batch_sizes=(1, 2), max_batch_size=2,
                                profile_time_s=0.2, parallel_modules=2)
    status = nav.optimize(pipeline, data, config)
    records = {name: [c for g in status.modules[name].graphs for c in g.candidates] for name in status.modules}
    windows = {}
    for name, candidates in records.items():
        assert all(c.status in ("ok", "screened") for c in candidates), [(name, c.runner, c.error) for c in candidates]
        assert f"{name} graph" in (text := (status.modules[name].folder / "navdeploy.log").read_text())
        built = [c for c in candidates if c.runner != "TorchCPU"]
        assert all(f"{c.name}: built" in text for c in built), text[-3000:]
        first_screen = min(c.window.profile for c in built)
        assert all(c.window.verified <= first_screen for c in built), [(c.name, c.window) for c in built]
        windows.update({(name, c.name): c.window for c in candidates})
    _no_timing_overlapped_a_build(windows)
    x, image = data[0][1]
    with torch.no_grad():
        torch.testing.assert_close(pipeline(x, image), torch.cat([mlp(x), cnn(image)], dim=1), atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_modules_compiled_side_by_side_keep_their_own_inductor_caches(tmp_path):
    """Two modules whose AOTInductor builds run side by side, each in its own worker: each cache holds its own
    module's code and matches the checksum its manifest took, so a re-run answers both from the cache."""
    pipeline, data, _ = _pipeline("cached", seed=1)
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "AOTInductorCPU"), batch_sizes=(2,),
                                max_batch_size=2, profile_time_s=0.1, precisions=("fp32",), parallel_modules=2,
                                keep_artifacts=True)  # the caches stay whichever runner wins
    status = nav.optimize(pipeline, data, config)
    for module_status in status.modules.values():
        assert all(c.status in ("ok", "screened") for c in module_status.graphs[0].candidates), module_status
    for name in ("cached_mlp", "cached_cnn"):
        assert any((tmp_path / "inductor_cache" / name).rglob("*.so")), name
    again = nav.optimize(pipeline, data, config)
    for name, module_status in again.modules.items():
        assert all(c.cached for c in module_status.graphs[0].candidates), name
        text = (module_status.folder / "navdeploy.log").read_text()
        assert "does not match" not in text, text[-3000:]


def test_a_thread_that_holds_the_gate_times_alone_across_its_tasks():
    """``TimingGate.held``: the holder's tasks run alone at once, and another thread's build starts only after
    the block, not between two of the holder's tasks."""
    hub = WorkerHub()
    events: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def rounds() -> None:
        with hub.gate.held():
            holding.set()
            for i in range(2):
                with hub.gate.task() as slot:
                    assert slot.timing() == 0.0  # alone already
                    events.append(f"round {i}")
                if i == 0:
                    release.wait(5)  # between two rounds, while the builder asks

    def build() -> None:
        with hub.gate.task():
            events.append("build")

    _second_waits_for_first(rounds, holding, build, release)  # no build between the rounds
    assert events == ["round 0", "round 1", "build"]
    hub.close()


def test_leaders_of_modules_side_by_side_are_profiled_in_turns(tmp_path, monkeypatch):
    """Beside another module, a module's leaders too are profiled in rounds that take turns (the gate held from
    the first round to the last), and no timing overlaps a build of either module."""
    from navdeploy.candidates import search as search_module
    from navdeploy.optimize.module import PROFILE_ROUNDS

    monkeypatch.setattr(search_module, "SCREEN_MARGIN", 100.0)  # every screened candidate leads
    pipeline, data, (mlp, cnn) = _pipeline("turns")
    config = nav.OptimizeConfig(workspace=tmp_path, runners=RUNNERS, batch_sizes=(1, 2), max_batch_size=2,
                                profile_time_s=0.2, parallel_modules=2)
    status = nav.optimize(pipeline, data, config)
    windows = {}
    for name, module_status in status.modules.items():
        candidates = [c for g in module_status.graphs for c in g.candidates]
        assert all(c.status == "ok" for c in candidates), [(name, c.name, c.status, c.error) for c in candidates]
        text = (module_status.folder / "navdeploy.log").read_text()
        assert f"full profile ok, {PROFILE_ROUNDS} rounds in turns with " in text, text[-3000:]
        windows.update({(name, c.name): c.window for c in candidates})
    _no_timing_overlapped_a_build(windows)
    x, image = data[0][1]
    with torch.no_grad():
        torch.testing.assert_close(pipeline(x, image), torch.cat([mlp(x), cnn(image)], dim=1), atol=1e-4, rtol=1e-3)


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): "
                                                    "bf16 is not tried by default here")
def test_modules_side_by_side_time_eager_and_its_copy_before_any_build(tmp_path):
    """Beside another module, eager and eager's bf16 copy are timed in turns before any build of either module (a
    timing asked for once the other module builds would wait for its builds in flight), so the copy decides which
    copies build, as alone: eager's copy is slower here, so TorchScript's copy is not built. Every other build comes
    before any screen, no timing overlaps a build, and each leader is profiled in full once."""
    def layers(seed: int) -> nn.Module:  # four 1024-wide layers: bf16 copies are tried however fast the call
        torch.manual_seed(seed)
        return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)]).eval()

    a, b = SlowInBf16(layers(0)), SlowInBf16(layers(1))
    first, second = nav.Module(a, name="copies_a", batching=False), nav.Module(b, name="copies_b", batching=False)
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "TorchScriptCPU"), profile_time_s=0.2,
                                parallel_modules=2, pipeline_repeats=0)
    items = [(1, torch.randn(64, 1024)), (1, torch.randn(64, 1024))]
    with torch.no_grad():
        status = nav.optimize(lambda x: second(first(x)), items, config)
    windows, eager_ends, build_starts = {}, [], []
    for name in ("copies_a", "copies_b"):
        records = {c.name: c for g in status.modules[name].graphs for c in g.candidates}
        text = (status.modules[name].folder / "navdeploy.log").read_text()
        assert "screens in turns" in text, text[-3000:]
        assert records["TorchCPU[bf16]"].verified, records["TorchCPU[bf16]"]
        copy = records["TorchScriptCPU[bf16]"]
        assert copy.status == "skipped" and copy.error.startswith("not built: TorchCPU[bf16] was "), copy
        eager_ends += [records[n].window.end for n in ("TorchCPU", "TorchCPU[bf16]")]
        built = [c for n, c in records.items() if n not in ("TorchCPU", "TorchCPU[bf16]") and c.window is not None]
        assert built, records
        build_starts += [c.window.start for c in built]
        assert max(c.window.verified for c in built) <= min(c.window.profile for c in built), \
            [(c.name, c.window) for c in built]
        for c in records.values():
            assert text.count(f"{c.name}: full profile") <= 1, text[-3000:]
        windows.update({(name, c.name): c.window for c in records.values() if c.window is not None})
    assert max(eager_ends) <= min(build_starts), windows  # both modules' eager timings before any build
    _no_timing_overlapped_a_build(windows)


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): "
                                                    "bf16 is not tried by default here")
def test_modules_side_by_side_build_their_copies_in_place_of_their_own_where_eager_copy_is_clearly_faster(tmp_path):
    """Beside another module, one chain per module: where eager's bf16 copy ran clearly faster (timed in turns before
    any build), TorchScript's fp32 build comes after its bf16 copy on the module's one worker, and is not built once
    the copy verified."""
    def layers(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)]).eval()

    first = nav.Module(FastInBf16(layers(0)), name="fast_a", batching=False)
    second = nav.Module(FastInBf16(layers(1)), name="fast_b", batching=False)
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "TorchScriptCPU"), profile_time_s=0.2,
                                parallel_modules=2, pipeline_repeats=0)
    items = [(1, torch.randn(64, 1024)), (1, torch.randn(64, 1024))]
    with torch.no_grad():
        status = nav.optimize(lambda x: second(first(x)), items, config)
    for name in ("fast_a", "fast_b"):
        records = {c.name: c for g in status.modules[name].graphs for c in g.candidates}
        copy, own = records["TorchScriptCPU[bf16]"], records["TorchScriptCPU"]
        assert copy.verified, copy
        assert own.status == "skipped" and own.error.startswith("not built: TorchCPU[bf16] was "), own
        assert own.window is None, own  # never sent to a worker


@pytest.mark.skipif(not cpu_computes_bf16(), reason="this CPU has no bf16 arithmetic (AVX512-BF16 or AMX): a "
                                                    "module alone gets no worker for its copies")
def test_the_last_module_of_a_run_builds_on_two_workers(tmp_path):
    """Three modules two at a time: the last one starts as another ends, and is optimized as alone: its candidates
    build on two workers (the SD text encoder's builds took ~8 s on one while the other core idled)."""
    torch.manual_seed(0)
    nets = [nn.Sequential(nn.Linear(16, 32 * (3 - i)), nn.ReLU(), nn.Linear(32 * (3 - i), 8)).eval() for i in range(3)]
    modules = [nav.Module(net, name=f"tail_{i}") for i, net in enumerate(nets)]  # the largest first: tail_2 last
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "OnnxCPU", "TorchScriptCPU"),
                                profile_time_s=0.05, parallel_modules=2, pipeline_repeats=0)

    def pipeline(x):
        return sum(m(x) for m in modules)

    status = nav.optimize(pipeline, [(1, torch.randn(1, 16)), (1, torch.randn(1, 16))], config)
    for name in ("tail_0", "tail_1"):
        records = {c.name: c for g in status.modules[name].graphs for c in g.candidates}
        assert records["OnnxCPU"].pid == records["TorchScriptCPU"].pid, records  # one worker each
    records = {c.name: c for g in status.modules["tail_2"].graphs for c in g.candidates}
    onnx, script = records["OnnxCPU"], records["TorchScriptCPU"]
    assert onnx.verified and script.verified, records
    # Built by two workers (the second may still be starting when the first build ends: no overlap is promised).
    assert onnx.pid != script.pid, (onnx.pid, script.pid)
