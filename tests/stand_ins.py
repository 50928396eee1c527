"""Modules that stand in for real ones in tests, shared by several test files (imported by module name: pytest puts
this folder on ``sys.path``, and navdeploy's workers get the same path)."""

from __future__ import annotations

import time

import torch


class SlowInBf16(torch.nn.Module):
    """Compute-bound layers whose eager forward also waits 10 ms when it runs in bf16 (a stand-in for kernels
    that are slower in bf16 on this CPU), so that eager's bf16 copy says the other copies do not pay; a traced copy
    records the layers only."""

    def __init__(self, layers: torch.nn.Module):
        super().__init__()
        self.layers = layers

    def forward(self, x):
        if x.dtype == torch.bfloat16 and not torch.jit.is_tracing():
            time.sleep(0.01)
        return self.layers(x)
