"""What validating a Triton model repository reports: one :class:`Problem` per thing Triton would refuse (or
silently change), each naming the model, the field, the value and the fix."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a repository: where (model, field), what, and how to fix it."""

    model: str
    field: str
    message: str
    fix: str
    severity: str = "error"  # "error" (Triton refuses the model) or "warning"

    def __str__(self) -> str:
        return f"[{self.severity}] model {self.model!r}, {self.field}: {self.message} Fix: {self.fix}"
