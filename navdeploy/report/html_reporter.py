"""The HTML reporter of optimize runs: writes the run's report when it succeeds and records its path."""

from __future__ import annotations

import logging
import warnings
from typing import TYPE_CHECKING

from navdeploy.optimize.events import NullListener

if TYPE_CHECKING:
    from navdeploy.optimize.status import OptimizeStatus

log = logging.getLogger("navdeploy")


class HtmlReporter(NullListener):
    """Writes ``<workspace>/reports/report-<timestamp>.html`` when a run finishes and sets ``status.report_path``;
    a failure to write it only warns, as the optimization itself succeeded."""

    def run_finished(self, status: OptimizeStatus) -> None:
        try:
            # Imported here: the renderer and its templates load only when a report is written, and a broken
            # install of them only costs the report.
            from navdeploy.report.html import write_run_report

            status.report_path = write_run_report(status)
        except Exception as exc:  # noqa: BLE001 - the optimization itself succeeded: this only costs the report
            log.warning("navdeploy: could not write the HTML report: %s: %s", type(exc).__name__, exc)
            # stacklevel: here, Listeners.run_finished, run_optimize, navdeploy.api.optimize, the user's call.
            warnings.warn(f"navdeploy: could not write the HTML report: {type(exc).__name__}: {exc}", RuntimeWarning,
                          stacklevel=5)
            status.report_path = None
