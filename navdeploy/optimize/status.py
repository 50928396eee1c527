"""What ``nav.optimize`` returns: per module and graph every candidate's record and the winner, and the
pipeline's end-to-end timing."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from navdeploy.workspace.records import CandidateRecord, find_candidate

log = logging.getLogger("navdeploy")


@dataclass
class GraphStatus:
    """One input structure of a module: every candidate's record and the winner."""

    key: str
    selected: Optional[str]  # the winner's candidate name (``TensorRT[fp16]``), not only its runner's
    candidates: list[CandidateRecord]
    batching: bool

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


@dataclass
class PipelineTiming:
    """End-to-end time of the callable over the dataloader, eager (the capture pass) and after the swap.

    ``eager_s`` is the capture pass minus navdeploy's recording overhead; ``optimized_s`` one pass with the
    selected runners in place. When the dataloader has two items or more the first is a warm-up and not timed
    (``items_timed`` says how many were). Per-module seconds are inclusive: a module called inside another
    counts in both. ``error`` is set when the optimized pass raised (then ``optimized_s`` is None)."""

    capture_s: float
    eager_s: float
    optimized_s: Optional[float]
    items_timed: int
    module_eager_s: dict[str, float] = field(default_factory=dict)
    module_optimized_s: dict[str, float] = field(default_factory=dict)
    error: Optional[str] = None

    @property
    def speedup(self) -> Optional[float]:
        if not self.optimized_s or not self.eager_s:
            return None
        return self.eager_s / self.optimized_s

    def to_json(self) -> dict:
        return {"capture_s": self.capture_s, "eager_s": self.eager_s, "optimized_s": self.optimized_s,
                "items_timed": self.items_timed, "module_eager_s": self.module_eager_s,
                "module_optimized_s": self.module_optimized_s, "error": self.error}

    @classmethod
    def from_json(cls, data: dict) -> "PipelineTiming":
        return cls(float(data["capture_s"]), float(data["eager_s"]),
                   None if data.get("optimized_s") is None else float(data["optimized_s"]),
                   int(data.get("items_timed", 0)), dict(data.get("module_eager_s", {})),
                   dict(data.get("module_optimized_s", {})), data.get("error"))


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
        """Module name -> the selected candidate name of each graph (None where none was correct)."""
        return {n: [g.selected for g in m.graphs] for n, m in self.modules.items()}
