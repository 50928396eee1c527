"""AOTInductor on the CPU freezes the weights (constants prepacked for oneDNN) where most matmul weights are wide:
the rule on real architectures, and a frozen package that verifies, wins, and never runs stale weights."""

from __future__ import annotations

import warnings

import pytest
import torch
from transformers import BertConfig, BertModel, GPT2Config, GPT2Model, ViTConfig, ViTModel

import navdeploy as nav
from navdeploy.formats.aoti import FREEZE_MIN_WIDTH, freezes


def _bert(hidden: int) -> torch.nn.Module:
    return BertModel(BertConfig(vocab_size=100, hidden_size=hidden, num_hidden_layers=1, num_attention_heads=4,
                                intermediate_size=4 * hidden)).eval()


def test_weights_freeze_where_most_matmul_weights_are_wide():
    assert FREEZE_MIN_WIDTH == 192
    assert freezes(_bert(384))  # MiniLM's width: 5.4 -> 3.0 ms a call frozen (benchmarks/aoti_freezing_check.py)
    assert not freezes(_bert(128))  # 37% slower frozen at batch 1
    vit = ViTModel(ViTConfig(image_size=32, patch_size=16, num_hidden_layers=1, hidden_size=192,
                             num_attention_heads=3, intermediate_size=768))
    assert freezes(vit)  # 14% faster frozen
    gpt2 = GPT2Model(GPT2Config(vocab_size=100, n_embd=256, n_layer=1, n_head=4, bos_token_id=0, eos_token_id=0))
    assert freezes(gpt2)  # transformers' Conv1D layers count as matmuls
    cnn = torch.nn.Sequential(torch.nn.Conv2d(3, 256, 3), torch.nn.ReLU(), torch.nn.Conv2d(256, 256, 3))
    assert not freezes(cnn)  # convolutions only
    # Counted by weight elements: one wide head does not make a narrow body freeze.
    narrow_body = torch.nn.Sequential(*[torch.nn.Linear(128, 128) for _ in range(8)], torch.nn.Linear(128, 256))
    assert not freezes(narrow_body)
    # bf16 builds always freeze: 0.59-0.91 of the plain bf16 build on every module measured, 128-wide BERT
    # (0.75) and the SD text encoder, 32 wide (0.85), included (aoti_freezing_check.py --precision bf16)
    assert freezes(_bert(128).to(torch.bfloat16), "bf16")
    assert freezes(cnn.to(torch.bfloat16), "bf16")


@pytest.mark.slow
def test_a_frozen_package_verifies_and_never_runs_stale_weights(tmp_path, choose_candidate):
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.GELU(), torch.nn.Linear(512, 256)).eval()
    model = nav.Module(mlp, name="frozen_mlp")
    config = nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU", "AOTInductorCPU"), batch_sizes=(1, 4),
                                max_batch_size=4, profile_time_s=0.05, pipeline_repeats=0)
    with torch.no_grad():
        status = nav.optimize(lambda x: model(x), [(4, torch.randn(4, 256)), (4, torch.randn(4, 256))], config)
    records = {c.name: c for c in status.modules["frozen_mlp"].graphs[0].candidates}
    assert records["AOTInductorCPU"].verified, records["AOTInductorCPU"].error
    assert "AOTInductor freezes the weights" in (tmp_path / "frozen_mlp" / "navdeploy.log").read_text()

    # The frozen package bound (whatever the timings said); then a weight edited in place: the call runs eagerly,
    # with the live weights, and says why.
    choose_candidate(model, tmp_path, "AOTInductorCPU")
    x = torch.randn(3, 256)
    with torch.no_grad():
        torch.testing.assert_close(model(x), mlp(x), atol=1e-5, rtol=1e-4)
        mlp[0].weight.mul_(2.0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = model(x)
        torch.testing.assert_close(out, mlp(x))
    assert any("navdeploy" in str(w.message) for w in caught), [str(w.message) for w in caught]


def _wrapper_opt_level(workspace) -> str:
    """The -O flag the package's wrapper was compiled with: AOTInductor writes its g++ command into the packaged
    wrapper source as a comment."""
    import re
    import zipfile

    [package] = list(workspace.rglob("model.pt2"))  # the one module's one AOTInductor build
    with zipfile.ZipFile(package) as archive:
        [source] = [n for n in archive.namelist() if n.endswith(".wrapper.cpp")]
        text = archive.read(source).decode()
    [command] = [line for line in text.splitlines() if line.startswith("// g++") and ".wrapper.cpp" in line]
    return re.search(r" -(O\w+) ", command).group(1)


@pytest.mark.slow
def test_the_cpu_wrapper_compiles_at_og_unless_the_user_set_a_level(tmp_path, monkeypatch):
    # -Og compiles the wrapper ~0.5-0.9 s faster than torch's -O1, calls as fast (aoti_wrapper_opt_check.py).
    def build(workspace, name: str) -> str:
        model = nav.Module(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()).eval(), name=name)
        config = nav.OptimizeConfig(workspace=workspace, runners=("TorchCPU", "AOTInductorCPU"), batch_sizes=(1,),
                                    max_batch_size=1, profile_time_s=0.05, pipeline_repeats=0, keep_artifacts=True)
        status = nav.optimize(lambda x: model(x), [(1, torch.randn(1, 8))], config)
        aoti = {c.name: c for c in status.modules[name].graphs[0].candidates}["AOTInductorCPU"]
        assert aoti.verified, aoti.error
        return _wrapper_opt_level(workspace / name)

    assert build(tmp_path, "default") == "Og"
    # The workers inherit it. O0, not torch's own O1 (that would pass were it dropped); g++ 12 crashes on this
    # wrapper at O2.
    monkeypatch.setenv("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")
    assert build(tmp_path, "user_level") == "O0"
