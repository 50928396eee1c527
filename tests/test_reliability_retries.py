"""A transient failure (the worker killed by a signal from outside, a timeout) is retried once by the next run; a
deterministic one (a crash in the candidate's own code) stays cached. The manifest says which."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch
from torch import nn

import navdeploy as nav
from navdeploy.candidates.isolation import killed_from_outside
from navdeploy.workspace.records import CandidateRecord

RUNNER = "TorchScriptCPU"


class KilledWhileTracing(nn.Module):
    """Killed by ``how`` while TorchScript traces it (inside one candidate's worker), as long as the counter file
    holds a number above 0; each kill counts down, so the test decides how many runs see the failure."""

    def __init__(self, counter: str, how: int):
        super().__init__()
        self.counter = counter
        self.how = how
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if torch.jit.is_tracing():
            left = int(Path(self.counter).read_text())
            if left > 0:
                Path(self.counter).write_text(str(left - 1))
                os.kill(os.getpid(), self.how)
        return self.linear(x).relu()


def _run(module, workspace: Path) -> CandidateRecord:
    cfg = nav.OptimizeConfig(workspace=workspace, target_formats=(nav.Format.TORCH, nav.Format.TORCHSCRIPT),
                             runners=("TorchCPU", RUNNER), batch_sizes=(1,), profile_time_s=0.05, timeout_s=60,
                             pipeline_repeats=0, use_multiprocessing=True)
    status = nav.optimize(module, [(1, torch.randn(1, 4))], cfg)
    return status.modules[module.name].graphs[0].candidate(RUNNER)


def _on_disk(workspace: Path, name: str) -> dict:
    (entry,) = json.loads((workspace / name / "manifest.json").read_text())["graphs"].values()
    return next(c for c in entry["candidates"] if c["runner"] == RUNNER)


def _module(tmp_path: Path, name: str, kills: int, how: int):
    counter = tmp_path / "kills_left"
    counter.write_text(str(kills))
    torch.manual_seed(0)
    return nav.Module(KilledWhileTracing(str(counter), how).eval(), name=name), counter


def test_a_killed_candidate_is_retried_once_then_stays_cached(tmp_path):
    name = "retry_killed_twice"
    module, counter = _module(tmp_path, name, kills=5, how=signal.SIGKILL)
    first = _run(module, tmp_path)
    assert first.status == "failed" and "SIGKILL" in first.error and first.transient and first.retries == 0
    assert _on_disk(tmp_path, name)["transient"] is True

    second = _run(module, tmp_path)  # retried: it ran again (and was killed again)
    assert not second.cached and second.status == "failed" and second.transient and second.retries == 1
    assert int(counter.read_text()) == 3
    assert _on_disk(tmp_path, name)["retries"] == 1

    third = _run(module, tmp_path)  # retried once already: cached, not run
    assert third.cached and third.status == "failed" and third.retries == 1
    assert int(counter.read_text()) == 3


def test_a_retried_candidate_that_passes_is_kept(tmp_path):
    name = "retry_killed_once"
    module, counter = _module(tmp_path, name, kills=1, how=signal.SIGKILL)
    assert _run(module, tmp_path).status == "failed"
    second = _run(module, tmp_path)
    assert second.verified and not second.cached and second.retries == 1, second.error
    assert int(counter.read_text()) == 0


def test_a_crash_in_the_candidates_own_code_stays_cached(tmp_path):
    name = "retry_segfault"
    module, counter = _module(tmp_path, name, kills=5, how=signal.SIGSEGV)
    first = _run(module, tmp_path)
    assert first.status == "failed" and "SIGSEGV" in first.error and not first.transient
    assert _on_disk(tmp_path, name)["transient"] is False
    second = _run(module, tmp_path)
    assert second.cached and second.status == "failed"
    assert int(counter.read_text()) == 4  # the second run never started it


@pytest.mark.parametrize("code, transient", [(-signal.SIGKILL, True), (-signal.SIGTERM, True),
                                             (-signal.SIGSEGV, False), (-signal.SIGABRT, False), (1, False),
                                             (None, False)])
def test_which_exits_are_transient(code, transient):
    assert killed_from_outside(code) is transient


def test_records_of_old_manifests_load_as_deterministic_failures():
    old = {"name": RUNNER, "runner": RUNNER, "format": "torchscript", "device": "cpu", "status": "failed",
           "error": "the candidate process died with SIGKILL, likely out of memory", "step": "isolation"}
    record = CandidateRecord.from_json(old)
    assert not record.transient and record.retries == 0 and not record.worth_retrying()
    again = CandidateRecord.from_json({**old, "transient": True})
    assert again.worth_retrying() and CandidateRecord.from_json(again.to_json()) == again
    assert not CandidateRecord.from_json({**old, "transient": True, "retries": 1}).worth_retrying()
