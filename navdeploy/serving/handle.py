"""The handle of a running server: its URLs, a client, and a stop that leaves no process behind."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

from navdeploy.errors import ConfigError
from navdeploy.serving.signals import TermHandler, in_main_thread, wait_for_stop
from navdeploy.serving.specs import Tensor

log = logging.getLogger("navdeploy")


# --- the server ----------------------------------------------------------------------------------------------
def kill_processes_from(prefix: str) -> int:
    """SIGKILL every process whose executable path starts with ``prefix``, and their children; how many.

    When Triton's exit timeout ends before a Python backend model unloads, tritonserver exits and leaves the
    model's ``triton_python_backend_stub`` (and the process it started) running, orphaned, for good."""
    procs: dict[int, tuple[int, str]] = {}  # pid -> (parent pid, argv[0])
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            ppid = int(_stat(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        procs[int(entry.name)] = (ppid, argv0)
    stubs = {pid for pid, (_, argv0) in procs.items() if argv0.startswith(prefix)}
    doomed = stubs | {pid for pid, (ppid, _) in procs.items() if ppid in stubs}
    count = len(doomed)
    for pid in doomed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously: return once they are gone
    while doomed and time.monotonic() < deadline:
        doomed = {pid for pid in doomed if _running(pid)}
        time.sleep(0.01)
    return count


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent pid, ...); the name, in
    parentheses, may itself hold spaces and parentheses."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie stays until init reaps it)."""
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


class ServerHandle:
    """A running PyTriton server. ``stop()`` it (idempotent) or use it as a context manager."""

    def __init__(self, triton: Any, name: str, host: str, ports: dict[str, int], inputs: list[Tensor],
                 outputs: list[Tensor], max_batch_size: int):
        self._triton = triton
        workspace = getattr(getattr(triton, "_workspace", None), "path", None)  # PyTriton's; None if it moves
        self._stub_prefix = f"{workspace}/tritonserver/" if workspace else None
        self.name, self.host, self.ports = name, host, ports
        self.inputs, self.outputs, self.max_batch_size = inputs, outputs, max_batch_size
        self._clients: list[Any] = []
        self._stopped = False
        self._lock = threading.Lock()
        self._on_term: Optional[TermHandler] = None  # the SIGTERM handler of a background server
        self.guard: Optional[Any] = None  # the HTTP front (serving.guard.RequestGuard), stopped before Triton

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def running(self) -> bool:
        return not self._stopped and self._triton.is_alive()

    def client(self, protocol: str = "http") -> Any:
        """A ``tritonclient`` client for this server, closed by ``stop()`` (closing clients first keeps stop fast)."""
        if protocol == "http":
            from tritonclient.http import InferenceServerClient
            client = InferenceServerClient(self.http_url)
        elif protocol == "grpc":
            from tritonclient.grpc import InferenceServerClient
            client = InferenceServerClient(self.grpc_url)
        else:
            raise ConfigError(f"protocol={protocol!r}: use 'http' or 'grpc'.")
        self._clients.append(client)
        return client

    def stop(self) -> None:
        """Close the clients made by :meth:`client`, then stop the server and its workspace."""
        # In the main thread, do not wait for the lock: a SIGTERM handler runs there and may have interrupted
        # this very stop() while it held the lock. Whoever holds it is stopping the server already.
        if not self._lock.acquire(blocking=not in_main_thread()):
            return
        try:
            if self._stopped:
                return
            self._stopped = True
        finally:
            self._lock.release()
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        self._release_signal_handler()
        # The HTTP guard first: it lets in-flight HTTP requests finish, then closes its connections to Triton,
        # which otherwise waits its whole exit timeout for them.
        try:
            if self.guard is not None:
                self.guard.stop()
        finally:
            self._triton.stop()
        if self._stub_prefix:
            killed = kill_processes_from(self._stub_prefix)
            if killed:
                log.warning("navdeploy: server %r: killed %d Python backend process(es) left running after Triton "
                            "exited (the model did not unload within exit_timeout_secs)", self.name, killed)
        log.info("navdeploy: server %r on %s stopped", self.name, self.http_url)

    def _release_signal_handler(self) -> None:
        """A stopped server needs no SIGTERM handler: put the previous one back. The handler must not keep this
        handle (and through PyTriton's bound models, the pipeline and its nav.Modules) alive: the signal module holds
        it, as does any handler installed later that chains to it."""
        on_term, self._on_term = self._on_term, None
        if on_term is None:
            return
        on_term.handle = None  # still chains to the previous handler, but no longer holds this server
        if in_main_thread() and signal.getsignal(signal.SIGTERM) is on_term:
            signal.signal(signal.SIGTERM, on_term.previous if on_term.previous is not None else signal.SIG_DFL)

    def wait(self) -> None:
        """Block until the server stops (``stop()`` from another thread, SIGINT or SIGTERM)."""
        wait_for_stop(self)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"ServerHandle({self.name!r}, http={self.http_url}, grpc={self.grpc_url}, {state})"
