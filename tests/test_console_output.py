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


def test_the_bf16_hint_names_what_to_set_only_where_bf16_was_not_tried(tmp_path):
    from navdeploy.candidates.precision import cpu_computes_bf16
    from navdeploy.optimize.status import GraphStatus, ModuleStatus, OptimizeStatus
    from navdeploy.report.console import bf16_hint
    from navdeploy.workspace.records import CandidateRecord

    def status(*precisions: str, device: str = "cpu") -> OptimizeStatus:
        records = [CandidateRecord(f"TorchCPU[{p}]" if p != "fp32" else "TorchCPU", "TorchCPU", "torch", p, device)
                   for p in precisions]
        module = ModuleStatus("m", tmp_path, device, [GraphStatus("g", "TorchCPU", records, True)], True, 1.0)
        return OptimizeStatus(modules={"m": module})

    hint = bf16_hint(status("fp32"))
    assert (hint is not None) == cpu_computes_bf16()  # AVX512-BF16 or AMX on this machine, or not
    if hint is not None:
        assert 'precisions=("fp32", "bf16")' in hint
    assert bf16_hint(status("fp32", "bf16")) is None  # tried already
    from navdeploy.optimize.status import PipelineTiming

    quick = status("fp32")
    quick.pipeline = PipelineTiming(0.0, 0.004, 0.002, 4, {"m": 0.004}, {"m": 0.002})  # 1 ms a call: not worth it
    assert bf16_hint(quick) is None
    quick.pipeline.module_eager_s = {"m": 0.04}  # 10 ms a call
    assert (bf16_hint(quick) is not None) == cpu_computes_bf16()
    assert bf16_hint(status("fp32", device="cuda")) is None  # fp16 is tried there by default
