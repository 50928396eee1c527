"""Candidates built side by side (``build_workers``): builds overlap, profiling runs alone, results as with one."""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import threading
import time

import pytest
import torch
from stand_ins import linear_job
from torch import nn

import navdeploy as nav
from navdeploy.candidates.build import Job, Task
from navdeploy.candidates.isolation import Executor, ExecutorPool, RunStopped
from navdeploy.candidates.timing_gate import TimingGate
from navdeploy.capture.recorder import Recorder
from navdeploy.config import build_workers
from navdeploy.errors import ConfigError

RUNNERS = ("TorchCPU", "TorchScriptCPU", "TorchExportCPU", "OnnxCPU")


def _thread(fn) -> threading.Thread:
    t = threading.Thread(target=fn, daemon=True)
    t.start()
    return t


def test_builds_hold_the_gate_side_by_side():
    gate = TimingGate()
    both_inside = threading.Barrier(2, timeout=5)  # broken (an error) unless two builds are inside at once

    def build() -> None:
        with gate.task():
            both_inside.wait()

    threads = [_thread(build), _thread(build)]
    for t in threads:
        t.join(10)
    assert not both_inside.broken


def test_timing_waits_for_running_builds_and_stops_new_ones():
    gate = TimingGate()
    events: list[str] = []
    build_started, timer_waiting = threading.Event(), threading.Event()

    def early_build() -> None:
        with gate.task():
            build_started.set()
            timer_waiting.wait(5)
            time.sleep(0.2)  # the timer is waiting now; it must not get in before this build ends
            events.append("early build ends")

    def timer() -> None:
        build_started.wait(5)
        with gate.task() as slot:
            timer_waiting.set()
            slot.timing()
            events.append("timing starts")
            time.sleep(0.2)
            events.append("timing ends")

    def late_build() -> None:
        deadline = time.monotonic() + 5
        while not (gate._waiting or gate._timing) and time.monotonic() < deadline:
            time.sleep(0.005)
        with gate.task():  # asked while the timer waits (or times): it goes after the timing
            events.append("late build starts")

    threads = [_thread(early_build), _thread(timer), _thread(late_build)]
    for t in threads:
        t.join(10)
    assert events == ["early build ends", "timing starts", "timing ends", "late build starts"]


def test_an_exclusive_task_runs_alone():
    gate = TimingGate()
    inside, events = threading.Event(), []

    def exclusive() -> None:
        with gate.task(exclusive=True):
            inside.set()
            time.sleep(0.2)
            events.append("exclusive ends")

    def build() -> None:
        inside.wait(5)
        with gate.task():
            events.append("build starts")

    threads = [_thread(exclusive), _thread(build)]
    for t in threads:
        t.join(10)
    assert events == ["exclusive ends", "build starts"]


def test_stop_while_a_worker_starts_leaves_no_worker_and_no_record(tmp_path):
    """Ctrl-C lands while a chain's worker is still starting (spawn + import torch take seconds): the task raises
    RunStopped, not a failed record or an AttributeError, and no worker is left running."""
    module = nn.Linear(4, 4).eval()
    recorder = Recorder("stop_start", 4, None)
    recorder.record(module, (torch.randn(2, 4),), {})
    graph = recorder.finish()[0]
    job = Job("stop_start", module, None, {graph.key: graph}, tmp_path, "cpu", "fp32", {"fp32": (1e-4, 1e-3)}, None,
              (1, 2), 2, 0.05)
    executor = Executor(job, True, 60, tmp_path / "navdeploy.log")
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["record"] = executor.run(Task(graph.key, "TorchCPU", False, "fp32"))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            outcome["error"] = exc

    thread = _thread(run)
    deadline = time.monotonic() + 30
    while executor._proc is None and time.monotonic() < deadline:  # the worker process exists, not yet ready
        time.sleep(0.01)
    executor.stop()
    thread.join(30)
    assert isinstance(outcome.get("error"), RunStopped), outcome
    assert executor._proc is None and not multiprocessing.active_children()
    with pytest.raises(RunStopped):  # and nothing starts afterwards
        executor.run(Task(graph.key, "TorchCPU", False, "fp32"))


def test_loading_prepared_beside_builds_runs_once_as_a_build_when_started_and_the_pool_waits_for_it(tmp_path):
    """What the parent prepares while workers build (Inductor's imports and ISA probe before a bind) waits until
    it is started (a build runs only compilers, or ended), then holds the gate as a build: a timing waits for it
    to end. It runs once per pool, the pool's exit waits for it, and without isolation (candidates build in this
    process, doing the same work) it does not run."""
    events: list[str] = []
    started = threading.Event()

    def prepare() -> None:
        started.set()
        time.sleep(0.3)
        events.append("prepared")

    with ExecutorPool(linear_job(tmp_path, "beside"), True, 60, tmp_path / "navdeploy.log") as pool:
        pool.prepare_to_load(prepare)
        assert not started.wait(0.3)  # held back until started
        pool.start_preparing()
        pool.prepare_to_load(prepare)  # once
        pool.start_preparing()
        assert started.wait(5)
        with pool._gate.task() as slot:  # as a worker's task does before it profiles
            slot.timing()
            events.append("timing")
    assert events == ["prepared", "timing"]

    with ExecutorPool(linear_job(tmp_path, "beside_inline"), False, 60, tmp_path / "navdeploy.log") as pool:
        pool.prepare_to_load(prepare)
        pool.start_preparing()
    assert events == ["prepared", "timing"]

    with ExecutorPool(linear_job(tmp_path, "never_started"), True, 60, tmp_path / "navdeploy.log") as pool:
        pool.prepare_to_load(prepare)  # no build said it compiles, none ended: the exit does not run it
    assert events == ["prepared", "timing"]


def test_build_workers_setting(monkeypatch):
    assert build_workers(nav.OptimizeConfig()) == 1
    monkeypatch.setenv("NAVDEPLOY_BUILD_WORKERS", "3")
    assert build_workers(nav.OptimizeConfig()) == 3
    assert build_workers(nav.OptimizeConfig(build_workers=2)) == 2  # the config wins
    monkeypatch.setenv("NAVDEPLOY_BUILD_WORKERS", "many")
    with pytest.raises(ConfigError, match="NAVDEPLOY_BUILD_WORKERS='many'"):
        build_workers(nav.OptimizeConfig())
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ConfigError, match="build_workers="):
            nav.OptimizeConfig(build_workers=bad)


def _optimize(tmp_path, name: str, workers: int):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    module = nav.Module(inner, name=name)
    config = nav.OptimizeConfig(workspace=tmp_path, runners=RUNNERS, batch_sizes=(1, 2), max_batch_size=2,
                                profile_time_s=0.2, build_workers=workers, thorough=True)  # every one profiled
    # Two input structures, so two graphs: the second runs on the workers the first one started.
    data = [(1, torch.randn(1, 16)), (2, torch.randn(2, 16)), (1, torch.randn(1, 3, 16))]
    status = nav.optimize(module, data, config)
    return module, inner, status.modules[name].graphs


def test_parallel_builds_profile_alone_and_give_the_same_candidates(tmp_path):
    module, inner, graphs = _optimize(tmp_path, "parallel", workers=2)
    assert len(graphs) == 2
    for graph in graphs[1:]:
        assert all(c.status == "ok" for c in graph.candidates), [(c.runner, c.error) for c in graph.candidates]
    records = graphs[0].candidates
    # The manifest keeps the candidates in the order the search builds them.
    from navdeploy.optimize.module import candidate_pairs

    assert [c.runner for c in records] == [r.name for r, _ in candidate_pairs(nav.OptimizeConfig(runners=RUNNERS),
                                                                               "cpu", "fp32")]
    assert all(c.status == "ok" for c in records), [(c.runner, c.error) for c in records]
    assert len({c.pid for c in records}) >= 2 and os.getpid() not in {c.pid for c in records}
    windows = {c.runner: c.window for c in records}
    builds = {r: (w.start, w.verified) for r, w in windows.items()}  # build, load and verify
    profiles = {r: (w.profile, w.end) for r, w in windows.items()}

    def overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
        return a[0] < b[1] and b[0] < a[1]

    assert any(overlap(builds[a], builds[b]) for a in builds for b in builds if a != b), \
        f"no two candidates were built side by side: {windows}"
    # Eager, the baseline, runs first and alone: its profile never waits for a build that started beside it.
    assert all(windows["TorchCPU"].end <= w.start for r, w in windows.items() if r != "TorchCPU"), windows
    for runner, profiling in profiles.items():
        for other in windows:
            if other != runner:  # nothing else ran while this candidate profiled: no build, no other profile
                assert not overlap(builds[other], profiling) and not overlap(profiles[other], profiling), \
                    f"{other} ran while {runner} profiled: {windows}"
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(module(x), inner(x), atol=1e-4, rtol=1e-3)

    _, _, sequential = _optimize(tmp_path, "sequential", workers=1)
    assert [c.name for c in sequential[0].candidates] == [c.name for c in records]
    assert len({c.pid for g in sequential for c in g.candidates}) == 1  # one worker runs every candidate


def test_a_runner_that_cannot_run_here_is_skipped_without_a_worker(tmp_path, monkeypatch):
    """Decided in this process: no worker starts for it, and a ``builds_alone`` runner (TensorRT when it is not
    installed) never makes the other builds wait for a gate it would only hold to say "skipped"."""
    from navdeploy.formats import registry as formats

    missing = dataclasses.replace(formats.RUNNERS["TorchScriptCPU"], requires=("a_package_that_is_not_here",),
                                  builds_alone=True)
    monkeypatch.setitem(formats.RUNNERS, "TorchScriptCPU", missing)  # this process only: a worker would build it
    module = nav.Module(nn.Linear(4, 4).eval(), name="unavailable")
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "TorchScriptCPU", "TorchExportCPU"),
                                batch_sizes=(1, 2), max_batch_size=2, profile_time_s=0.05, build_workers=2)
    status = nav.optimize(module, [(1, torch.randn(1, 4))], config)
    records = {c.runner: c for c in status.modules["unavailable"].graphs[0].candidates}
    skipped = records["TorchScriptCPU"]
    assert skipped.status == "skipped" and "a_package_that_is_not_here" in skipped.error
    assert skipped.pid is None and skipped.window is None  # no worker ran it
    assert records["TorchExportCPU"].verified and records["TorchCPU"].verified
