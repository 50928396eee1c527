"""The console reporter of optimize runs: rich progress while candidates run, a status table per module when
the run ends."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Optional, Sequence

from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, TaskID, TextColumn, TimeElapsedColumn
from rich.progress import Progress as RichProgress
from rich.table import Table

from navdeploy.optimize.events import NullListener

if TYPE_CHECKING:
    from navdeploy.optimize.outputs import OutputCheck
    from navdeploy.optimize.status import OptimizeStatus, PipelineTiming

# Not a terminal (CI logs, files): rich would wrap at 80 columns; the table needs ~110.
_console = Console(stderr=True)
if not _console.is_terminal:
    _console = Console(stderr=True, width=120)


class ConsoleReporter(NullListener):
    """Shows an optimize run on stderr: a progress bar over its candidates (not in ``logs`` mode), the
    ``navdeploy`` log records (only in ``logs`` mode), and the status tables when it ends (time per step in
    ``detailed`` mode)."""

    def __init__(self, mode: str = "simple") -> None:
        self._mode = mode
        self._bar: Optional[RichProgress] = None
        self._task: Optional[TaskID] = None
        self._lock = threading.Lock()

    def candidates_started(self, total: int) -> None:
        if self._mode == "logs":  # the log records are the progress; a bar would redraw over them
            return
        self._bar = RichProgress(TextColumn("[bold]navdeploy[/] {task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=_console, transient=True)
        self._bar.start()
        self._task = self._bar.add_task("capturing", total=total)

    def candidates_added(self, count: int) -> None:
        with self._lock:  # modules optimized side by side add from their threads
            if self._bar is not None and self._task is not None:
                task = next(t for t in self._bar.tasks if t.id == self._task)
                self._bar.update(self._task, total=(task.total or 0) + count)

    def candidate_started(self, module: str, candidate: str) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, description=f"{module}: {candidate}")

    def candidate_finished(self, module: str, candidate: str, cached: bool) -> None:
        if self._bar is not None and self._task is not None:
            self._bar.update(self._task, advance=1,
                             description=f"{module}: {candidate}" + (" (cached)" if cached else ""))

    def candidates_finished(self) -> None:
        if self._bar is not None:
            self._bar.stop()  # transient: the bar disappears before the tables are printed
            self._bar = self._task = None

    def log_handlers(self) -> Sequence[logging.Handler]:
        return [log_handler()] if self._mode == "logs" else []

    def run_finished(self, status: OptimizeStatus) -> None:
        print_status(status, detailed=self._mode == "detailed")


def log_handler() -> logging.Handler:
    """A console handler for NAVDEPLOY_CONSOLE_OUTPUT=logs."""
    return RichHandler(console=_console, show_path=False)


def _fmt(value: Optional[float], spec: str) -> str:
    return "-" if value is None else format(value, spec)


_STYLES = {"ok": "green", "failed": "red", "skipped": "dim", "screened": "yellow"}


def status_tables(status: OptimizeStatus, detailed: bool = False) -> list:
    """One table per module and graph: every candidate, its error vs eager, latency, throughput, the winner;
    then why each failed, skipped or screened candidate was not run or not profiled in full (and, detailed, time
    per step). A screened candidate's p50 is its screen figure, marked ``*``; an unstable profile's is marked ``~``."""
    tables: list = []
    for module in status.modules.values():
        for graph in module.graphs:
            at = _compared_at(graph)
            title = f"{module.name} · graph {graph.key} · {module.device}" + \
                ("" if graph.batching else " · no batching") + (f" · p50/p90 at batch {at}" if at else "") + \
                (f" · {module.precision} (from its weights)" if module.precision_inferred and module.precision != "fp32"
                 else "") + _mix(graph.batch_counts)
            table = Table(title=title, title_justify="left")
            for col in ("", "runner", "format", "status", "max abs err", "p50 ms", "p90 ms", "best thr/s"):
                table.add_column(col, justify="right" if col.endswith(("err", "ms", "/s")) else "left")
            notes = []
            for c in graph.candidates:
                first = _point(c, at)
                style = _STYLES.get(c.status, "bold")
                # By candidate name: an fp16 winner (TensorRT[fp16]) is not its runner's fp32 record. Escaped, or
                # rich reads "[fp16]" as markup and drops it.
                name = escape(c.name)
                row = ["★" if c.name == graph.selected else "", name, c.format,
                       f"[{style}]{c.status}{' (cached)' if c.cached else ''}[/]",
                       _fmt(c.max_abs_err, ".2e"), _p50(c, first),
                       _fmt(first.p90_ms if first else None, ".3f"), _fmt(c.best_throughput(), ".0f")]
                if c.error:
                    # A reason (screened, skipped) is shown whole; an error is cut unless detailed.
                    text = c.error if detailed or c.status in ("screened", "skipped") else c.error[:150]
                    notes.append(f"  [bold]{name}[/] {c.status}: {escape(text)}")
                elif detailed:
                    times = ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in c.times.items() if v is not None)
                    notes.append(f"  [bold]{name}[/] {times}")
                table.add_row(*row)
            tables.append(table)
            if any(c.status == "screened" for c in graph.candidates):
                notes.insert(0, "  [dim]* a screen: a few calls at one batch size, not a full profile[/]")
            if any(_unstable(c) for c in graph.candidates):
                notes.insert(0, "  [yellow]~ not stable: its timing windows never agreed within 5% (a busy machine?); "
                                "compare these figures with care, or re-run on a quiet machine[/]")
            tables.extend(notes)
    return tables


def _mix(batch_counts: dict[int, int]) -> str:
    """`` · chosen over the calls seen: batch 1 ×1, 8 ×2`` when the pipeline called the graph at several sizes."""
    if len(batch_counts) < 2:
        return ""
    return " · chosen over the calls seen: " + ", ".join(f"batch {b} ×{n}" for b, n in sorted(batch_counts.items()))


def _unstable(c) -> bool:
    """A full profile with a batch size whose timing windows did not agree."""
    return any(not point.stable for point in c.profile)


def _compared_at(graph) -> Optional[int]:
    """The batch size the search compared the graph's candidates at: its screens', else the full profiles' only
    size; None when unknown (then each row shows its first profiled size)."""
    screened = {c.screen.batch_size for c in graph.candidates if c.screen is not None and c.screen.batch_size}
    if len(screened) == 1:
        return screened.pop()
    sizes = {p.batch_size for c in graph.candidates for p in c.profile if p.batch_size}
    return sizes.pop() if len(sizes) == 1 else None


def _point(c, batch: Optional[int]):
    """The profile point shown for a candidate: at ``batch`` where it has one, else its first."""
    if not c.profile:
        return None
    return next((p for p in c.profile if p.batch_size == batch), c.profile[0])


def _p50(c, point) -> str:
    """The p50 cell: ``point`` (from ``_point``), else the screen figure marked ``*``."""
    if point is not None:
        return f"{point.p50_ms:.3f}{'~' if _unstable(c) else ''}"
    return f"{c.screen.p50_ms:.3f}*" if c.screen is not None else "-"


def _range_ms(runs: list[float]) -> str:
    return f"{min(runs) * 1e3:.2f}-{max(runs) * 1e3:.2f}" if runs else "-"


def pipeline_lines(p: PipelineTiming) -> list[str]:
    """The pipeline check in words: medians with their range over the alternating passes, the ratio, whether
    the optimized pipeline is faster beyond noise, its outputs against eager's, modules put back to eager,
    compiles inside timed passes."""
    verdict = "faster beyond noise" if p.faster else "not faster beyond noise: as eager"
    if p.optimized_s is not None and p.eager_s:
        lines = [f"pipeline end to end ({p.repeats} alternating passes each, medians): eager {p.eager_s * 1e3:.2f} "
                 f"ms [{_range_ms(p.eager_runs)}], optimized {p.optimized_s * 1e3:.2f} ms "
                 f"[{_range_ms(p.optimized_runs)}], {p.speedup or 0.0:.2f}x, {verdict}"]
    elif p.error:
        lines = [f"pipeline end to end: not timed, a pass failed: {p.error}"]
    else:
        lines = ["pipeline end to end: not timed, every module runs eagerly"]
    lines += output_lines(p.outputs)
    for name, why in p.fell_back.items():  # a module reverted afterwards says so on its own line below
        verb = "first went to its" if name in p.reverted else "runs its"
        lines.append(f"  {name} {verb} best candidates in its own precision: {why}")
    lines += [f"  {name} went back to eager: {why}" for name, why in p.reverted.items()]
    if p.compiled:
        lines.append(f"  {p.compiled} timed pass(es) included a torch.compile compile: those figures are high")
    if any(runs and max(runs) > _WIDE * min(runs) for runs in (p.eager_runs, p.optimized_runs)):
        lines.append(f"  passes of one side differed by more than {_WIDE:g}x (a busy machine?): the ratio is rough; "
                     "re-run on a quiet machine for a firm figure")
    return lines


def output_lines(check: Optional[OutputCheck]) -> list[str]:
    """The output check in words (nothing when it did not run)."""
    if check is None or (not check.checked and check.note is None):
        return []
    if not check.checked:
        return [f"  outputs: {check.note}"]
    others = f"; {check.skipped} leaves of other types not compared" if check.skipped else ""
    if check.ok:
        return [f"  outputs: as eager's ({check.leaves} leaves compared, max abs diff {check.max_abs_err:.3g}"
                f"{others})"]
    return [f"  outputs differed from eager's: {check.reason}"]


_WIDE = 2.0  # a side's slowest pass over its fastest beyond which the check's figures are called rough


def print_status(status: OptimizeStatus, detailed: bool = False) -> None:
    """Print the status tables and where the logs are."""
    for table in status_tables(status, detailed):
        _console.print(table, highlight=False)
    for module in status.modules.values():
        bind = f" (bind {module.bind_s:.1f}s)" if module.bind_s is not None else ""
        _console.print(f"[dim]{module.name}: {module.seconds:.1f}s{bind}, log and manifest in {module.folder}[/]")
    pipeline = getattr(status, "pipeline", None)
    if pipeline is not None and (pipeline.optimized_s is not None and pipeline.eager_s or pipeline.reverted
                                 or pipeline.fell_back or pipeline.error):
        for line in pipeline_lines(pipeline):
            _console.print(line, soft_wrap=True, highlight=False, markup=False)
    report = getattr(status, "report_path", None)
    if report is not None:
        _console.print(f"report: {report}", soft_wrap=True, highlight=False)


