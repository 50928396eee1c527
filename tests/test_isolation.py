"""A candidate that crashes, hangs or raises is marked failed with the reason; optimize carries on."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from stand_ins import linear_job
from torch import nn

import navdeploy as nav
from navdeploy.candidates.build import Task
from navdeploy.candidates.imports_ahead import defining_modules
from navdeploy.candidates.isolation import Executor, Payload, WorkerHub, _lock, remove_stale_worker_files

FAST = dict(batch_sizes=(1, 2), max_batch_size=2, profile_time_s=0.05)


class Faulty(nn.Module):
    """Fine when run eagerly; misbehaves only while TorchScript traces it (i.e. inside one candidate)."""

    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if torch.jit.is_tracing():
            if self.fault == "segfault":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif self.fault == "oom":
                # What the kernel's OOM killer does to a process; a real OOM would take the machine down with it.
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.fault == "hang":
                time.sleep(600)
            elif self.fault == "raise":
                raise RuntimeError("boom while tracing")
        return self.linear(x).relu()


def _optimize(fault: str, tmp_path, **config):
    torch.manual_seed(0)
    module = nav.Module(Faulty(fault).eval(), name=f"faulty_{fault}_{len(config)}")
    cfg = nav.OptimizeConfig(workspace=tmp_path, target_formats=(nav.Format.TORCH, nav.Format.TORCHSCRIPT,
                                                                 nav.Format.ONNX),
                             runners=("TorchCPU", "TorchScriptCPU", "OnnxCPU"), **FAST, **config)
    status = nav.optimize(module, [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))], cfg)
    records = {c.runner: c for c in status.modules[module.name].graphs[0].candidates}
    return module, records


@pytest.mark.parametrize("fault, reason", [("segfault", "died with SIGSEGV in "), ("hang", "timed out after 10 s"),
                                           ("oom", "died with SIGKILL, likely out of memory"),
                                           ("raise", "boom while tracing")])
def test_faulty_candidate_fails_alone(fault, reason, tmp_path):
    module, records = _optimize(fault, tmp_path, timeout_s=10)
    assert records["TorchScriptCPU"].status == "failed"
    assert reason in records["TorchScriptCPU"].error
    # A kill from outside or a timeout may pass on the next run (retried once); a crash or an error recurs.
    assert records["TorchScriptCPU"].transient is (fault in ("hang", "oom"))
    if fault == "segfault":  # the worker's faulthandler dump names where the crash happened
        assert "tests/test_isolation.py:" in records["TorchScriptCPU"].error
        assert " in forward (stack in " in records["TorchScriptCPU"].error
    # The next candidate runs in a fresh worker and is unaffected.
    assert records["OnnxCPU"].verified, records["OnnxCPU"].error  # profiled in full or screened: timing decides
    assert records["TorchCPU"].verified  # eager is screened too, and profiled in full only where it leads
    assert records["OnnxCPU"].pid != os.getpid()  # it ran in a spawned child
    x = torch.randn(2, 4)
    torch.testing.assert_close(module(x), module.__wrapped__(x), atol=1e-4, rtol=1e-3)


def test_a_crash_beside_other_builds_fails_alone(tmp_path):
    """With two build workers the crashing candidate's thread releases the timing gate: the others finish."""
    module, records = _optimize("segfault", tmp_path, build_workers=2)
    assert "died with SIGSEGV in " in records["TorchScriptCPU"].error
    assert records["OnnxCPU"].verified and records["TorchCPU"].verified
    x = torch.randn(2, 4)
    torch.testing.assert_close(module(x), module.__wrapped__(x), atol=1e-4, rtol=1e-3)


class CrashTogether(nn.Module):
    """Segfaults while TorchScript traces it and while torch.export exports it, in two different functions, the
    two workers meeting first so that both dumps reach the shared log within milliseconds."""

    def __init__(self, meeting: str):
        super().__init__()
        self.meeting = meeting
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if torch.compiler.is_exporting():
            meet(self.meeting, "export")
            crash_while_exporting()
        elif torch.jit.is_tracing():
            meet(self.meeting, "trace")
            time.sleep(0.02)  # just after the export worker's crash, before the parent can read the log
            crash_while_tracing()
        return self.linear(x).relu()


def meet(folder: str, me: str) -> None:
    """Wait (up to 60 s) until the other candidate is here too; ``met-<me>`` says it came in time."""
    Path(folder, me).touch()
    deadline = time.monotonic() + 60
    while len([p for p in Path(folder).iterdir() if not p.name.startswith("met-")]) < 2:
        if time.monotonic() > deadline:
            return
        time.sleep(0.005)
    Path(folder, f"met-{me}").touch()


def crash_while_exporting():
    os.kill(os.getpid(), signal.SIGSEGV)


def crash_while_tracing():
    os.kill(os.getpid(), signal.SIGSEGV)


def test_two_crashes_at_once_each_name_their_own_frame(tmp_path):
    """Side by side, each worker's faulthandler dump is its own: a crash site is never another candidate's."""
    (tmp_path / "meeting").mkdir()
    module = nav.Module(CrashTogether(str(tmp_path / "meeting")).eval(), name="crash_together")
    # ONNX exports through torch.export in a chain of its own (the ExportedProgram runner would follow TorchScript
    # in one chain, never beside it).
    cfg = nav.OptimizeConfig(workspace=tmp_path / "ws", target_formats=(nav.Format.TORCH, nav.Format.TORCHSCRIPT,
                                                                        nav.Format.ONNX),
                             runners=("TorchCPU", "TorchScriptCPU", "OnnxCPU"), build_workers=3, **FAST)
    status = nav.optimize(module, [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))], cfg)
    records = {c.runner: c for c in status.modules[module.name].graphs[0].candidates}
    assert sorted(p.name for p in (tmp_path / "meeting").iterdir()) == ["export", "met-export", "met-trace",
                                                                          "trace"]  # they did meet
    assert "died with SIGSEGV in " in records["OnnxCPU"].error, records["OnnxCPU"].error
    assert " in crash_while_exporting (stack in " in records["OnnxCPU"].error
    assert " in crash_while_tracing (stack in " in records["TorchScriptCPU"].error, records["TorchScriptCPU"].error
    assert records["TorchCPU"].verified  # eager is screened too, and profiled in full only where it leads
    log = (tmp_path / "ws" / module.name / "navdeploy.log").read_text()
    assert log.count("Fatal Python error: Segmentation fault") == 2  # both dumps kept in the module's log
    # No faults file of this process's workers is left behind.
    assert not list(Path(tempfile.gettempdir()).glob(f"navdeploy-worker-{os.getpid()}-*.faults"))


def test_in_process_mode_still_survives_an_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("NAVIGATOR_USE_MULTIPROCESSING", "False")  # the peer's name is accepted too
    _, records = _optimize("raise", tmp_path)
    assert records["TorchScriptCPU"].status == "failed" and "boom" in records["TorchScriptCPU"].error
    assert records["OnnxCPU"].verified
    assert records["OnnxCPU"].pid == os.getpid()  # no child process was used


def test_crash_site_is_read_from_the_crashing_threads_dump_and_kept_in_the_log(tmp_path):
    from navdeploy.candidates.isolation import _describe_exit

    log, faults = tmp_path / "navdeploy.log", tmp_path / "worker.faults"
    log.write_text("earlier lines\n")
    current = ('Fatal Python error: Segmentation fault\n\nThread 0x01 (most recent call first):\n'
               '  File "/usr/lib/python3.11/threading.py", line 327 in wait\n\n'
               'Current thread 0x02 (most recent call first):\n'
               '  File "/site/torch/_inductor/package.py", line 9 in load\n'
               '  File "/site/navdeploy/candidate.py", line 5 in run_task\n\nExtension modules: torch._C\n')
    faults.write_text(current)
    assert _describe_exit(-11, log, faults).startswith("the candidate process died with SIGSEGV in torch/_inductor/"
                                                       f"package.py:9 in load (stack in {log})")
    assert log.read_text() == "earlier lines\n" + current  # the dump is kept in the module's log
    assert faults.read_text() == ""  # and taken: the executor's next worker starts with an empty file
    # A SIGKILL leaves no dump: nothing is read, even if the file held something.
    faults.write_text(current)
    assert _describe_exit(-9, log, faults) == "the candidate process died with SIGKILL, likely out of memory"
    # No dump: nothing to name.
    faults.write_text("")
    assert _describe_exit(-11, log, faults) == "the candidate process died with SIGSEGV"
    # A crash in a thread without Python (no "Current thread"), or one with no Python frame: nothing to name.
    faults.write_text('Fatal Python error: Segmentation fault\n\nThread 0x01 (most recent call first):\n'
                      '  File "/usr/lib/python3.11/threading.py", line 327 in wait\n')
    assert _describe_exit(-11, log, faults) == "the candidate process died with SIGSEGV"
    faults.write_text('Fatal Python error: Segmentation fault\n\nCurrent thread 0x02 (most recent call first):\n'
                      '  <no Python frame>\n\nThread 0x01 (most recent call first):\n'
                      '  File "/usr/lib/python3.11/threading.py", line 327 in wait\n')
    assert _describe_exit(-11, log, faults) == "the candidate process died with SIGSEGV"
    assert _describe_exit(-11, log, tmp_path / "missing.faults") == "the candidate process died with SIGSEGV"


_SEMAPHORE_SCRIPT = """
import multiprocessing, torch, navdeploy as nav
from torch import nn

class Locks(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if torch.jit.is_tracing():
            Locks.held = multiprocessing.RLock()  # a named semaphore, made in the worker (as tqdm does)
        return self.linear(x)

if __name__ == "__main__":
    module = nav.Module(Locks().eval(), name="locks")
    cfg = nav.OptimizeConfig(workspace=WORKSPACE, runners=("TorchCPU", "TorchScriptCPU"),
                             batch_sizes=(1,), max_batch_size=1, profile_time_s=0.05)
    nav.optimize(module, [(1, torch.randn(1, 4))], cfg)
    print("optimized", type(module.__wrapped__).__name__)
"""


def test_a_worker_ends_without_leaving_semaphores(tmp_path):
    """Workers end with os._exit; the semaphores made inside one are still unlinked, so the user's script ends
    without the resource tracker's 'leaked semaphore objects' warning."""
    script = tmp_path / "locks.py"
    script.write_text(_SEMAPHORE_SCRIPT.replace("WORKSPACE", repr(str(tmp_path / "ws"))))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "optimized Locks" in done.stdout
    assert "leaked semaphore" not in done.stderr, done.stderr[-3000:]


def _aoti_folders() -> set[Path]:
    return set(Path(tempfile.gettempdir()).glob("aotinductor_*"))


def own_files() -> set[Path]:
    """navdeploy's workers' files in the temp dir: faults files, folders, startup logs."""
    return set(Path(tempfile.gettempdir()).glob("navdeploy-worker-*"))


def test_a_worker_holding_an_aotinductor_runner_leaves_no_extracted_package(tmp_path):
    """torch's loader extracts a package into ``$TMPDIR/aotinductor_XXXXXX`` and removes it only when the loader
    is destroyed, which a worker ending with os._exit (or killed) never does: a runner kept for its profile left one
    folder per load in the user's temp dir. The worker extracts into a folder its executor removes."""
    job = linear_job(tmp_path, "kept_aoti")
    graph_key = next(iter(job.graphs))
    before = _aoti_folders()
    executor = Executor(job, True, 300, tmp_path / "navdeploy.log")
    try:
        record = executor.run(Task(graph_key, "AOTInductorCPU", True, "fp32", plan="screen", screen_batch=1,
                                   keep_below_ms=1e9))
        assert record.status == "screened", record.error
        folder = executor._folder
        assert folder is not None and folder.is_dir()
    finally:
        executor.close()
    assert not folder.exists()
    assert _aoti_folders() <= before


def test_a_worker_says_when_its_aotinductor_build_runs_only_compilers(tmp_path):
    """The parent prepares to load an AOTInductor winner (Inductor's imports, its ISA probe) once the build's Python
    work is done: the worker says so as the first compiler starts, while the task still runs, and not for a build
    that runs no compiler."""
    job = linear_job(tmp_path, "compiling")
    graph_key = next(iter(job.graphs))
    told: list[float] = []
    executor = Executor(job, True, 300, tmp_path / "navdeploy.log")
    executor.on_compiling = lambda: told.append(time.monotonic())
    try:
        record = executor.run(Task(graph_key, "OnnxCPU", True, "fp32", plan="build"))
        assert record.exported and told == [], record.error
        record = executor.run(Task(graph_key, "AOTInductorCPU", True, "fp32", plan="build"))
        ended = time.monotonic()
        assert record.exported, record.error
    finally:
        executor.close()
    assert len(told) == 1 and told[0] < ended


def test_an_optimize_leaves_none_of_its_workers_files_in_the_temp_dir(tmp_path):
    """Each worker's faults file, folder and log are removed as the run ends, also those of a worker started ahead of
    time that never got the module (the module's own worker may have served every candidate)."""
    before = own_files()
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "OnnxCPU"), **FAST)
    module = nav.Module(nn.Linear(4, 4).eval(), name="optimized")
    nav.optimize(module, [(1, torch.randn(2, 4))], config)
    assert own_files() <= before


def test_workers_started_ahead_of_time_and_never_used_leave_nothing(tmp_path):
    before = own_files()
    with WorkerHub() as hub:
        hub.prestart(2)
        assert len(own_files() - before) >= 2  # their startup logs, faults files and folders
    assert own_files() <= before



def test_the_modules_that_define_the_classes_are_named_once_without_torch():
    from stand_ins import SlowInBf16
    from transformers import BertConfig, BertModel

    bert = BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32))
    names = defining_modules([SlowInBf16(nn.Sequential(nn.Linear(2, 2))), bert])
    assert names[0] == "stand_ins" and "transformers.models.bert.modeling_bert" in names
    assert len(names) == len(set(names)) and not any(n == "torch" or n.startswith("torch.") for n in names)


def test_a_worker_started_ahead_imports_the_modules_of_its_first_job_before_it_gets_it(tmp_path, monkeypatch):
    """Unpickling the first job imports the modules that define its classes (diffusers and transformers: seconds);
    a worker started ahead of time imports them while the parent still captures. A module that fails to import is
    logged and leaves the worker as it was."""
    mark = tmp_path / "imported"
    monkeypatch.setenv("NAVDEPLOY_TEST_IMPORT_MARK", str(mark))
    with WorkerHub() as hub:
        hub.prestart(1, ["no_such_module_for_navdeploy", "stand_in_imported_ahead"])
        deadline = time.monotonic() + 60
        while not mark.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert mark.exists(), "the worker did not import the module before it had a job"
        [executor] = hub.take(1)
        job = linear_job(tmp_path, "imported_ahead")
        executor.assign(job, True, 300, tmp_path / "navdeploy.log", hub.gate, Payload(job))
        record = executor.run(Task(next(iter(job.graphs)), "TorchCPU", False, "fp32", plan="build"))
        assert record.status == "built", record.error
        assert mark.read_text() == str(executor._proc.pid)
        hub.give_back([executor])
    assert "importing no_such_module_for_navdeploy ahead of the first job failed" in \
        (tmp_path / "navdeploy.log").read_text()


def test_a_module_that_starts_while_another_profiles_takes_its_warm_worker_once_given_back(tmp_path):
    """The last module starts as the first one beside it ends, while the other still profiles: it takes the one
    warm worker idle then, and for its second, the worker the other gives back before that one is needed, not a
    new process (seconds of importing torch)."""
    from navdeploy.candidates.isolation import ExecutorPool

    for name in ("other", "last"):
        (tmp_path / name).mkdir()
    other, last = (linear_job(tmp_path / name, name) for name in ("other", "last"))
    with WorkerHub() as hub:
        hub.prestart(2)
        beside = ExecutorPool(other, True, 300, tmp_path / "other" / "navdeploy.log", 1, hub)
        [warm] = beside._all
        tail = ExecutorPool(last, True, 300, tmp_path / "last" / "navdeploy.log", 2, hub)
        [placeholder] = [e for e in tail._all if e.unstarted]  # no worker idle for it when the pool was made
        beside.__exit__(None, None, None)  # the module beside ends: its warm worker goes back to the hub
        with tail.borrow(prefer=placeholder) as executor:
            assert executor is warm and executor.job is last
            record = executor.run(Task(next(iter(last.graphs)), "TorchCPU", False, "fp32", plan="build"))
            assert record.status == "built", record.error
        assert placeholder not in tail._all and not any(e.unstarted for e in tail._all)
        tail.__exit__(None, None, None)


def test_the_worker_files_of_a_run_whose_process_is_gone_are_removed_by_the_next_run(tmp_path):
    """A run killed with SIGKILL leaves its workers' files (its workers die with it): the next run removes those
    of processes that no longer run, and only those: not a live process's, nor those whose lock is held (a run in
    another pid namespace that shares the temp dir, where its pid means nothing here)."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    root = Path(tempfile.gettempdir())
    stale_file = root / f"navdeploy-worker-{gone.pid}-abcd1234.faults"
    stale_folder = root / f"navdeploy-worker-{gone.pid}-efgh5678.tmp"
    locked_folder = root / f"navdeploy-worker-{gone.pid}-qrst7890.tmp"
    live_file = root / f"navdeploy-worker-{os.getpid()}-ijkl9012.faults"
    unrelated = root / "navdeploy-worker-notapid-mnop3456.faults"
    held = None
    try:
        for path in (stale_file, live_file, unrelated):
            path.write_text("")
        stale_folder.mkdir()
        (stale_folder / "aotinductor_x").mkdir()
        locked_folder.mkdir()
        held = _lock(locked_folder)
        assert held is not None
        remove_stale_worker_files()
        assert not stale_file.exists() and not stale_folder.exists()
        assert live_file.exists() and unrelated.exists() and locked_folder.exists()
    finally:
        if held is not None:
            os.close(held)
        for path in (stale_file, live_file, unrelated):
            path.unlink(missing_ok=True)
        shutil.rmtree(locked_folder, ignore_errors=True)


def test_an_executor_locks_its_worker_files_while_they_exist(tmp_path):
    job = linear_job(tmp_path, "locked")
    executor = Executor(job, True, 300, tmp_path / "navdeploy.log")
    try:
        record = executor.run(Task(next(iter(job.graphs)), "TorchCPU", False, "fp32", plan="build"))
        assert record.status == "built", record.error
        for path in (executor._faults, executor._folder):
            assert path is not None and path.exists()
            assert _lock(path) is None  # another open of it cannot take the lock
    finally:
        executor.close()
    assert not executor._held
