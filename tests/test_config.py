"""Fast unit tests of navdeploy.config: validation, tolerances, batch sizes, environment settings and the run
defaults the CLI passes in-process."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch

import navdeploy as nav
from navdeploy.config import (
    DEFAULT_TOLERANCES,
    console_output,
    current_run_defaults,
    default_workspace,
    resolve_workspace,
    run_defaults,
    use_multiprocessing,
)
from navdeploy.formats.registry import known_runner_names

ENV_VARS = ("NAVDEPLOY_USE_MULTIPROCESSING", "NAVIGATOR_USE_MULTIPROCESSING",
            "NAVDEPLOY_CONSOLE_OUTPUT", "NAVIGATOR_CONSOLE_OUTPUT", "NAVDEPLOY_WORKSPACE")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for name in ENV_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.mark.parametrize("kwargs, field", [
    ({"target_formats": ["not-a-format"]}, "target_formats"),
    ({"target_formats": [nav.Format.ONNX, "tensorrt-ish"]}, "target_formats"),
    ({"runners": ["NoSuchRunner"]}, "runners"),
    ({"tolerances": {"atol": -1.0}}, "atol"),
    ({"tolerances": {"rtol": -0.1}}, "rtol"),
    ({"tolerances": {"atol": "big"}}, "atol"),
    ({"tolerances": {"abs": 1e-3}}, "tolerances"),
    ({"batch_sizes": [1, 0]}, "batch_sizes"),
    ({"batch_sizes": []}, "batch_sizes"),
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"max_batch_size": -4}, "max_batch_size"),
    ({"target_device": "gpu"}, "target_device"),
    ({"strategy": "fastest"}, "strategy"),
    ({"strategy": nav.MinLatency}, "strategy"),  # the class, not an instance
    ({"sample_count": 0}, "sample_count"),
    ({"timeout_s": 0}, "timeout_s"),
    ({"profile_time_s": -1}, "profile_time_s"),
])
def test_invalid_values_raise_config_error_naming_field(kwargs, field):
    with pytest.raises(nav.ConfigError) as info:
        nav.OptimizeConfig(**kwargs)
    assert field in str(info.value)
    assert isinstance(info.value, nav.NavdeployError) and isinstance(info.value, ValueError)


def test_unknown_format_lists_valid_formats():
    with pytest.raises(nav.ConfigError, match="ONNX"):
        nav.OptimizeConfig(target_formats=["bogus"])


def test_unknown_runner_lists_known_runners():
    with pytest.raises(nav.ConfigError) as info:
        nav.OptimizeConfig(runners=["NoSuchRunner"])
    assert "'NoSuchRunner'" in str(info.value)
    assert "TorchCPU" in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_target_without_cuda():
    with pytest.raises(nav.ConfigError, match="target_device"):
        nav.OptimizeConfig(target_device="cuda")


def test_latency_budget_must_be_positive():
    for bad in (0, -1.5):
        with pytest.raises(nav.ConfigError, match="LatencyBudget"):
            nav.LatencyBudget(bad)
    assert nav.LatencyBudget(2.5).ms == 2.5


def test_replace_validates_again():
    cfg = nav.OptimizeConfig()
    assert cfg.replace(max_batch_size=4).max_batch_size == 4
    assert cfg.max_batch_size == 8
    with pytest.raises(nav.ConfigError, match="max_batch_size"):
        cfg.replace(max_batch_size=0)


def test_defaults_valid():
    cfg = nav.OptimizeConfig()
    assert cfg.target_formats is None and cfg.runners is None and cfg.batch_sizes is None
    assert isinstance(cfg.strategy, nav.MinLatency)
    assert cfg.max_batch_size >= 1 and cfg.sample_count >= 1


def test_formats_accept_enum_or_value():
    cfg = nav.OptimizeConfig(target_formats=[nav.Format.ONNX, "torchscript", "torch-aoti"])
    assert cfg.target_formats == (nav.Format.ONNX, nav.Format.TORCHSCRIPT, nav.Format.TORCH_AOTI)
    assert all(isinstance(f, nav.Format) for f in cfg.target_formats)


def test_single_format_or_runner_is_not_split_into_letters():
    assert nav.OptimizeConfig(target_formats=nav.Format.ONNX).target_formats == (nav.Format.ONNX,)
    assert nav.OptimizeConfig(target_formats="onnx").target_formats == (nav.Format.ONNX,)
    assert nav.OptimizeConfig(runners="TorchCPU").runners == ("TorchCPU",)


def test_runner_names():
    known = known_runner_names()
    assert "TorchCPU" in known
    for name in ("OnnxCPU", "TensorRT", "TorchCompileCPU"):
        if name in known:
            assert nav.OptimizeConfig(runners=[name]).runners == (name,)
        else:
            with pytest.raises(nav.ConfigError, match=name):
                nav.OptimizeConfig(runners=[name])


def test_valid_values_accepted():
    cfg = nav.OptimizeConfig(target_device="cpu", batch_sizes=[4, 1, 4, 2], max_batch_size=4,
                             tolerances={"atol": 0, "rtol": 0.5}, strategy=nav.LatencyBudget(10),
                             sample_count=1, verify_func=lambda e, a: True)
    assert cfg.batch_sizes == (1, 2, 4)  # sorted, deduplicated
    for strategy in (nav.MinLatency(), nav.MaxThroughput(), nav.LatencyBudget(0.1)):
        assert nav.OptimizeConfig(strategy=strategy).strategy == strategy


def test_tolerance_for():
    cfg = nav.OptimizeConfig()
    assert cfg.tolerance_for("fp32") == DEFAULT_TOLERANCES["fp32"]
    assert cfg.tolerance_for("fp16") == DEFAULT_TOLERANCES["fp16"]
    assert cfg.tolerance_for("unknown") == DEFAULT_TOLERANCES["fp32"]
    only_atol = nav.OptimizeConfig(tolerances={"atol": 0.25})
    assert only_atol.tolerance_for("fp16") == (0.25, DEFAULT_TOLERANCES["fp16"][1])
    both = nav.OptimizeConfig(tolerances={"atol": 1, "rtol": 0})
    assert both.tolerance_for("bf16") == (1.0, 0.0)


def test_profile_batch_sizes():
    assert nav.OptimizeConfig(max_batch_size=8).profile_batch_sizes([1]) == (1, 2, 4, 8)
    assert nav.OptimizeConfig(max_batch_size=8).profile_batch_sizes([3, 1]) == (1, 2, 3, 4, 8)
    assert nav.OptimizeConfig(max_batch_size=6).profile_batch_sizes([16]) == (1, 2, 4, 6)
    assert nav.OptimizeConfig(max_batch_size=1).profile_batch_sizes([1]) == (1,)
    # CUDA: the captured sizes only (each further size is one more torch.compile of the module)
    assert nav.OptimizeConfig().profile_batch_sizes([2], "cuda") == (2,)
    assert nav.OptimizeConfig(max_batch_size=4).profile_batch_sizes([1, 2, 16], "cuda") == (1, 2, 4)
    assert nav.OptimizeConfig(batch_sizes=[1, 8]).profile_batch_sizes([2], "cuda") == (1, 8)
    user = nav.OptimizeConfig(batch_sizes=[16, 2, 4], max_batch_size=8)
    assert user.profile_batch_sizes([1]) == (2, 4)
    assert nav.OptimizeConfig(batch_sizes=[32, 16], max_batch_size=8).profile_batch_sizes([1]) == (16,)


# --- environment ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["NAVDEPLOY_USE_MULTIPROCESSING", "NAVIGATOR_USE_MULTIPROCESSING"])
def test_use_multiprocessing_env(monkeypatch, name):
    cfg = nav.OptimizeConfig()
    assert use_multiprocessing(cfg) is True  # default
    for value, expected in (("0", False), ("false", False), ("No", False), ("off", False),
                            ("1", True), ("true", True), ("YES", True)):
        monkeypatch.setenv(name, value)
        assert use_multiprocessing(cfg) is expected, value
    monkeypatch.setenv(name, "0")
    assert use_multiprocessing(nav.OptimizeConfig(use_multiprocessing=True)) is True  # the config wins
    monkeypatch.setenv(name, "1")
    assert use_multiprocessing(nav.OptimizeConfig(use_multiprocessing=False)) is False


def test_navdeploy_env_wins_over_navigator_alias(monkeypatch):
    monkeypatch.setenv("NAVDEPLOY_USE_MULTIPROCESSING", "1")
    monkeypatch.setenv("NAVIGATOR_USE_MULTIPROCESSING", "0")
    assert use_multiprocessing(nav.OptimizeConfig()) is True
    monkeypatch.setenv("NAVDEPLOY_CONSOLE_OUTPUT", "logs")
    monkeypatch.setenv("NAVIGATOR_CONSOLE_OUTPUT", "detailed")
    assert console_output() == "logs"


@pytest.mark.parametrize("name", ["NAVDEPLOY_CONSOLE_OUTPUT", "NAVIGATOR_CONSOLE_OUTPUT"])
def test_console_output_env(monkeypatch, name):
    assert console_output() == "simple"
    for value, expected in (("detailed", "detailed"), (" LOGS ", "logs"), ("simple", "simple")):
        monkeypatch.setenv(name, value)
        assert console_output() == expected
    monkeypatch.setenv(name, "verbose")
    with pytest.raises(nav.ConfigError, match=name):
        console_output()


def test_workspace_resolution(monkeypatch, tmp_path):
    assert default_workspace() == Path.home() / ".cache" / "navdeploy"
    monkeypatch.setenv("NAVDEPLOY_WORKSPACE", str(tmp_path / "ws"))
    assert default_workspace() == tmp_path / "ws"
    assert resolve_workspace(None) == tmp_path / "ws"
    assert resolve_workspace(nav.OptimizeConfig(workspace=tmp_path / "own")) == tmp_path / "own"
    assert resolve_workspace(nav.OptimizeConfig()) == tmp_path / "ws"


def test_run_defaults_win_over_the_environment_and_never_write_it(monkeypatch, tmp_path):
    monkeypatch.setenv("NAVDEPLOY_WORKSPACE", str(tmp_path / "env"))
    monkeypatch.setenv("NAVDEPLOY_CONSOLE_OUTPUT", "detailed")
    before = dict(os.environ)
    with run_defaults(workspace=tmp_path / "cli", console="logs"):
        assert default_workspace() == resolve_workspace(None) == tmp_path / "cli"
        assert resolve_workspace(nav.OptimizeConfig(workspace=tmp_path / "own")) == tmp_path / "own"  # config wins
        assert console_output() == "logs"
        with run_defaults(console="simple"):  # nested: keeps the enclosing workspace
            assert console_output() == "simple" and default_workspace() == tmp_path / "cli"
        assert console_output() == "logs"
        assert dict(os.environ) == before
    assert default_workspace() == tmp_path / "env" and console_output() == "detailed"


def test_run_defaults_are_restored_on_error_and_checked(tmp_path):
    with pytest.raises(RuntimeError), run_defaults(workspace=tmp_path):
        raise RuntimeError("the script failed")
    assert current_run_defaults().workspace is None and default_workspace() == Path.home() / ".cache" / "navdeploy"
    with pytest.raises(nav.ConfigError, match="simple, detailed or logs"), run_defaults(console="verbose"):
        pass
    assert current_run_defaults().console is None


def test_run_defaults_reach_threads(tmp_path):
    seen = []
    with run_defaults(workspace=tmp_path):
        thread = threading.Thread(target=lambda: seen.append(default_workspace()))
        thread.start()
        thread.join()
    assert seen == [tmp_path]
