"""A candidate that crashes, hangs or raises is marked failed with the reason; optimize carries on."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch import nn

import navdeploy as nav

FAST = dict(batch_sizes=(1, 2), max_batch_size=2, profile_time_s=0.05)


class Faulty(nn.Module):
    """Fine when run eagerly; misbehaves only while TorchScript traces it (i.e. inside one candidate)."""

    def __init__(self, fault: str):
        super().__init__()
        self.fault = fault
        self.linear = nn.Linear(4, 4)

    def forward(self, x):
        if torch.jit.is_tracing():
            if self.fault == "segfault":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif self.fault == "oom":
                # What the kernel's OOM killer does to a process; a real OOM would take the machine down with it.
                os.kill(os.getpid(), signal.SIGKILL)
            elif self.fault == "hang":
                time.sleep(600)
            elif self.fault == "raise":
                raise RuntimeError("boom while tracing")
        return self.linear(x).relu()


def _optimize(fault: str, tmp_path, **config):
    torch.manual_seed(0)
    module = nav.Module(Faulty(fault).eval(), name=f"faulty_{fault}_{len(config)}")
    cfg = nav.OptimizeConfig(workspace=tmp_path, target_formats=(nav.Format.TORCH, nav.Format.TORCHSCRIPT,
                                                                 nav.Format.ONNX),
                             runners=("TorchCPU", "TorchScriptCPU", "OnnxCPU"), **FAST, **config)
    status = nav.optimize(module, [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))], cfg)
    records = {c["runner"]: c for c in status.modules[module.name].graphs[0].candidates}
    return module, records


@pytest.mark.parametrize("fault, reason", [("segfault", "died with SIGSEGV in "), ("hang", "timed out after 10 s"),
                                           ("oom", "died with SIGKILL, likely out of memory"),
                                           ("raise", "boom while tracing")])
def test_faulty_candidate_fails_alone(fault, reason, tmp_path):
    module, records = _optimize(fault, tmp_path, timeout_s=10)
    assert records["TorchScriptCPU"]["status"] == "failed"
    assert reason in records["TorchScriptCPU"]["error"]
    if fault == "segfault":  # the worker's faulthandler dump names where the crash happened
        assert "tests/test_isolation.py:" in records["TorchScriptCPU"]["error"]
        assert " in forward (stack in " in records["TorchScriptCPU"]["error"]
    # The next candidate runs in a fresh worker and is unaffected.
    assert records["OnnxCPU"]["status"] == "ok", records["OnnxCPU"]["error"]
    assert records["TorchCPU"]["status"] == "ok"
    assert records["OnnxCPU"]["pid"] != os.getpid()  # it ran in a spawned child
    x = torch.randn(2, 4)
    torch.testing.assert_close(module(x), module.__wrapped__(x), atol=1e-4, rtol=1e-3)


def test_a_crash_beside_other_builds_fails_alone(tmp_path):
    """With two build workers the crashing candidate's thread releases the timing gate: the others finish."""
    module, records = _optimize("segfault", tmp_path, build_workers=2)
    assert "died with SIGSEGV in " in records["TorchScriptCPU"]["error"]
    assert records["OnnxCPU"]["status"] == "ok" and records["TorchCPU"]["status"] == "ok"
    x = torch.randn(2, 4)
    torch.testing.assert_close(module(x), module.__wrapped__(x), atol=1e-4, rtol=1e-3)


def test_in_process_mode_still_survives_an_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("NAVIGATOR_USE_MULTIPROCESSING", "False")  # the peer's name is accepted too
    _, records = _optimize("raise", tmp_path)
    assert records["TorchScriptCPU"]["status"] == "failed" and "boom" in records["TorchScriptCPU"]["error"]
    assert records["OnnxCPU"]["status"] == "ok"
    assert records["OnnxCPU"]["pid"] == os.getpid()  # no child process was used


def test_crash_site_is_read_only_from_the_crashing_threads_dump(tmp_path):
    from navdeploy.isolation import _describe_exit

    log = tmp_path / "navdeploy.log"
    old = 'Traceback (most recent call last):\n  File "/x/old.py", line 1 in before\n'
    log.write_text(old)
    offset = log.stat().st_size
    current = ('Fatal Python error: Segmentation fault\n\nThread 0x01 (most recent call first):\n'
               '  File "/usr/lib/python3.11/threading.py", line 327 in wait\n\n'
               'Current thread 0x02 (most recent call first):\n  File "/site/torch/_inductor/package.py", line 9 in load\n'
               '  File "/site/navdeploy/candidate.py", line 5 in run_task\n\nExtension modules: torch._C\n')
    with open(log, "a") as f:
        f.write(current)
    assert _describe_exit(-11, log, offset).startswith("the candidate process died with SIGSEGV in torch/_inductor/"
                                                       "package.py:9 in load (stack in ")
    # A SIGKILL leaves no dump: a traceback logged earlier in the task is not a crash site.
    assert _describe_exit(-9, log, 0) == "the candidate process died with SIGKILL, likely out of memory"
    # No dump after the task's offset: nothing to name.
    log.write_text(old)
    assert _describe_exit(-11, log, 0) == "the candidate process died with SIGSEGV"
    # A crash in a thread without Python (no "Current thread"), or one with no Python frame: nothing to name.
    log.write_text('Fatal Python error: Segmentation fault\n\nThread 0x01 (most recent call first):\n'
                   '  File "/usr/lib/python3.11/threading.py", line 327 in wait\n')
    assert _describe_exit(-11, log, 0) == "the candidate process died with SIGSEGV"
    log.write_text('Fatal Python error: Segmentation fault\n\nCurrent thread 0x02 (most recent call first):\n'
                   '  <no Python frame>\n\nThread 0x01 (most recent call first):\n'
                   '  File "/usr/lib/python3.11/threading.py", line 327 in wait\n')
    assert _describe_exit(-11, log, 0) == "the candidate process died with SIGSEGV"
