"""NAVDEPLOY_CONSOLE_OUTPUT=simple|detailed|logs (and the NAVIGATOR_ alias) change what optimize prints."""

import pytest
import torch
from torch import nn

import navdeploy as nav


@pytest.mark.parametrize("variable, mode", [("NAVDEPLOY_CONSOLE_OUTPUT", "simple"),
                                            ("NAVIGATOR_CONSOLE_OUTPUT", "detailed"),
                                            ("NAVDEPLOY_CONSOLE_OUTPUT", "logs")])
def test_console_modes(variable, mode, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(variable, mode)
    monkeypatch.setenv("NAVDEPLOY_USE_MULTIPROCESSING", "0")
    module = nav.Module(nn.Linear(3, 3).eval(), name=f"console_{mode}")
    config = nav.OptimizeConfig(workspace=tmp_path, target_formats=(nav.Format.TORCHSCRIPT,), batch_sizes=(1,),
                                profile_time_s=0.02)
    nav.optimize(module, [(1, torch.randn(1, 3))], config)
    err = capsys.readouterr().err
    assert "TorchScriptCPU" in err and str(tmp_path) in err  # the table and where the log is
    assert ("verify" in err) == (mode == "detailed")  # time per step only when detailed
    assert ("optimizing console_logs" in err) == (mode == "logs")  # log records only with logs
    assert "optimizing" in (tmp_path / f"console_{mode}" / "navdeploy.log").read_text()


def test_unknown_console_mode_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("NAVDEPLOY_CONSOLE_OUTPUT", "verbose")
    nav.Module(nn.Linear(3, 3), name="console_bad")
    with pytest.raises(nav.ConfigError, match="simple, detailed or logs"):
        nav.optimize(lambda x: x, [(1, torch.randn(1, 3))])
