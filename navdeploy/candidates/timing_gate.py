"""Builds side by side, timing alone: the gate between candidates that run in parallel worker processes.

Building a candidate (tracing, exporting, torch.compile's code generation) is mostly host-CPU work that can
overlap with other candidates' builds. Measuring one cannot: a latency taken while a neighbour compiles measures
the neighbour too, and those figures pick the winner. So a task holds the gate as a *build* (shared with other
builds) and asks for *timing* (alone: no build and no other timing in flight) before it profiles. A task that
times kernels on the device while it builds (TensorRT tactics, max-autotune) holds timing for its whole run, and
so does one that only times a build made earlier (``Task.times_only``): entering as a build, it would be admitted
beside a build started at the same moment and then wait that build out.

Only threads of the parent process hold the gate, one per worker; the workers ask through their queues. A worker
that dies therefore never leaves the gate closed: its thread releases it on the way out.
"""

from __future__ import annotations

import contextlib
import threading
import time
from typing import Iterator, Optional


class TimingGate:
    """Many builds at once, or one timing. A task waiting to time stops new builds from starting, so it waits
    at most for the builds already running."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._building = 0  # tasks in flight that are not timing
        self._timing = False  # one task is measuring
        self._waiting = 0  # tasks waiting to measure
        self._holder: Optional[int] = None  # the thread that times alone across several tasks (``held``)

    @contextlib.contextmanager
    def task(self, exclusive: bool = False) -> Iterator["Slot"]:
        """Hold the gate for one task: as a build, or alone for all of it when ``exclusive``. A task of the thread
        that holds the gate (``held``) runs alone already."""
        if self._holder == threading.get_ident():
            held = Slot(self)
            held.timed = True  # released by ``held``, not by this task
            yield held
            return
        slot = Slot(self)
        if exclusive:
            self._time(slot)
        else:
            with self._cond:
                self._cond.wait_for(lambda: not self._timing and not self._waiting)
                self._building += 1
                slot.building = True
        try:
            yield slot
        finally:
            with self._cond:
                if slot.timed:
                    self._timing = False
                elif slot.building:
                    self._building -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Time alone for the whole block, across several tasks of this thread: no build and no other timing
        starts between them. Rounds of profiles that take turns hold it, so that no build of a module beside them
        starts between two rounds (the next round would wait it out, and the rounds would no longer be close in
        time)."""
        if self._holder == threading.get_ident():
            yield
            return
        self._time(Slot(self))
        self._holder = threading.get_ident()
        try:
            yield
        finally:
            with self._cond:
                self._holder = None
                self._timing = False
                self._cond.notify_all()

    def _time(self, slot: "Slot") -> float:
        start = time.monotonic()
        with self._cond:
            if slot.building:
                self._building -= 1
                slot.building = False
            self._waiting += 1
            try:
                self._cond.notify_all()
                self._cond.wait_for(lambda: self._building == 0 and not self._timing)
            finally:
                self._waiting -= 1
            self._timing = slot.timed = True
        return time.monotonic() - start


class Slot:
    """One task's hold on the gate: a build until :meth:`timing` makes it the only task running."""

    def __init__(self, gate: TimingGate) -> None:
        self._gate = gate
        self.building = False
        self.timed = False

    def timing(self) -> float:
        """Block until this task runs alone, and keep it so until the task ends; returns the seconds waited."""
        return 0.0 if self.timed else self._gate._time(self)
