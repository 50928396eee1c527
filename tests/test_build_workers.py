"""How many build workers a module gets when the user names none: 1 on the CPU; on CUDA from the host's cores and
the GPU's free memory (``navdeploy.config.default_build_workers``); the config, then NAVDEPLOY_BUILD_WORKERS, win."""

from __future__ import annotations

import pytest
import torch

import navdeploy as nav
from navdeploy.config import build_workers, default_build_workers

GiB = 1 << 30


@pytest.mark.parametrize("cores, free_gib, module_gib, expected", [
    (16, 139, 0.05, 2),    # the H200 host: ResNet-50 (100 MB)
    (16, 139, 1.7, 2),     # the same host: an SD 2.1 UNet in fp16
    (2, 139, 0.05, 1),     # few cores: one worker
    (64, 139, 0.05, 4),    # many cores: at most 4
    (64, 24, 1.7, 1),      # a 24 GiB GPU with an SD UNet: one copy per worker at most fits in half of it
    (64, 40, 1.7, 2),
    (7, 80, 0.01, 1),
])
def test_cuda_default_follows_cores_and_gpu_memory(cores, free_gib, module_gib, expected):
    assert default_build_workers("cuda", cores, int(free_gib * GiB), int(module_gib * GiB)) == expected


def test_cpu_default_is_one_worker():
    assert default_build_workers("cpu", 64, 0, 10**9) == 1
    assert build_workers(nav.OptimizeConfig(), "cpu", torch.nn.Linear(4, 4)) == 1


def test_the_config_then_the_environment_win(monkeypatch):
    monkeypatch.setenv("NAVDEPLOY_BUILD_WORKERS", "3")
    assert build_workers(nav.OptimizeConfig(), "cuda") == 3
    assert build_workers(nav.OptimizeConfig(build_workers=2), "cuda") == 2
    monkeypatch.setenv("NAVDEPLOY_BUILD_WORKERS", "many")
    with pytest.raises(nav.ConfigError, match="NAVDEPLOY_BUILD_WORKERS"):
        build_workers(nav.OptimizeConfig(), "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device machine)")
def test_cuda_default_on_this_machine(monkeypatch):
    monkeypatch.delenv("NAVDEPLOY_BUILD_WORKERS", raising=False)
    workers = build_workers(nav.OptimizeConfig(), "cuda", torch.nn.Linear(4, 4).cuda())
    assert 1 <= workers <= 4
