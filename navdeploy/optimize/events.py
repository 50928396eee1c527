"""What ``nav.optimize`` tells whoever shows a run: the events it emits, a listener that ignores them, and a
fan-out to several listeners.

The orchestration only emits; the console progress and tables and the HTML report (``navdeploy.report``) are
listeners, and ``navdeploy.api`` picks which ones a run gets. So this package never imports the reporters.

Events of one run, in order: ``candidates_started(total)``; per candidate ``candidate_started`` (not for one
answered from the cache or skipped before a worker runs it) and ``candidate_finished``; ``candidates_added(n)``
when the search adds candidates to the total (a graph's follow-up precisions); ``candidates_finished()``
after the last candidate, also when the run raises; ``run_finished(status)`` only when it succeeds.
``log_handlers()`` is asked once per module: the handlers it returns get the ``navdeploy`` logger's records
while that module is optimized, and are closed afterwards. With several build workers the candidate events
come from their threads.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from navdeploy.optimize.status import OptimizeStatus


class OptimizeListener(Protocol):
    """Receives the events of one ``nav.optimize`` run (see the module docstring for their order)."""

    def candidates_started(self, total: int) -> None:
        """The candidates are about to run: ``total`` of them over every module and graph."""

    def candidates_added(self, count: int) -> None:
        """The search adds ``count`` candidates to the total (bf16 copies for a graph heavy enough)."""

    def candidate_started(self, module: str, candidate: str) -> None:
        """A worker starts building, verifying and profiling ``candidate`` of ``module``."""

    def candidate_finished(self, module: str, candidate: str, cached: bool) -> None:
        """``candidate`` of ``module`` has a result; ``cached`` when an earlier run's result was reused."""

    def candidates_finished(self) -> None:
        """No more candidate events come (the run may still fail after this)."""

    def log_handlers(self) -> Sequence[logging.Handler]:
        """Fresh handlers for the ``navdeploy`` logger while one module is optimized (closed afterwards)."""

    def run_finished(self, status: OptimizeStatus) -> None:
        """The run succeeded; ``status`` is what ``nav.optimize`` returns (a listener may fill in its
        ``report_path``)."""


class NullListener:
    """Ignores every event: the default, and a base for listeners that care about a few of them."""

    def candidates_started(self, total: int) -> None:
        pass

    def candidates_added(self, count: int) -> None:
        pass

    def candidate_started(self, module: str, candidate: str) -> None:
        pass

    def candidate_finished(self, module: str, candidate: str, cached: bool) -> None:
        pass

    def candidates_finished(self) -> None:
        pass

    def log_handlers(self) -> Sequence[logging.Handler]:
        return ()

    def run_finished(self, status: OptimizeStatus) -> None:
        pass


@dataclass(frozen=True)
class Listeners:
    """Passes every event to each listener in order (so one listener may read what an earlier one set in the
    status, e.g. the console prints the report path the HTML reporter wrote)."""

    listeners: tuple[OptimizeListener, ...] = ()

    def candidates_started(self, total: int) -> None:
        for listener in self.listeners:
            listener.candidates_started(total)

    def candidates_added(self, count: int) -> None:
        for listener in self.listeners:
            listener.candidates_added(count)

    def candidate_started(self, module: str, candidate: str) -> None:
        for listener in self.listeners:
            listener.candidate_started(module, candidate)

    def candidate_finished(self, module: str, candidate: str, cached: bool) -> None:
        for listener in self.listeners:
            listener.candidate_finished(module, candidate, cached)

    def candidates_finished(self) -> None:
        for listener in self.listeners:
            listener.candidates_finished()

    def log_handlers(self) -> Sequence[logging.Handler]:
        return [handler for listener in self.listeners for handler in listener.log_handlers()]

    def run_finished(self, status: OptimizeStatus) -> None:
        for listener in self.listeners:
            listener.run_finished(status)
