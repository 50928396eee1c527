"""Running candidates in a spawned child so a crash, hang or OOM costs one candidate, not the run.

One worker per module is started with the ``spawn`` context (never by changing the global start
method), receives the module once, then runs tasks one at a time. When it dies or overruns its
timeout it is killed, the candidate is marked failed with the reason, and the next task starts a
fresh worker.
"""

from __future__ import annotations

import contextlib
import ctypes
import faulthandler
import logging
import multiprocessing as mp
import multiprocessing.connection
import os
import queue
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import cloudpickle

from navdeploy.candidate import Job, Task, WorkerState, new_record, run_task
from navdeploy.formats import RUNNERS

log = logging.getLogger("navdeploy")
_READY_TIMEOUT_S = 300.0


class WorkerStartError(RuntimeError):
    """The worker child could not start (payload not picklable, or the child died while starting)."""


def _die_with_parent() -> None:
    """End this worker when the process that started it dies, even by ``kill -9``: an orphan would keep
    building and could move an artifact into a folder the next run already owns.

    On Linux the kernel sends SIGKILL (``PR_SET_PDEATHSIG``); elsewhere, and as a second line, a thread
    watches the parent's sentinel."""
    parent = mp.parent_process()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if parent is None:
        return
    if parent.pid != os.getppid():  # the parent died before the line above took effect
        os._exit(1)

    def watch() -> None:
        mp.connection.wait([parent.sentinel])
        os._exit(1)

    threading.Thread(target=watch, name="navdeploy-parent-watch", daemon=True).start()


def _worker_main(payload: bytes, tasks, results, log_path: str) -> None:
    _die_with_parent()
    # Exporters print a lot straight to the file descriptors; keep it in the module's log, off the console.
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    # A crash in native code (SIGSEGV in a compiled library) then leaves the Python stack in the log.
    faulthandler.enable()
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [worker] %(message)s"))
    logger = logging.getLogger("navdeploy")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    job: Job = cloudpickle.loads(payload)
    state = WorkerState()
    results.put(("ready", os.getpid()))
    while True:
        task = tasks.get()
        if task is None:
            return
        results.put(("result", run_task(job, task, state)))


def _describe_exit(code: Optional[int], log_path: Optional[Path] = None, log_offset: int = 0) -> str:
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = ", likely out of memory" if -code == signal.SIGKILL else ""
        # Only faulthandler's signals leave a dump; a SIGKILL (OOM) never does.
        dumps = -code in (signal.SIGSEGV, signal.SIGFPE, signal.SIGABRT, signal.SIGBUS, signal.SIGILL)
        where = _crash_site(log_path, log_offset) if log_path is not None and dumps else None
        site = f" in {where} (stack in {log_path})" if where else ""
        return f"the candidate process died with {name}{hint}{site}"
    return f"the candidate process exited with code {code}"


def _crash_site(log_path: Path, offset: int) -> Optional[str]:
    """The innermost Python frame of a faulthandler dump written to the worker's log after ``offset``, e.g.
    ``_inductor/package/package.py:123 in load_package``; None when there is none."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(offset, os.path.getsize(log_path) - 64_000))
            tail = f.read().decode("utf-8", "replace")
    except OSError:
        return None
    _, found, dump = tail.rpartition("Fatal Python error")
    _, current, stack = dump.partition("Current thread")
    if not found or not current:  # no dump, or the crash was in a thread without Python (e.g. an OpenMP worker)
        return None
    for line in stack.splitlines()[1:]:  # the crashing thread's frames, most recent first, up to a blank line
        line = line.strip()
        if not line:
            return None
        if line.startswith('File "'):
            path, _, rest = line[len('File "'):].partition('", line ')
            return f"{'/'.join(Path(path).parts[-3:])}:{rest}"
    return None


class Executor:
    """Runs tasks of one job, isolated in a worker child or in this process."""

    def __init__(self, job: Job, isolate: bool, timeout_s: float, log_path: Path):
        self.job = job
        self.isolate = isolate
        self.timeout_s = timeout_s
        self.log_path = log_path
        self._state = WorkerState()
        self._proc = None
        self._payload: Optional[bytes] = None

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> None:
        if self._payload is None:
            try:
                self._payload = cloudpickle.dumps(self.job)
            except Exception as exc:  # noqa: BLE001
                raise WorkerStartError(f"the module cannot be sent to a child process ({type(exc).__name__}: {exc})") from exc
        ctx = mp.get_context("spawn")
        self._tasks, self._results = ctx.Queue(), ctx.Queue()
        self._proc = ctx.Process(target=_worker_main, name=f"navdeploy-{self.job.module_name}",
                                 args=(self._payload, self._tasks, self._results, str(self.log_path)), daemon=True)
        self._proc.start()
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                kind, _ = self._results.get(timeout=0.2)
                if kind == "ready":
                    return
            except queue.Empty:
                if not self._proc.is_alive():
                    break
        code = self._proc.exitcode
        self._kill()
        raise WorkerStartError(
            f"{_describe_exit(code)} while starting. If your script runs nav.optimize at import time, put it under "
            "`if __name__ == \"__main__\":` (spawned children re-import the main script), or set "
            "NAVDEPLOY_USE_MULTIPROCESSING=False. See " + str(self.log_path)
        )

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(timeout=10)
            self._proc = None

    def run(self, task: Task) -> dict:
        """The task's record; a crash or timeout becomes a failed record."""
        if not self.isolate:
            return run_task(self.job, task, self._state)
        if self._proc is None or not self._proc.is_alive():
            try:
                self._start()
            except WorkerStartError as exc:
                log.warning("running candidates of %s in-process: %s", self.job.module_name, exc)
                warnings.warn(f"navdeploy: running candidates of {self.job.module_name!r} in this process, without "
                              f"crash isolation: {exc}", RuntimeWarning, stacklevel=2)
                self.isolate = False
                return run_task(self.job, task, self._state)
        log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self._tasks.put(task)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                kind, value = self._results.get(timeout=0.2)
                if kind == "result":
                    return value
            except queue.Empty:
                failure = None
                if not self._proc.is_alive():
                    failure = _describe_exit(self._proc.exitcode, self.log_path, log_offset)
                elif time.monotonic() > deadline:
                    failure = f"timed out after {self.timeout_s:g} s"
                if failure:
                    self._kill()
                    return {**new_record(RUNNERS[task.runner], task.precision, self.job.precision),
                            "step": "isolation", "error": failure}

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        if self._proc is not None and self._proc.is_alive():
            self._tasks.put(None)
            self._proc.join(timeout=5)
        self._kill()
