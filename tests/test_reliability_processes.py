"""Faults between processes: nav.optimize killed with SIGKILL mid-run, and two nav.optimize runs on the
same module. Each run is a real script in a subprocess (spawned workers, the default)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
from filelock import FileLock

from navdeploy.workspace.checkpoint import CHECKPOINT
from navdeploy.workspace.layout import artifact_path, build_dir
from navdeploy.workspace.manifest import read_manifest, write_manifest

SCRIPT = textwrap.dedent('''
    import gc, json, os, sys, time
    import torch
    from torch import nn
    import navdeploy as nav


    class Slow(nn.Module):
        """TorchScript tracing of 3-d inputs takes NAV_TEST_SLOW seconds (i.e. one candidate is slow)."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            if torch.jit.is_tracing() and x.dim() == 3:
                if os.environ.get("NAV_TEST_SLEEPING"):
                    open(os.environ["NAV_TEST_SLEEPING"], "w").close()
                time.sleep(float(os.environ.get("NAV_TEST_SLOW", "0")))
            return self.linear(x).relu()


    def build():
        torch.manual_seed(0)
        return Slow().eval()


    if __name__ == "__main__":
        workspace, name, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
        module = nav.Module(build(), name=name)
        config = nav.OptimizeConfig(workspace=workspace, target_formats=(nav.Format.TORCHSCRIPT, nav.Format.ONNX),
                                    runners=("TorchCPU", "TorchScriptCPU", "OnnxCPU"), batch_sizes=(1, 2),
                                    max_batch_size=2, profile_time_s=0.05, timeout_s=timeout, pipeline_repeats=0)
        data = [(1, torch.randn(1, 4)), (2, torch.randn(2, 4)), (1, torch.randn(1, 3, 4))]
        try:
            status = nav.optimize(module, data, config)
        except nav.WorkspaceError as exc:
            print("WORKSPACE_ERROR", exc, flush=True)
            sys.exit(3)
        graphs = {g.key: {c.name: {"status": c.status, "cached": c.cached} for c in g.candidates}
                  for g in status.modules[name].graphs}
        # Load what is on disk, as a fresh process would (the same binding path as nav.load_optimized).
        del module
        gc.collect()
        again = nav.Module(build(), name=name)
        loaded = nav.load_optimized(workspace)[name]
        x = torch.randn(2, 3, 4)
        torch.testing.assert_close(again(x), again.__wrapped__(x), atol=1e-4, rtol=1e-3)
        # bound: the selection is in place (a runner, or eager where eager won: a Linear(4, 4) gains less than routing)
        print("RESULT", json.dumps({"graphs": graphs, "loaded": loaded, "bound": again.nav_state.bound}), flush=True)
''')

# The optimize loop writes a checkpoint after each candidate (navdeploy.workspace.checkpoint.checkpoint_graph), so a
# killed run's completed candidates are not run again.


def _start(script: Path, workspace: Path, name: str, slow: float, marker: str, timeout: float = 120,
           build_workers: int = 1, sleeping: Path | None = None) -> subprocess.Popen:
    env = {**os.environ, "NAV_TEST_SLOW": str(slow), "NAV_TEST_MARKER": marker, "NAVDEPLOY_CONSOLE_OUTPUT": "simple",
           "NAVDEPLOY_BUILD_WORKERS": str(build_workers), "NAV_TEST_SLEEPING": str(sleeping or "")}
    env.pop("NAVDEPLOY_USE_MULTIPROCESSING", None)
    env.pop("NAVIGATOR_USE_MULTIPROCESSING", None)
    return subprocess.Popen([sys.executable, str(script), str(workspace), name, str(timeout)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen, timeout: float = 180) -> tuple[dict | None, str, str]:
    out, err = proc.communicate(timeout=timeout)
    line = next((line for line in out.splitlines() if line.startswith("RESULT ")), None)
    return (json.loads(line[len("RESULT "):]) if line else None), out, err


def _marked_processes(marker: str) -> list[int]:
    """Live processes started with NAV_TEST_MARKER=marker (the script and its spawned workers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if f"NAV_TEST_MARKER={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "optimize_slow.py"
    path.write_text(SCRIPT)
    return path


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find orphaned workers")
def test_kill_9_mid_run_then_the_next_run_starts_cleanly_and_reuses_what_was_done(script, tmp_path):
    workspace, name, marker = tmp_path / "ws", "rel_kill", uuid.uuid4().hex
    folder = workspace / name
    log, sleeping = folder / "navdeploy.log", tmp_path / "sleeping"
    proc = _start(script, workspace, name, slow=120, marker=marker, sleeping=sleeping)
    try:
        # Graph 1 (2-d inputs) finishes all three candidates; graph 2 (3-d) finishes eager and what the search
        # order puts before TorchScript, then hangs tracing.
        _wait_for(lambda: sleeping.exists() or proc.poll() is not None, 150, "the second graph's TorchScript trace")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert len(_marked_processes(marker)) >= 2, "the candidate should run in a spawned worker"
        # Done in both graphs: verified and fully profiled ("ok") or screened (the quick search's timing order
        # decides which); a leader's later "full profile ok" line is not counted twice.
        text = log.read_text()
        finished = {n: len(re.findall(rf" {n}: (?:ok|screened)\b", text)) >= 2
                    for n in ("TorchCPU", "TorchScriptCPU", "OnnxCPU")}
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    # The worker does not outlive the run: an orphan would keep writing into the module folder.
    _wait_for(lambda: not _marked_processes(marker), 10, "the orphaned worker to exit")

    assert not (folder / "manifest.json").exists()  # written only when a module is done
    assert (folder / ".lock").exists()  # left behind by the dead process ...
    lock = FileLock(str(folder / ".lock"))
    lock.acquire(timeout=0)  # ... but not held: flock is released by the kernel when its holder dies
    lock.release()
    half_written = [p for p in folder.rglob("*") if ".tmp" in p.name]
    graph_dirs = [p for p in folder.iterdir() if p.is_dir()]
    assert len(graph_dirs) == 2

    rerun = _start(script, workspace, name, slow=0, marker=marker)
    result, out, err = _result(rerun)
    assert rerun.returncode == 0 and result, err[-3000:]
    assert "waiting" not in err  # the stale lock file did not block
    assert not [p for p in folder.rglob("*") if ".tmp" in p.name], f"left over: {half_written}"
    assert result["loaded"] and result["bound"]
    manifest = json.loads((folder / "manifest.json").read_text())
    for key, entry in manifest["graphs"].items():
        assert all(c["status"] in ("ok", "screened") for c in entry["candidates"]), entry["candidates"]
        named = {artifact_path(folder / key, fmt, state["checksum"]) for fmt, state in entry["formats"].items()}
        assert all(p.is_dir() for p in named)  # every artifact the manifest names is complete and in place
        # ... and nothing else: the killed run's builds went once the manifest was switched
        assert {p for p in (folder / key).iterdir() if p.is_dir()} == named

    cached = {key: {n: c["cached"] for n, c in g.items()} for key, g in result["graphs"].items()}
    done_graph = next(k for k, g in cached.items() if all(g.values()))  # graph 1: everything reused
    (other,) = [k for k in cached if k != done_graph]
    assert finished["TorchCPU"] and not finished["TorchScriptCPU"], finished
    # What finished before the kill is reused, the rest is built. A reused screened candidate may still get its
    # full profile now (it leads once the rest is in), so "built again" is read from the re-run's log lines.
    rerun_log = log.read_text().rsplit(f"optimizing {name}:", 1)[1]
    built_again = {n: bool(re.search(rf"graph {other} {n}: (?:ok|screened|failed)\b", rerun_log)) for n in finished}
    assert built_again == {n: not done for n, done in finished.items()}, rerun_log


def test_two_runs_on_the_same_module_wait_or_fail_clearly(script, tmp_path):
    workspace, name, marker = tmp_path / "ws", "rel_lock", uuid.uuid4().hex
    folder = workspace / name
    first = _start(script, workspace, name, slow=6, marker=marker)
    try:
        _wait_for(lambda: (folder / ".lock.owner").exists() or first.poll() is not None, 120, "the first run's lock")
        assert first.poll() is None, first.communicate()[1][-3000:]
        impatient = _start(script, workspace, name, slow=0, marker=marker, timeout=1)  # gives up after 1 s
        patient = _start(script, workspace, name, slow=0, marker=marker)  # waits for the first run
        _, out, err = _result(impatient)
        assert impatient.returncode == 3, err[-3000:]
        message = out + err
        assert f"module folder {folder} is locked by another nav.optimize run" in message
        assert f"held by pid {first.pid}" in message and "gave up after 1 s" in message
        assert "another workspace" in message
        first_result, _, first_err = _result(first)
        assert first.returncode == 0 and first_result, first_err[-3000:]
        patient_result, _, patient_err = _result(patient)
        assert patient.returncode == 0 and patient_result, patient_err[-3000:]
    finally:
        for p in (first,):
            if p.poll() is None:
                p.kill()
    assert "waiting up to" in patient_err and f"held by pid {first.pid}" in patient_err
    # The patient run found everything done by the first one and rebuilt nothing.
    assert all(c["cached"] for g in patient_result["graphs"].values() for c in g.values()), patient_result
    assert patient_result["bound"] and not (folder / ".lock.owner").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find orphaned workers")
def test_ctrl_c_stops_a_run_with_parallel_builds_and_its_workers_at_once(script, tmp_path):
    """SIGINT to the optimizing process alone (its workers get none) while one of two build workers hangs for
    120 s: the run ends within seconds, not at the candidate's timeout, and leaves no worker behind."""
    workspace, name, marker = tmp_path / "ws", "rel_sigint", uuid.uuid4().hex
    log = workspace / name / "navdeploy.log"
    proc = _start(script, workspace, name, slow=120, marker=marker, build_workers=2)
    try:
        # Graph 1 (2-d inputs) finishes its three candidates; graph 2's TorchScript candidate then hangs tracing,
        # and its eager one, beside it, waits to profile until that build ends.
        # (each "ok", or "screened" by the search)
        _wait_for(lambda: log.exists() and len(re.findall(r"CPU: (?:ok|screened)\b", log.read_text())) >= 3
                  or proc.poll() is not None, 150, "the first graph's candidates")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(3)
        assert len(_marked_processes(marker)) >= 3, "two workers should be running"
        os.kill(proc.pid, signal.SIGINT)
        start = time.monotonic()
        _, err = proc.communicate(timeout=30)
        stopped_s = time.monotonic() - start
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0 and "KeyboardInterrupt" in err, err[-3000:]
    assert stopped_s < 20, f"took {stopped_s:.0f} s to stop"
    _wait_for(lambda: not _marked_processes(marker), 10, "the workers to exit")
    # The workers navdeploy killed to stop are not failed candidates: nothing of the kind was recorded for the
    # next run to reuse.
    records = [c for path in (workspace / name).glob(f"*/{CHECKPOINT}")
               for c in json.loads(path.read_text())["candidates"]]
    assert records and not [c for c in records if c["status"] not in ("ok", "screened")], records


SIDE_BY_SIDE = textwrap.dedent('''
    import json, os, sys, time
    from pathlib import Path
    import torch
    from torch import nn
    import navdeploy as nav


    class Net(nn.Module):
        """Tracing 3-d inputs for TorchScript hangs once NAV_TEST_HANG names a file (touched first)."""

        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            if torch.jit.is_tracing() and x.dim() == 3 and os.environ.get("NAV_TEST_HANG"):
                Path(os.environ["NAV_TEST_HANG"]).touch()
                time.sleep(600)
            return self.linear(x).relu()


    if __name__ == "__main__":
        mode, workspace, name = sys.argv[1], sys.argv[2], sys.argv[3]
        torch.manual_seed(0)
        module = nav.Module(Net().eval(), name=name)
        if mode == "load":
            loaded = nav.load_optimized(workspace)[name]
            x = torch.randn(2, 4)
            with torch.no_grad():
                same = torch.allclose(module(x), module.__wrapped__(x), atol=1e-5)
            print("RESULT", json.dumps({"loaded": loaded, "optimized": module.is_optimized, "same": same}))
            sys.exit(0)
        # "first": one graph, batches up to 2. "rerun": batches up to 4 (every artifact of that graph is built
        # again, into new folders), then a second graph whose TorchScript trace hangs.
        data = [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))]
        if mode == "rerun":
            data.append((1, torch.randn(1, 3, 4)))
        config = nav.OptimizeConfig(workspace=workspace, runners=("TorchCPU", "TorchExportCPU", "TorchScriptCPU"),
                                    batch_sizes=(1, 2), max_batch_size=2 if mode == "first" else 4,
                                    profile_time_s=0.05, pipeline_repeats=0)
        with torch.no_grad():
            nav.optimize(module, data, config)
        print("DONE", flush=True)
''')


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc to find orphaned workers")
def test_a_rerun_killed_after_building_new_artifacts_leaves_the_previous_result_loadable(tmp_path):
    """kill -9 of a re-run after it built new artifacts of a graph, before its manifest switch: the previous,
    complete optimization still binds in a fresh process, to the artifacts it was verified with."""
    script, workspace, name, marker = tmp_path / "side_by_side.py", tmp_path / "ws", "rel_side", uuid.uuid4().hex
    script.write_text(SIDE_BY_SIDE)
    hang = tmp_path / "hanging"
    env = {**os.environ, "NAV_TEST_MARKER": marker, "NAVDEPLOY_CONSOLE_OUTPUT": "simple"}
    for key in ("NAVDEPLOY_USE_MULTIPROCESSING", "NAVIGATOR_USE_MULTIPROCESSING", "NAVDEPLOY_BUILD_WORKERS"):
        env.pop(key, None)

    def run(mode: str, **extra: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(script), mode, str(workspace), name], env={**env, **extra},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    first = run("first")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0 and "DONE" in out, err[-3000:]
    folder = workspace / name
    manifest = read_manifest(folder)
    ((key, entry),) = manifest.graphs.items()
    entry.selected = "TorchExportCPU"  # chosen by hand: which runner wins a Linear(4, 4) is timing noise
    manifest.reverted = None
    write_manifest(folder, manifest)
    state = entry.formats["torch-exportedprogram"]
    previous = folder / key / build_dir("torch-exportedprogram", state.checksum)
    assert previous.is_dir()

    rerun = run("rerun", NAV_TEST_HANG=str(hang))
    try:
        _wait_for(lambda: hang.exists() or rerun.poll() is not None, 240, "the re-run to reach the second graph")
        assert rerun.poll() is None, rerun.communicate()[1][-3000:]
        os.kill(rerun.pid, signal.SIGKILL)
        rerun.wait(10)
    finally:
        if rerun.poll() is None:
            rerun.kill()
    _wait_for(lambda: not _marked_processes(marker), 10, "the orphaned worker to exit")
    # The re-run built the first graph's artifacts again, beside the previous ones, and never switched the manifest.
    rebuilt = [p for p in (folder / key).iterdir() if p.name.startswith("torch-exportedprogram.") and p != previous]
    assert rebuilt, sorted(p.name for p in (folder / key).iterdir())
    assert read_manifest(folder).graphs[key].formats["torch-exportedprogram"].checksum == state.checksum

    load = run("load")
    out, err = load.communicate(timeout=300)
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    assert load.returncode == 0 and line, err[-3000:]
    result = json.loads(line[len("RESULT "):])
    assert result == {"loaded": True, "optimized": True, "same": True}, (result, err[-3000:])
