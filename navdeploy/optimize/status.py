"""What ``nav.optimize`` returns: per module and graph every candidate's record and the winner, and the
pipeline's end-to-end timing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from navdeploy.formats.registry import EAGER_RUNNER
from navdeploy.optimize.outputs import OutputCheck
from navdeploy.workspace.records import CandidateRecord, find_candidate

log = logging.getLogger("navdeploy")


@dataclass
class GraphStatus:
    """One input structure of a module: every candidate's record and the winner."""

    key: str
    selected: Optional[str]  # the winner's candidate name (``TensorRT[fp16]``), not only its runner's
    candidates: list[CandidateRecord]
    batching: bool
    # Captured calls per batch size: with more than one size, the winner is the fastest over this mix.
    batch_counts: dict[int, int] = field(default_factory=dict)

    def candidate(self, runner: str) -> Optional[CandidateRecord]:
        """The record of one candidate by its name (``OnnxCPU``, ``TensorRT[fp16]``), else the first record of
        the runner of that name, if it was tried."""
        return find_candidate(self.candidates, runner) or next((c for c in self.candidates if c.runner == runner),
                                                               None)

    def selected_candidate(self) -> Optional[CandidateRecord]:
        """The winner's record, None when no candidate was correct."""
        return find_candidate(self.candidates, self.selected)


@dataclass
class ModuleStatus:
    """What ``nav.optimize`` did for one module."""

    name: str
    folder: Path
    device: str
    graphs: list[GraphStatus]
    optimized: bool
    seconds: float
    tolerances: dict[str, tuple[float, float]] = field(default_factory=dict)  # precision -> (atol, rtol)
    reverted: Optional[str] = None  # why the pipeline check put it back to eager
    precision: str = "fp32"  # of its weights: eager runs in it, and candidates are checked against it
    precision_inferred: bool = False  # read from the weights, not given to nav.Module
    bind_s: Optional[float] = None  # putting the winners in place after the candidates (loads, warm-up compiles)


@dataclass
class PipelineTiming:
    """End-to-end time of the callable over the dataloader, eager and with the selected runners in place, from
    ``repeats`` passes of each, alternating, in this process, after a warm-up pass of each.

    ``eager_s``/``optimized_s`` and the per-module seconds are medians over the repeats (per-module seconds are
    inclusive: a module called inside another counts in both); ``eager_runs``/``optimized_runs`` every pass.
    When the dataloader has two items or more the first item of each pass is a warm-up and not timed
    (``items_timed`` says how many were). ``faster``: the optimized median beats the eager one by more than the
    spread of either (median absolute deviation). ``reverted``: modules put back to eager, largest loss first,
    until that held, each with why; the figures are those of the final pipeline. ``compiled`` names the timed
    passes in which a torch.compile runner compiled (the figures then include a compile). ``error`` is set when
    a pass raised (then ``optimized_s`` is None). ``outputs``: what the callable returns, eager against optimized,
    checked before the timing (modules that changed it are in ``reverted`` too; then, when none is left optimized,
    nothing is timed and ``optimized_s`` is None). ``fell_back``: modules whose winners in another precision
    (bf16 on the CPU, fp16 on CUDA) changed the outputs and that run their best candidates in their own precision
    instead (``GraphEntry.fallback``), each with why."""

    capture_s: float
    eager_s: float
    optimized_s: Optional[float]
    items_timed: int
    module_eager_s: dict[str, float] = field(default_factory=dict)
    module_optimized_s: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None
    repeats: int = 0
    eager_runs: list[float] = field(default_factory=list)
    optimized_runs: list[float] = field(default_factory=list)
    faster: Optional[bool] = None
    reverted: dict[str, str] = field(default_factory=dict)
    compiled: int = 0
    outputs: Optional[OutputCheck] = None
    fell_back: dict[str, str] = field(default_factory=dict)

    @property
    def speedup(self) -> Optional[float]:
        if not self.optimized_s or not self.eager_s:
            return None
        return self.eager_s / self.optimized_s

    def to_json(self) -> dict:
        return {"capture_s": self.capture_s, "eager_s": self.eager_s, "optimized_s": self.optimized_s,
                "items_timed": self.items_timed, "module_eager_s": self.module_eager_s,
                "module_optimized_s": self.module_optimized_s, "error": self.error, "repeats": self.repeats,
                "eager_runs": self.eager_runs, "optimized_runs": self.optimized_runs, "faster": self.faster,
                "reverted": self.reverted, "fell_back": self.fell_back, "compiled": self.compiled,
                "outputs": self.outputs.to_json() if self.outputs is not None else None}

    @classmethod
    def from_json(cls, data: dict) -> "PipelineTiming":
        return cls(float(data["capture_s"]), float(data["eager_s"]),
                   None if data.get("optimized_s") is None else float(data["optimized_s"]),
                   int(data.get("items_timed", 0)), dict(data.get("module_eager_s", {})),
                   dict(data.get("module_optimized_s", {})), data.get("error"), int(data.get("repeats", 0)),
                   [float(x) for x in data.get("eager_runs", [])], [float(x) for x in data.get("optimized_runs", [])],
                   data.get("faster"), dict(data.get("reverted", {})), int(data.get("compiled", 0)),
                   OutputCheck.from_json(data["outputs"]) if data.get("outputs") else None,
                   dict(data.get("fell_back", {})))


@dataclass
class OptimizeStatus:
    """Returned by ``nav.optimize``: per module, per graph, every candidate and the selection; the pipeline's
    eager and optimized end-to-end time and where the HTML report was written."""

    modules: dict[str, ModuleStatus] = field(default_factory=dict)
    seconds: float = 0.0
    pipeline: Optional[PipelineTiming] = None
    workspace: Optional[Path] = None
    report_path: Optional[Path] = None
    command: Optional[str] = None  # how the run was started (the script), for reproduce commands

    def selected(self) -> dict[str, list[Optional[str]]]:
        """Module name -> the search's winner of each graph (None where none was correct). A module the pipeline
        check put back to eager (``ModuleStatus.reverted``) still names its winner here; ``in_use`` says what
        runs. A module whose low-precision winners changed the pipeline's outputs (``PipelineTiming.fell_back``)
        names its fallbacks in its own precision: what its manifest selects now."""
        return {n: [g.selected for g in m.graphs] for n, m in self.modules.items()}

    def in_use(self) -> dict[str, list[str]]:
        """Module name -> what each graph runs now: the winner's candidate name, or ``"eager"`` (eager won, no
        candidate was correct, or the pipeline check put the module back to eager)."""
        def runs(m: ModuleStatus, g: GraphStatus) -> str:
            # As bind decides: a graph whose winner is the eager runner runs the module's own forward.
            return "eager" if m.reverted or g.selected is None or g.selected in EAGER_RUNNER.values() else g.selected
        return {n: [runs(m, g) for g in m.graphs] for n, m in self.modules.items()}
