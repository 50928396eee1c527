"""The public ``nav.optimize``: where a run's reporters are chosen and handed to the orchestration.

``navdeploy.optimize`` runs the optimization and only emits events (``navdeploy/optimize/events.py``);
``navdeploy.report`` holds the listeners that show a run (the console, the HTML report). This module sits above
both and is the one place that wires them: it reads the user's settings (console mode, whether to report),
builds the reporters in the order they must hear the events (the HTML reporter first, so the console's last
line can name the report it wrote) and calls the orchestration. ``navdeploy/__init__.py`` re-exports it.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional

from navdeploy.config import OptimizeConfig, console_output, report_enabled
from navdeploy.optimize.events import Listeners, OptimizeListener
from navdeploy.optimize.run import run_optimize
from navdeploy.optimize.status import OptimizeStatus
from navdeploy.report.console import ConsoleReporter
from navdeploy.report.html_reporter import HtmlReporter


def default_listeners(mode: str, report: bool) -> Listeners:
    """The reporters of a run: the HTML report when ``report``, then the console in ``mode``."""
    listeners: list[OptimizeListener] = [HtmlReporter()] if report else []
    listeners.append(ConsoleReporter(mode))
    return Listeners(tuple(listeners))


def optimize(func: Callable, dataloader: Iterable, config: Optional[OptimizeConfig] = None) -> OptimizeStatus:
    """Optimize every ``nav.Module`` that ``func`` calls while it runs over ``dataloader``.

    Each dataloader item is ``(batch_size, sample)``: a tuple/list sample is positional arguments (a
    trailing dict is keyword arguments), a dict alone is keyword arguments, anything else is one argument.
    Modules with ``module.optimize_config`` set use it; the others use ``config`` (or the defaults).
    After it returns, the wrapped modules run their fastest verified runner; inputs they were not
    optimized for run eagerly, and modules whose runners leave the whole callable no faster than eager are
    put back to eager (the pipeline check; ``OptimizeConfig(pipeline_repeats=0)`` skips it). Progress and a
    table per module go to the console (``NAVDEPLOY_CONSOLE_OUTPUT``); unless ``NAVDEPLOY_REPORT=0`` an HTML
    report is written to ``<workspace>/reports``.
    """
    report = report_enabled()
    return run_optimize(func, dataloader, config, default_listeners(console_output(), report))
