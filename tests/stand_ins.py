"""Modules that stand in for real ones in tests, shared by several test files (imported by module name: pytest puts
this folder on ``sys.path``, and navdeploy's workers get the same path)."""

from __future__ import annotations

import time

import torch

from navdeploy.candidates.build import Job
from navdeploy.capture.recorder import Recorder


class SlowInBf16(torch.nn.Module):
    """Compute-bound layers whose eager forward also waits 10 ms when it runs in bf16 (``waits_in``: a stand-in for
    kernels that are slower in bf16 on this CPU), so that eager's bf16 copy says the other copies do not pay; a
    traced copy records the layers only."""

    waits_in = torch.bfloat16

    def __init__(self, layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        if x.dtype == self.waits_in and not torch.jit.is_tracing():
            time.sleep(0.01)
        return self.layers(x)


class WaitsInEager(torch.nn.Module):
    """Narrow layers whose eager forward also waits ``wait_s`` (a traced copy records the layers only): eager's
    call time is known ahead, for tests of decisions taken on it."""

    def __init__(self, layers: torch.nn.Module, wait_s: float):
        super().__init__()
        self.layers = layers
        self.wait_s = wait_s

    def forward(self, x):
        if not torch.jit.is_tracing():
            time.sleep(self.wait_s)
        return self.layers(x)


class FastInBf16(SlowInBf16):
    """As :class:`SlowInBf16`, waiting in fp32 instead (a stand-in for kernels that are much faster in bf16 on this
    CPU), so that eager's bf16 copy says the copies stand for the fp32 builds. ``broken_bf16_trace``: a traced bf16
    copy adds 1 to the output, so that it fails verification."""

    waits_in = torch.float32

    def __init__(self, layers: torch.nn.Module, broken_bf16_trace: bool = False):
        super().__init__(layers)
        self.broken_bf16_trace = broken_bf16_trace

    def forward(self, x):
        out = super().forward(x)
        broken = self.broken_bf16_trace and x.dtype == torch.bfloat16 and torch.jit.is_tracing()
        return out + 1 if broken else out


def linear_job(folder, name: str) -> Job:
    """The job of a small Linear with one captured graph, for tests that drive executors directly."""
    module = torch.nn.Linear(4, 4).eval()
    recorder = Recorder(name, 4, None)
    recorder.record(module, (torch.randn(2, 4),), {})
    graph = recorder.finish()[0]
    return Job(name, module, None, {graph.key: graph}, folder, "cpu", "fp32", {"fp32": (1e-4, 1e-3)}, None,
               (1, 2), 2, 0.05)
