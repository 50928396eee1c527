"""A module whose weights are already fp16/bf16 is optimized in that precision: not cast again, no duplicate
candidates, checked with its own precision's tolerance; the manifest and table say it was inferred."""

from __future__ import annotations

import torch

import navdeploy as nav
from navdeploy.workspace.manifest import read_manifest


def test_precision_comes_from_the_weights_unless_given():
    module = nav.Module(torch.nn.Linear(4, 4), name="prec_inferred")
    assert module.precision == "fp32" and module.precision_inferred
    module.to(torch.bfloat16)  # cast after wrapping, as users do
    assert module.precision == "bf16"
    given = nav.Module(torch.nn.Linear(4, 4).half(), name="prec_given", precision="fp16")
    assert given.precision == "fp16" and not given.precision_inferred


def test_a_bf16_module_is_optimized_in_bf16_with_its_tolerance(tmp_path, capsys):
    torch.manual_seed(0)
    module = nav.Module(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval().to(torch.bfloat16),
                        name="prec_bf16")
    config = nav.OptimizeConfig(runners=("TorchScriptCPU",), batch_sizes=(1,), max_batch_size=1,
                                profile_time_s=0.02, workspace=tmp_path, use_multiprocessing=False,
                                pipeline_repeats=0)
    with torch.no_grad():
        status = nav.optimize(module, [(1, torch.randn(1, 8, dtype=torch.bfloat16))], config=config)
    names = [c.name for c in status.modules["prec_bf16"].graphs[0].candidates]
    assert names == ["TorchCPU", "TorchScriptCPU"]  # in its own precision: no [bf16] twins, no cast copies
    assert all(c.verified and c.precision == "bf16" for c in status.modules["prec_bf16"].graphs[0].candidates)
    manifest = read_manifest(tmp_path / "prec_bf16")
    assert manifest.precision == "bf16" and manifest.precision_inferred
    assert manifest.tolerances == {"bf16": nav.config.DEFAULT_TOLERANCES["bf16"]}
    assert "bf16 (from its weights)" in capsys.readouterr().err
