"""Running candidates in a spawned child so a crash, hang or OOM costs one candidate, not the run.

A worker is started with the ``spawn`` context (never by changing the global start method), receives
the module once, then runs tasks one at a time. When it dies or overruns its timeout it is killed, the
candidate is marked failed with the reason, and the next task starts a fresh worker. A module gets one
worker, or several (``build_workers``) that build candidates side by side and take turns to profile
through a :class:`~navdeploy.candidates.timing_gate.TimingGate`.
"""

from __future__ import annotations

import contextlib
import contextvars
import ctypes
import faulthandler
import logging
import multiprocessing as mp
import multiprocessing.connection
import multiprocessing.util
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
import time
import warnings
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import replace
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional, Sequence, TypeVar

import cloudpickle

try:
    import fcntl
except ImportError:  # Windows: no locks, so no worker file is ever removed as stale there
    fcntl = None  # type: ignore[assignment]

from navdeploy.candidates.build import Job, Task, WorkerState, new_record, run_task
from navdeploy.candidates.imports_ahead import import_ahead
from navdeploy.candidates.timing_gate import Slot, TimingGate
from navdeploy.formats.package_folder import WORKER_FOLDER_ENV
from navdeploy.formats.registry import RUNNERS
from navdeploy.workspace.inductor import cache_dir, set_environment, used_at
from navdeploy.workspace.records import CandidateRecord

log = logging.getLogger("navdeploy")
_READY_TIMEOUT_S = 300.0
_IN_PROCESS = threading.Lock()  # candidates run in this process (isolation off or unavailable) one at a time
T = TypeVar("T")
R = TypeVar("R")
_STOPPED = "the optimize run was interrupted; no further candidate starts"
_FAULTS = None  # a worker's faulthandler file, kept open for the worker's life


def runs_alone(task: Task) -> bool:
    """Whether ``task`` holds the timing gate alone for its whole run: its runner times kernels while it builds
    (``builds_alone``), or it only times a build made earlier (``Task.times_only``)."""
    return RUNNERS[task.runner].builds_alone or task.times_only


class WorkerStartError(RuntimeError):
    """The worker child could not start (payload not picklable, or the child died while starting)."""


class RunStopped(RuntimeError):
    """The run was interrupted (Ctrl-C, or another chain of candidates failed): no further candidate starts."""


def _die_with_parent() -> None:
    """End this worker when the process that started it dies, even by ``kill -9``: an orphan would keep
    building and could move an artifact into a folder the next run already owns.

    On Linux the kernel sends SIGKILL (``PR_SET_PDEATHSIG``) when the thread that started the worker ends
    (``ExecutorPool`` keeps its threads for that); elsewhere, and as a second line, a thread watches the parent's
    sentinel."""
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


def _redirect_output(log_path: str) -> None:
    """Exporters print a lot straight to the file descriptors; keep it in the module's log, off the console."""
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def _log_to(log_path: str, previous: Optional[logging.Handler]) -> logging.Handler:
    logger = logging.getLogger("navdeploy")
    if previous is not None:
        logger.removeHandler(previous)
        previous.close()
    handler = logging.FileHandler(log_path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s [worker] %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return handler


def _main_module_last() -> None:
    """Move ``__mp_main__`` (the user's script, run again by ``spawn``) to the end of ``sys.modules``.

    torch's compile-cache keys pickle objects such as ``torch.contiguous_format`` by reference, and the pickler
    names the first module in ``sys.modules`` through which it reaches them: in the user's process
    ``torch._utils`` (``__main__`` is skipped), here ``__mp_main__``, which spawn put before torch and which
    imported torch. So every key differed, and the bind of a winner compiled here found nothing in the cache
    and compiled it again (the SD UNet's bind on the H200: 68 s)."""
    main = sys.modules.pop("__mp_main__", None)
    if main is not None:
        sys.modules["__mp_main__"] = main


def _worker_main(tasks, results, grants, log_path: str, faults_path: str, folder: str,
                 temporary_log: bool = False, imports: Sequence[str] = ()) -> None:
    """A worker: ready once started (torch and ``imports`` imported), then for each job (one module's, sent as
    ``("job", payload, log_path, cache_env)``) runs its tasks one by one, until told to end (``None``). Workers
    outlive a module: the next module's job reuses a warm one, with that module's inductor cache (``cache_env``).
    ``imports``: modules its first job will need, imported before it says it is ready (``imports_ahead``)."""
    global _FAULTS
    _die_with_parent()
    if folder:  # a worker is a process of navdeploy's own: its environment names its folder
        os.environ[WORKER_FOLDER_ENV] = folder
    _redirect_output(log_path)
    # A crash in native code (SIGSEGV in a compiled library) leaves the Python stack in this worker's own file
    # (the parent copies it into the log): in the shared log, another worker's dump could pass for this one's.
    if faults_path:
        _FAULTS = open(faults_path, "w")
        faulthandler.enable(file=_FAULTS)
    else:  # no temporary folder to write to: the shared log, as the last resort
        faulthandler.enable()
    handler = _log_to(log_path, None)
    import torch  # noqa: F401 - what every job needs, imported while the parent still captures

    _main_module_last()

    job: Optional[Job] = None
    state = WorkerState()

    def wait_for_timing() -> None:  # the parent's thread holds the gate; ask it and wait for its answer
        results.put(("timing", None))
        grants.get()

    def compiling() -> None:  # news for the parent, which answers nothing
        results.put(("compiling", None))

    # Before "ready": the parent lets a module's first timing start only once its workers are ready (``settle``),
    # and one still importing would take a core from that timing.
    import_ahead(imports)
    results.put(("ready", os.getpid()))
    while True:
        message = tasks.get()
        if message is None:
            _end_now(handler)
            return
        if isinstance(message, tuple) and message[0] == "job":
            _, payload, job_log, cache_env = message
            set_environment(cache_env)  # a worker is a process of navdeploy's own: the job's values
            if job_log != log_path:
                _redirect_output(job_log)
                handler = _log_to(job_log, handler)
                if temporary_log:  # what the worker printed while it started goes into the first module's log
                    with contextlib.suppress(OSError):
                        with open(log_path) as startup, open(job_log, "a") as module_log:
                            module_log.write(startup.read())
                        os.unlink(log_path)
                    temporary_log = False
                log_path = job_log
            try:
                job = cloudpickle.loads(payload)
            except Exception as exc:  # noqa: BLE001 - the parent falls back to running in-process
                job = None
                results.put(("job-error", f"{type(exc).__name__}: {exc}"))
                continue
            state = WorkerState(before_profile=wait_for_timing, compiling=compiling)  # caches belong to one module
            results.put(("job-ready", os.getpid()))
            continue
        results.put(("result", run_task(job, message, state)))


def _end_now(handler: logging.Handler) -> None:
    """End the worker without the interpreter's teardown: with torch, Inductor and the exporters loaded it took
    1.4-1.6 s of a 2-core machine while the parent waited (the example CNN's optimize), and a worker holds nothing
    to save by then: every result went to the parent, which asked it to end only after the last one, and its log
    is flushed here."""
    # multiprocessing's own exit step, which os._exit skips: it unlinks the semaphores made here (tqdm makes one in
    # every torch.export), or the parent's resource tracker warns about them when the user's script ends.
    with contextlib.suppress(Exception):
        multiprocessing.util._run_finalizers(0)
    handler.flush()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if _FAULTS is not None:
        faulthandler.disable()
        with contextlib.suppress(OSError):
            _FAULTS.close()
    os._exit(0)


def _describe_exit(code: Optional[int], log_path: Optional[Path] = None,
                   faults_path: Optional[Path] = None) -> str:
    """Why a worker ended, e.g. ``died with SIGSEGV in torch/_inductor/package.py:9 in load (stack in ...)``.
    The crashing worker's faulthandler dump (``faults_path``) is copied into the module's log."""
    if code is not None and code < 0:
        name = signal.Signals(-code).name
        hint = ", likely out of memory" if -code == signal.SIGKILL else ""
        # Only faulthandler's signals leave a dump; a SIGKILL (OOM) never does.
        dumps = -code in (signal.SIGSEGV, signal.SIGFPE, signal.SIGABRT, signal.SIGBUS, signal.SIGILL)
        where = _crash_site(_take_dump(faults_path, log_path)) if faults_path is not None and dumps else None
        site = f" in {where} (stack in {log_path})" if where else ""
        return f"the candidate process died with {name}{hint}{site}"
    return f"the candidate process exited with code {code}"


# Signals a worker gets from outside (the OOM killer's SIGKILL, a user's kill): the candidate may well pass on the
# next run, so its failure is transient. A crash signal (SIGSEGV, SIGABRT, ...) comes from the candidate's own code
# and recurs: that failure stays cached.
_EXTERNAL_SIGNALS = frozenset({signal.SIGKILL, signal.SIGTERM, signal.SIGHUP, signal.SIGINT})


def killed_from_outside(code: Optional[int]) -> bool:
    """Whether a worker's exit code says it was killed by a signal from outside (see ``_EXTERNAL_SIGNALS``)."""
    return code is not None and code < 0 and -code in _EXTERNAL_SIGNALS


def _take_dump(faults_path: Path, log_path: Optional[Path]) -> str:
    """The dump a dead worker left in its faults file, appended to the module's log; the file is emptied for
    the executor's next worker."""
    try:
        dump = Path(faults_path).read_text(errors="replace")[-64_000:]
        Path(faults_path).write_text("")
    except OSError:
        return ""
    if dump and log_path is not None:
        with contextlib.suppress(OSError), open(log_path, "a") as log_file:
            log_file.write(dump)
    return dump


def _crash_site(dump: str) -> Optional[str]:
    """The innermost Python frame of the crashing thread in a faulthandler dump, e.g.
    ``_inductor/package/package.py:123 in load_package``; None when there is none."""
    _, found, dump = dump.rpartition("Fatal Python error")
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


_PREFIX = "navdeploy-worker-"


def _own_prefix() -> str:
    """The temp-dir prefix of this process's worker files (faults file, folder, startup log): named for its pid,
    so that a later run can tell the files of a process that is gone (``remove_stale_worker_files``)."""
    return f"{_PREFIX}{os.getpid()}-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def _lock(path: Path) -> Optional[int]:
    """An open descriptor of ``path`` (a file or a folder) holding an exclusive ``flock`` on it, or None where
    another process holds one (or locks are not available). The kernel drops the lock when its holder dies."""
    if fcntl is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def remove_stale_worker_files() -> None:
    """Remove the worker files of navdeploy runs whose process is gone: a run killed with SIGKILL (or by the OOM
    killer) cannot remove its own, and its workers die with it (``_die_with_parent``). Only names this module
    gives (``navdeploy-worker-<pid>-…``) whose pid no longer runs here, and whose lock (held by the executor that
    made them, for as long as its process lives) is free: a run in another pid namespace that shares this temp dir
    keeps its files."""
    root = Path(tempfile.gettempdir())
    for path in root.glob(f"{_PREFIX}*-*"):
        pid = path.name[len(_PREFIX):].split("-", 1)[0]
        if not pid.isdigit() or _alive(int(pid)):
            continue
        fd = _lock(path)
        if fd is None:
            continue
        try:
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        finally:
            os.close(fd)


class Payload:
    """The job as bytes for the workers, pickled once however many workers start (a module can be large)."""

    def __init__(self, job: Job):
        self._job = job
        self._bytes: Optional[bytes] = None
        self._lock = threading.Lock()

    def get(self) -> bytes:
        with self._lock:
            if self._bytes is None:
                try:
                    self._bytes = cloudpickle.dumps(self._job)
                except Exception as exc:
                    raise WorkerStartError(f"the module cannot be sent to a child process ({type(exc).__name__}: "
                                           f"{exc})") from exc
            return self._bytes


class Executor:
    """Runs tasks of one job, isolated in a worker child or in this process."""

    def __init__(self, job: Optional[Job], isolate: bool, timeout_s: float, log_path: Path,
                 gate: Optional[TimingGate] = None, payload: Optional[Payload] = None):
        self.job = job
        self.isolate = isolate
        self.timeout_s = timeout_s
        self.log_path = log_path
        self.gate = gate or TimingGate()
        self._payload = payload or (Payload(job) if job is not None else None)
        self._sent: Optional[Payload] = None  # the job the worker holds
        self._state = WorkerState()
        self._proc = None
        self._ready = False  # the worker said it is ready
        self._faults: Optional[Path] = None  # the worker's faulthandler file, one per executor
        self._folder: Optional[Path] = None  # the worker's temporary folder (package_folder.py), one per executor
        self._startup_log: Optional[Path] = None  # a worker started ahead of time writes here until its first job
        self._held: list[int] = []  # descriptors locking the files above (``remove_stale_worker_files``)
        self._ending = False  # the worker was told to end after its task
        self._lock = threading.Lock()  # guards _proc and _stopped against stop() from another thread
        self._stopped = False  # set by stop(): no further task starts
        self._spawned = False  # a worker was started for it, ahead of time or for a task
        self.on_compiling: Callable[[], None] = lambda: None  # its worker's build runs only compilers from now on

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def assign(self, job: Job, isolate: bool, timeout_s: float, log_path: Path, gate: TimingGate,
               payload: Payload, on_compiling: Callable[[], None] = lambda: None) -> None:
        """Run ``job``'s tasks from now on; a warm worker keeps running and receives the job with the next task.
        ``on_compiling``: called (on the task's thread) when a build of the worker starts its native compile."""
        self.job, self.isolate, self.timeout_s, self.log_path, self.gate = job, isolate, timeout_s, log_path, gate
        self._payload = payload
        self._state = WorkerState()
        self.on_compiling = on_compiling

    @property
    def unstarted(self) -> bool:
        """Whether no worker was ever started for this executor (nor will be: not stopped): another executor's warm
        worker can stand in for it at no loss."""
        return not self._spawned and not self._stopped

    @property
    def reusable(self) -> bool:
        """Whether this executor may serve another module: not stopped."""
        return not self._stopped

    def _spawn(self, temporary_log: bool = False, imports: Sequence[str] = ()) -> None:
        """Start the worker process; it says "ready" once it has imported torch and ``imports`` (``_await_ready``).
        ``temporary_log``: ``log_path`` only holds its output until its first job, which takes it over.
        ``imports``: modules the worker imports before it says it is ready, ahead of its first job."""
        ctx = mp.get_context("spawn")
        if self._faults is None:
            with contextlib.suppress(OSError):
                fd, path = tempfile.mkstemp(prefix=_own_prefix(), suffix=".faults")
                os.close(fd)
                self._faults = Path(path)
                self._hold(self._faults)
        if self._folder is None:
            with contextlib.suppress(OSError):
                self._folder = Path(tempfile.mkdtemp(prefix=_own_prefix(), suffix=".tmp"))
                self._hold(self._folder)
        if temporary_log:
            self._startup_log = self.log_path
            self._hold(self.log_path)
        self._ending = False
        self._sent = None
        self._tasks, self._results, self._grants = ctx.Queue(), ctx.Queue(), ctx.Queue()
        proc = ctx.Process(target=_worker_main, name=f"navdeploy-{self.job.module_name if self.job else 'worker'}",
                           args=(self._tasks, self._results, self._grants, str(self.log_path),
                                 str(self._faults or ""), str(self._folder or ""), temporary_log, list(imports)),
                           daemon=True)
        with self._lock:
            if self._stopped:
                raise RunStopped(_STOPPED)
            proc.start()
            self._proc = proc
            self._ready = False
            self._spawned = True

    def _await_ready(self) -> None:
        proc = self._proc
        if proc is None:
            raise RunStopped(_STOPPED)
        if self._ready:
            return
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                kind, _ = self._results.get(timeout=0.2)
                if kind == "ready":
                    self._ready = True
                    return
            except queue.Empty:
                if not proc.is_alive():
                    break
        self._kill()
        if self._stopped:  # stop() killed it while it started
            raise RunStopped(_STOPPED)
        raise WorkerStartError(
            f"{_describe_exit(proc.exitcode, self.log_path, self._faults)} while starting. If your script runs "
            "nav.optimize at import time, put it under `if __name__ == \"__main__\":` (spawned children re-import "
            "the main script), or set NAVDEPLOY_USE_MULTIPROCESSING=False. See " + str(self.log_path)
        )

    def settle(self) -> None:
        """Wait until a worker started ahead of time is ready (no-op for one that is, or none): only a
        worker started for a task starts inside the timing gate. A worker that cannot start is left for the first
        task to report."""
        if self._proc is not None and not self._ready and not self._stopped:
            with contextlib.suppress(WorkerStartError, RunStopped):
                self._await_ready()

    def _send_job(self) -> None:
        """Give the worker this executor's job (the module, pickled once for every worker) unless it holds it."""
        if self._sent is self._payload:
            return
        payload = self._payload.get()
        self._tasks.put(("job", payload, str(self.log_path), self.job.cache_environment))
        proc = self._proc
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                kind, value = self._results.get(timeout=0.2)
            except queue.Empty:
                if proc is None or not proc.is_alive():
                    break
                continue
            if kind == "job-ready":
                self._sent = self._payload
                return
            if kind == "job-error":
                self._kill()
                raise WorkerStartError(f"the worker cannot load the module ({value})")
        code = proc.exitcode if proc is not None else None
        self._kill()
        if self._stopped:
            raise RunStopped(_STOPPED)
        raise WorkerStartError(f"{_describe_exit(code, self.log_path, self._faults)} while loading the module. "
                               "See " + str(self.log_path))

    def _kill(self) -> None:
        with self._lock:
            proc, self._proc = self._proc, None
        if proc is not None:
            if proc.is_alive():
                proc.kill()
            proc.join(timeout=10)

    def run(self, task: Task) -> CandidateRecord:
        """The task's record; a crash or timeout becomes a failed record. The task holds the gate while it
        runs in a worker: alone when its runner times kernels while it builds or when it only times an earlier
        build (``Task.times_only``), else beside other builds until it profiles. Raises :class:`RunStopped` once
        :meth:`stop` was called."""
        if self._stopped:
            raise RunStopped(_STOPPED)
        if self.isolate:
            with self.gate.task(exclusive=runs_alone(task)) as slot:
                try:
                    if self._proc is None or not self._proc.is_alive():
                        self._spawn()  # inside the gate: starting a worker is build work too
                    self._await_ready()  # a worker started ahead of time may still be importing
                    self._send_job()
                except WorkerStartError as exc:
                    log.warning("running candidates of %s in-process: %s", self.job.module_name, exc)
                    warnings.warn(f"navdeploy: running candidates of {self.job.module_name!r} in this process, "
                                  f"without crash isolation: {exc}", RuntimeWarning, stacklevel=2)
                    self.isolate = False
                if self.isolate:
                    return self._run_in_worker(task, slot)
        # Outside the gate: an in-process run never waits for timing while it holds _IN_PROCESS. It builds into
        # the module's inductor cache, which this process points at meanwhile.
        with _IN_PROCESS, used_at(cache_dir(self.job.module_dir)):
            return run_task(self.job, task, self._state)

    def _run_in_worker(self, task: Task, slot: Slot) -> CandidateRecord:
        proc = self._proc  # stop() from another thread may clear self._proc
        if proc is None:
            raise RunStopped(_STOPPED)
        self._tasks.put(task)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                kind, value = self._results.get(timeout=0.2)
                if kind == "timing":  # the worker is about to profile: let it once it runs alone
                    deadline += slot.timing()  # waiting for others is not this candidate's time
                    self._grants.put(True)
                elif kind == "compiling":
                    self.on_compiling()
                elif kind == "result":
                    return value
            except queue.Empty:
                failure, transient = None, False
                if not proc.is_alive():
                    failure = _describe_exit(proc.exitcode, self.log_path, self._faults)
                    transient = killed_from_outside(proc.exitcode)
                elif time.monotonic() > deadline:
                    # A busy machine can make a candidate overrun once: the next run tries it again.
                    failure, transient = f"timed out after {self.timeout_s:g} s", True
                if failure:
                    self._kill()
                    if self._stopped:  # killed by stop(): not the candidate's failure, and nothing to record
                        raise RunStopped(_STOPPED) from None  # the empty poll is not the cause
                    return replace(new_record(RUNNERS[task.runner], task.precision, self.job.precision),
                                   step="isolation", error=failure, transient=transient)

    def stop(self) -> None:
        """Kill the worker now and start no further task (an interrupted run): the task in flight raises
        :class:`RunStopped` and leaves no record."""
        with self._lock:
            self._stopped = True
        self._kill()
        if self._faults is not None:  # a stopped worker's dump is nobody's failure
            self._faults.unlink(missing_ok=True)
        self._remove_own_files()

    def ask_to_end(self) -> None:
        """Tell the worker to end after its current task (``close`` then waits for it)."""
        proc = self._proc
        if proc is not None and proc.is_alive() and not self._ending:
            self._ending = True
            self._tasks.put(None)

    def close(self, deadline: Optional[float] = None) -> None:
        """Stop the worker: politely until ``deadline`` (``time.monotonic()``; 5 s from now by default), then by
        force."""
        self.ask_to_end()
        proc = self._proc
        if proc is not None:
            proc.join(timeout=max(0.0, (deadline or time.monotonic() + 5) - time.monotonic()))
        self._kill()
        if self._faults is not None:
            self._faults.unlink(missing_ok=True)
            self._faults = None
        self._remove_own_files()

    def _hold(self, path: Path) -> None:
        """Lock a file of this executor's for as long as it exists: another run never removes it as stale."""
        fd = _lock(path)
        if fd is not None:
            self._held.append(fd)

    def _remove_own_files(self) -> None:
        """Once the worker is gone: its folder (what the runners it still held extracted there; it ends with
        os._exit, or was killed, so their destructors never ran), and the log of a worker started ahead of time
        that never got a job (what it printed, if anything, goes to the module's log first)."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
        startup, self._startup_log = self._startup_log, None
        if startup is not None:
            with contextlib.suppress(OSError):
                if self.job is not None and startup != self.log_path and startup.stat().st_size:
                    with open(startup) as printed, open(self.log_path, "a") as module_log:
                        module_log.write(printed.read())
                startup.unlink()
        held, self._held = self._held, []
        for fd in held:
            os.close(fd)


def side_by_side(threads: ThreadPoolExecutor, fn: Callable[[T], R], items: Sequence[T],
                 stop: Callable[[], None]) -> list[R]:
    """``fn(item)`` for every item on ``threads``, each in a copy of this thread's context (a module's log takes
    the records of its threads: ``scope.logging_to``); the results in ``items``' order. The first exception
    (Ctrl-C, which lands in this thread, included) cancels what has not started, calls ``stop`` (stopping the
    workers of what runs, rather than letting each run to its end) and is raised once the others have ended."""
    futures = [threads.submit(contextvars.copy_context().run, fn, item) for item in items]
    try:
        finished, _ = wait(futures, return_when=FIRST_EXCEPTION)
        failed = next((f for f in futures if f in finished and f.exception() is not None), None)
        if failed is not None:
            failed.result()  # raises it
    except BaseException:
        for future in futures:
            future.cancel()
        stop()
        wait(futures)
        raise
    return [f.result() for f in futures]


class ExecutorPool:
    """The executors of one module: ``workers`` of them share a timing gate, so candidates build side by side
    and profile alone. With one worker (the default) candidates run one after another. From a :class:`WorkerHub`,
    the executors (and their warm worker processes) come from the hub and go back to it afterwards."""

    def __init__(self, job: Job, isolate: bool, timeout_s: float, log_path: Path, workers: int = 1,
                 hub: Optional["WorkerHub"] = None):
        # Several workers only with isolation: in-process candidates run one at a time anyway.
        self.workers = max(1, workers) if isolate else 1
        self._hub = hub
        # The threads live as long as the workers: a worker's death signal (PR_SET_PDEATHSIG) follows the *thread*
        # that started it, so a thread that ended after one graph would take its worker down with it.
        if hub is not None:
            self._threads = hub.threads(self.workers) if self.workers > 1 else None
        else:
            self._threads = ThreadPoolExecutor(self.workers, "navdeploy-build") if self.workers > 1 else None
        # The hub's gate is every module's: modules optimized side by side never time during another's build.
        gate, payload = hub.gate if hub is not None else TimingGate(), Payload(job)
        self._gate = gate
        self._all = hub.take(self.workers) if hub is not None else \
            [Executor(job, isolate, timeout_s, log_path) for _ in range(self.workers)]
        self._assignment = (job, isolate, timeout_s, log_path, gate, payload, self.start_preparing)
        for executor in self._all:
            executor.assign(*self._assignment)
        self._free = list(self._all)
        self._cond = threading.Condition()
        self._isolate = isolate
        self._beside: dict[Callable[[], None], threading.Thread] = {}  # started by start_preparing

    def __enter__(self) -> "ExecutorPool":
        return self

    def timing_held(self) -> ContextManager[None]:
        """The pool's (the run's) timing gate held by this thread for the block: its tasks time alone, and no
        build, of this module or of one beside it, starts between them (``TimingGate.held``)."""
        return self._gate.held()

    def prepare_to_load(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` once, in this process, on a thread that holds the gate as a build, from the moment a build of
        this pool runs only compilers (its worker says so: ``BuildContext.compiling``) or :meth:`start_preparing`
        is called, whichever comes first: started with the build that needs it, it would share the cores with the
        builds' Python work, while compilers leave one to spare (docs/search.md). It never overlaps a timing. The
        pool waits for it on exit. Not without isolation: candidates then build in this process, which does the same
        work itself."""
        if not self._isolate:
            return

        def run() -> None:
            with self._gate.task():
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 - only a head start: the load does the same work anyway
                    log.info("preparing to load beside the builds failed: %s: %s", type(exc).__name__, exc)

        with self._cond:
            if fn not in self._beside:  # in a copy of the caller's context: its records go to the module's log
                self._beside[fn] = threading.Thread(target=contextvars.copy_context().run, args=(run,),
                                                    name="navdeploy-prepare", daemon=True)

    def start_preparing(self) -> None:
        """Start what :meth:`prepare_to_load` holds back (a build of the pool that needed it ended, or runs only
        compilers now)."""
        with self._cond:
            for thread in self._beside.values():
                if thread.ident is None:  # not started yet
                    thread.start()

    def __exit__(self, *exc) -> None:
        for thread in self._beside.values():  # one never started is not needed: the builds it waited for are over
            if thread.ident is not None:
                thread.join()
        if self._hub is not None:
            self._hub.give_back(self._all, self._threads)
            return
        for executor in self._all:  # all at once: each worker frees its memory (a CUDA context) meanwhile
            executor.ask_to_end()
        deadline = time.monotonic() + 5
        for executor in self._all:
            executor.close(deadline)
        if self._threads is not None:
            self._threads.shutdown(wait=True)

    def settle(self) -> None:
        """Wait until every worker of the pool started ahead of time (``WorkerHub.prestart``) is ready:
        the first timing of a module must not run beside a second worker's start-up."""
        for executor in self._all:
            executor.settle()

    @contextlib.contextmanager
    def borrow(self, prefer: Optional[Executor] = None, avoid: Optional[Executor] = None) -> Iterator[Executor]:
        """An executor (and so a worker) of the pool for a while, ``prefer`` when it is free (its worker may hold
        what the task needs), another than ``avoid`` when there is one (a chain leaves the warm worker to the
        chain that prefers it); the block runs its tasks one by one."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._free))
            others = [e for e in self._free if e is not avoid]
            executor = prefer if prefer in self._free else (others or self._free)[0]
            self._free.remove(executor)
            if executor.unstarted and self._hub is not None:
                # A module beside this one gave its warm worker back since this pool was made: it takes this
                # executor's place rather than a worker that starts now (seconds of importing torch, on the
                # last module's second chain as the module before it ends).
                warm = self._hub.trade(executor)
                if warm is not None:
                    warm.assign(*self._assignment)
                    self._all[self._all.index(executor)] = executor = warm
        try:
            yield executor
        finally:
            with self._cond:
                self._free.append(executor)
                self._cond.notify()

    def map(self, fn: Callable[[T], None], items: Sequence[T]) -> None:
        """``fn(item)`` for every item: in this thread, in order, with one worker; else on ``workers`` threads.
        The first exception (Ctrl-C included) stops every worker and is raised."""
        if self._threads is None:
            for item in items:
                fn(item)
            return

        def stop() -> None:
            for executor in self._all:
                executor.stop()

        side_by_side(self._threads, fn, items, stop)


class WorkerHub:
    """The worker processes of one ``nav.optimize`` run, kept warm between its modules: a spawned worker imports
    torch (seconds), so the second module reuses the first one's worker instead of starting another. ``prestart``
    starts workers before any module needs them (while the pipeline is captured). ``close`` ends them all.

    Modules optimized side by side (``modules``) take their executors and threads from the hub and share its
    timing ``gate``: a build of one never overlaps a timing of another."""

    def __init__(self) -> None:
        remove_stale_worker_files()  # a run killed earlier left them: its process is gone
        self.gate = TimingGate()
        self._idle: list[Executor] = []
        self._lent: list[Executor] = []
        self._pools: list[tuple[int, ThreadPoolExecutor]] = []
        self._pools_lent: list[ThreadPoolExecutor] = []
        self._module_threads: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> "WorkerHub":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def prestart(self, count: int, imports: Sequence[str] = ()) -> None:
        """Start ``count`` workers now and return at once: they import torch, then ``imports`` (the modules that
        define the classes of the modules to optimize: ``imports_ahead.defining_modules``), while this process goes
        on. Their output goes to a temporary file until their first job. A worker that cannot start is left for
        the first task to report."""
        for _ in range(max(1, count)):
            try:
                fd, path = tempfile.mkstemp(prefix=_own_prefix(), suffix=".log")
                os.close(fd)
                executor = Executor(None, True, 60.0, Path(path))
                # From this thread, which outlives it (see _die_with_parent).
                executor._spawn(temporary_log=True, imports=imports)
            except (OSError, WorkerStartError, RunStopped) as exc:
                log.info("could not start a worker ahead of time: %s", exc)
                continue
            with self._lock:
                self._idle.append(executor)

    def modules(self, fn: Callable[[T], R], items: Sequence[T], at_once: int) -> list[R]:
        """``fn(item)`` for every item (a module to optimize), ``at_once`` of them side by side, each on a thread of
        the hub (a worker dies with the thread that started it, so these live as long as the hub), each in a copy
        of this thread's context. The results in ``items``' order. The first exception (Ctrl-C included) stops
        every worker of the run and is raised once the others have ended."""
        if at_once <= 1 or len(items) <= 1:
            return [fn(item) for item in items]
        with self._lock:
            if self._module_threads is None:
                self._module_threads = ThreadPoolExecutor(at_once, "navdeploy-module")
            threads = self._module_threads
        return side_by_side(threads, fn, items, self.stop_lent)

    def stop_lent(self) -> None:
        """Stop the workers of every module in flight now (an interrupted or failed run): their tasks raise
        :class:`RunStopped`."""
        with self._lock:
            lent = list(self._lent)
        for executor in lent:
            executor.stop()

    def threads(self, workers: int) -> ThreadPoolExecutor:
        """Threads that run a module's chains side by side, not another module's meanwhile (``give_back`` returns
        them). They live as long as the hub, as the workers they start do (a worker dies with the thread that
        started it)."""
        with self._lock:
            for size, pool in self._pools:
                if size >= workers and pool not in self._pools_lent:
                    self._pools_lent.append(pool)
                    return pool
            pool = ThreadPoolExecutor(workers, "navdeploy-build")
            self._pools.append((workers, pool))
            self._pools_lent.append(pool)
            return pool

    def take(self, count: int) -> list[Executor]:
        """``count`` executors for a module: warm ones first (each gets the module's job before its first task)."""
        with self._lock:
            taken = [self._idle.pop(0) for _ in range(min(count, len(self._idle)))]
        unstarted = Path(tempfile.gettempdir())  # replaced by the module's log when the executor is assigned
        taken += [Executor(None, True, 60.0, unstarted) for _ in range(count - len(taken))]
        with self._lock:
            self._lent.extend(taken)
        return taken

    def trade(self, unstarted: Executor) -> Optional[Executor]:
        """A warm idle executor in place of ``unstarted``, lent and never started (it is dropped: it holds no
        process or file), or None when no warm one is idle."""
        with self._lock:
            if not self._idle or unstarted not in self._lent or not unstarted.unstarted:
                return None
            warm = self._idle.pop(0)
            self._lent[self._lent.index(unstarted)] = warm
            return warm

    def give_back(self, executors: Sequence[Executor], threads: Optional[ThreadPoolExecutor] = None) -> None:
        """Executors (and threads) a module is done with: kept warm for the next module, unless stopped or the hub
        is closed."""
        with self._lock:
            self._lent = [e for e in self._lent if e not in executors]
            if threads is not None and threads in self._pools_lent:
                self._pools_lent.remove(threads)
            keep = [e for e in executors if e.reusable] if not self._closed else []
            self._idle.extend(keep)
        for executor in executors:
            if executor not in keep:
                executor.close()

    def close(self) -> None:
        """End every worker: politely for up to 5 s, then by force."""
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
            pools, self._pools = self._pools, []
            module_threads, self._module_threads = self._module_threads, None
        for executor in idle:
            if executor.job is None:  # started ahead of time and never used: it holds nothing, no need to wait
                executor.stop()
                executor.close()  # its startup log, faults file and folder go too
            else:  # all at once: each worker frees its memory meanwhile
                executor.ask_to_end()
        deadline = time.monotonic() + 5
        for executor in idle:
            executor.close(deadline)
        for _, pool in pools:
            pool.shutdown(wait=True)
        if module_threads is not None:
            module_threads.shutdown(wait=True)
