"""Rich progress while candidates run, and a status table per module when optimize ends."""

from __future__ import annotations

import contextlib
import logging
from typing import TYPE_CHECKING, Iterator, Optional

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

if TYPE_CHECKING:
    from navdeploy.optimize.status import OptimizeStatus

# Not a terminal (CI logs, files): rich would wrap at 80 columns; the table needs ~110.
_console = Console(stderr=True)
if not _console.is_terminal:
    _console = Console(stderr=True, width=120)


class Progress:
    """A progress bar over all candidates of a run (a no-op when disabled)."""

    def __init__(self, bar: Optional[RichProgress], task: Optional[int]):
        self._bar, self._task = bar, task

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def advance(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, advance=1, description=text)


@contextlib.contextmanager
def progress(total: int, enabled: bool = True) -> Iterator[Progress]:
    """Show progress over ``total`` candidates while the block runs."""
    if not enabled:
        yield Progress(None, None)
        return
    bar = RichProgress(TextColumn("[bold]navdeploy[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeElapsedColumn(), console=_console, transient=True)
    with bar:
        yield Progress(bar, bar.add_task("capturing", total=total))


def log_handler() -> logging.Handler:
    """A console handler for NAVDEPLOY_CONSOLE_OUTPUT=logs."""
    return RichHandler(console=_console, show_path=False)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


def status_tables(status: "OptimizeStatus", detailed: bool = False) -> list:
    """One table per module and graph: every candidate, its error vs eager, latency, throughput, the winner;
    then why each failed or skipped candidate did not run (and, detailed, time per step)."""
    tables: list = []
    for module in status.modules.values():
        for graph in module.graphs:
            title = f"{module.name} · graph {graph.key} · {module.device}" + ("" if graph.batching else " · no batching")
            table = Table(title=title, title_justify="left")
            for col in ("", "runner", "format", "status", "max abs err", "p50 ms", "p90 ms", "best thr/s"):
                table.add_column(col, justify="right" if col.endswith(("err", "ms", "/s")) else "left")
            notes = []
            for c in graph.candidates:
                first = c.profile[0] if c.profile else None
                style = {"ok": "green", "failed": "red", "skipped": "dim"}.get(c.status, "")
                # By candidate name: an fp16 winner (TensorRT[fp16]) is not its runner's fp32 record. Escaped, or
                # rich reads "[fp16]" as markup and drops it.
                name = escape(c.name)
                row = ["★" if c.name == graph.selected else "", name, c.format,
                       f"[{style}]{c.status}{' (cached)' if c.cached else ''}[/]",
                       _fmt(c.max_abs_err, ".2e"), _fmt(first.p50_ms if first else None, ".3f"),
                       _fmt(first.p90_ms if first else None, ".3f"), _fmt(c.best_throughput(), ".0f")]
                if c.error:
                    notes.append(f"  [bold]{name}[/] {c.status}: {c.error if detailed else c.error[:150]}")
                elif detailed:
                    times = ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in c.times.items() if v is not None)
                    notes.append(f"  [bold]{name}[/] {times}")
                table.add_row(*row)
            tables.append(table)
            tables.extend(notes)
    return tables


def print_status(status: "OptimizeStatus", detailed: bool = False) -> None:
    """Print the status tables and where the logs are."""
    for table in status_tables(status, detailed):
        _console.print(table, highlight=False)
    for module in status.modules.values():
        _console.print(f"[dim]{module.name}: {module.seconds:.1f}s, log and manifest in {module.folder}[/]")
    pipeline = getattr(status, "pipeline", None)
    if pipeline is not None and pipeline.optimized_s is not None and pipeline.eager_s:
        _console.print(f"pipeline end to end: eager {pipeline.eager_s * 1e3:.1f} ms, optimized "
                       f"{pipeline.optimized_s * 1e3:.1f} ms ({pipeline.eager_s / pipeline.optimized_s:.2f}x)",
                       highlight=False)
    report = getattr(status, "report_path", None)
    if report is not None:
        _console.print(f"report: {report}", soft_wrap=True, highlight=False)
