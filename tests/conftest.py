"""Shared test fixtures."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Callable, ContextManager, Optional

import pytest


def pytest_configure(config) -> None:
    """The suite keeps every candidate's artifact (unless NAVDEPLOY_KEEP_ARTIFACTS is set already): its tests
    choose and bind losing candidates by hand (``choose_candidate``), which pruning would leave without an
    artifact. ``tests/test_prune.py`` tests the default, with ``keep_artifacts=False`` in its configs."""
    os.environ.setdefault("NAVDEPLOY_KEEP_ARTIFACTS", "1")
    # A suite started in the background by a shell (`pytest &`, `setsid ... &`) inherits SIGINT ignored, and so
    # does every script a test starts: Python then never raises KeyboardInterrupt there, and the tests that press
    # Ctrl-C on a child (an optimize run, a background server) wait for nothing. Children get the default back.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session", autouse=True)
def machine_cache(tmp_path_factory) -> Path:
    """navdeploy's per-machine probe cache (Inductor's compiled ISA test programs, capability probes) in one
    temporary folder for the whole session: tests never write ~/.cache, and share the probes as machines do."""
    patch = pytest.MonkeyPatch()
    folder = tmp_path_factory.mktemp("machine_cache")
    patch.setenv("NAVDEPLOY_MACHINE_CACHE", str(folder))
    yield folder
    patch.undo()


@pytest.fixture(scope="session")
def isolated_env(tmp_path_factory) -> Callable[..., ContextManager[Path]]:
    """``with isolated_env("name") as workspace:`` — while open, NAVDEPLOY_WORKSPACE and TORCHINDUCTOR_CACHE_DIR
    point into fresh temporary folders (nothing lands in ~/.cache); when it closes, the nav.Modules dropped inside
    are collected (nav.optimize picks up every live nav.Module). Usable from fixtures of any scope."""

    @contextlib.contextmanager
    def env(name: str = "default_ws"):
        workspace = tmp_path_factory.mktemp(name)
        patch = pytest.MonkeyPatch()
        patch.setenv("NAVDEPLOY_WORKSPACE", str(workspace))
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        try:
            yield workspace
        finally:
            patch.undo()
            gc.collect()

    return env


@pytest.fixture(scope="session")
def choose_candidate() -> Callable[..., None]:
    """``choose_candidate(module, workspace, runner="OnnxCPU")`` makes ``runner`` the selected candidate of every
    graph of the module in its manifest on disk, as a user may choose one by hand, and binds the module to it as
    load_optimized does. For tests of the optimized path on tiny modules: which of eager and ONNX wins a
    Linear(4, 4) is timing noise (eager wins on slower CI machines), and so is the pipeline check's verdict."""
    from navdeploy.inplace.binding import bind
    from navdeploy.workspace.manifest import read_manifest, write_manifest

    def choose(module, workspace, runner: str = "OnnxCPU") -> None:
        folder = Path(workspace) / module.name
        manifest = read_manifest(folder)
        for entry in manifest.graphs.values():
            # Verified: fully profiled, or screened out by the search (it still runs correctly when chosen). By
            # candidate name, as ``selected`` is: the runner's copy in another precision has the same runner.
            assert {c.name: c.status for c in entry.candidates}.get(runner) in ("ok", "screened"), entry.candidates
            entry.selected = runner
            if entry.fallback == runner:  # the fp32 fallback of a bf16 winner, chosen itself: no fallback left
                entry.fallback = None
        manifest.reverted = None  # chosen by hand: whatever the pipeline check decided for the tiny module
        write_manifest(folder, manifest)
        assert bind(module, folder) and module.is_optimized

    return choose


class ProcessOutput:
    """Reads a child's (text) stdout on a thread, so that waiting for a line has a real deadline: a bare
    ``readline()`` blocks for as long as the child is alive and silent. Lines are matched by substring, as the
    server's log lines from other threads can land on the same line as the child's own print."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, name="test-output-reader", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._done = True
            self._changed.notify_all()

    def wait_for(self, marker: str, timeout: float) -> Optional[str]:
        """The first line holding ``marker``; None when the child's output ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = next((line for line in self.lines if marker in line), None)
                left = deadline - time.monotonic()
                if found is not None or self._done or left <= 0:
                    return found
                self._changed.wait(left)

    def text(self, timeout: float = 10) -> str:
        """Everything read so far, after waiting up to ``timeout`` for the output to end."""
        self._thread.join(timeout)
        with self._changed:
            return "".join(self.lines)


@pytest.fixture
def process_output() -> Callable[[subprocess.Popen], ProcessOutput]:
    """``process_output(proc)``: a :class:`ProcessOutput` reading ``proc.stdout`` (a text pipe)."""
    return ProcessOutput
