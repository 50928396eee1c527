"""End to end on CPU: every default candidate is built, verified, profiled (the exhaustive search, thorough=True;
tests/test_search.py covers the default one); the winner is swapped in, written to the workspace, reused from
cache (also by a default run), and reloaded in a fresh process."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import navdeploy as nav
from navdeploy.workspace.layout import build_dir

CPU_RUNNERS = {"TorchCPU", "TorchCompileCPU", "TorchScriptCPU", "TorchExportCPU", "AOTInductorCPU", "OnnxCPU"}


def small_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4)).eval()


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    """One full default optimize of a small CNN, shared by the tests below."""
    workspace = tmp_path_factory.mktemp("ws")
    model = nav.Module(small_cnn(), name="e2e_cnn")
    data = [(1, torch.randn(1, 3, 16, 16)) for _ in range(3)] + [(2, torch.randn(2, 3, 16, 16))]
    user_set_cache = "TORCHINDUCTOR_CACHE_DIR" in os.environ
    status = nav.optimize(model, data, nav.OptimizeConfig(workspace=workspace, thorough=True))
    if not user_set_cache:
        # torch.compile/AOTInductor cached inside the module's folder, and the variable is not left behind.
        assert (workspace / "inductor_cache" / "e2e_cnn").is_dir()
        assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ
    return model, status, workspace


def test_every_cpu_candidate_is_tried_and_the_fastest_correct_one_wins(optimized):
    model, status, _ = optimized
    graphs = status.modules["e2e_cnn"].graphs
    assert len(graphs) == 1 and graphs[0].batching
    records = {c.runner: c for c in graphs[0].candidates}
    assert set(records) == CPU_RUNNERS
    ok = {name: r for name, r in records.items() if r.status == "ok"}
    assert "TorchCPU" in ok and len(ok) >= 4, {n: r.error for n, r in records.items()}
    for r in ok.values():
        assert r.max_abs_err <= 1e-4
        assert [m.batch_size for m in r.profile] == [1, 2, 4, 8]
    winner = graphs[0].selected
    assert winner in ok
    # MinLatency over the captured mix (3 calls at batch 1, 1 at batch 2: the mean per call): nobody correct is
    # faster than the winner, except by less than a routed call costs, when eager (no routing at all) stays.
    from navdeploy.candidates.select import ROUTING_COST_MS

    mix = graphs[0].batch_counts
    assert mix == {1: 3, 2: 1}

    def per_call(r):
        at = {m.batch_size: m.p50_ms for m in r.profile}
        return sum(n * at[b] for b, n in mix.items()) / sum(mix.values())

    fastest = min(per_call(r) for r in ok.values())
    if winner == "TorchCPU":
        assert per_call(ok[winner]) - fastest < ROUTING_COST_MS
    else:
        assert per_call(ok[winner]) == fastest


def test_swapped_module_returns_what_eager_returns(optimized):
    model, status, _ = optimized
    ms = status.modules["e2e_cnn"]
    assert model.is_optimized or ms.graphs[0].selected == "TorchCPU" or ms.reverted  # eager won, or the check chose it
    for batch in (1, 3, 8):
        x = torch.randn(batch, 3, 16, 16)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("error")  # inside the optimized range: no eager fallback warning
            out = model(x)
            expected = model.__wrapped__(x)
        assert isinstance(out, torch.Tensor) and out.dtype == expected.dtype and out.device == expected.device
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-3)


def test_inputs_outside_what_was_captured_fall_back_to_eager_with_one_warning(optimized):
    model, status, _ = optimized
    if not model.is_optimized:
        pytest.skip("eager won: nothing to fall back from")
    x = torch.randn(1, 3, 20, 20)  # spatial size never captured
    with pytest.warns(RuntimeWarning, match="runs eagerly"):
        out = model(x)
    torch.testing.assert_close(out, model.__wrapped__(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same kind of fallback warns once only
        model(torch.randn(1, 3, 24, 24))
    with pytest.warns(RuntimeWarning, match="new input structure"):
        out = model(input=x)  # passed by keyword: a structure never captured
    torch.testing.assert_close(out, model.__wrapped__(x))


def test_workspace_holds_manifest_log_samples_and_artifacts(optimized):
    _, status, workspace = optimized
    folder = workspace / "e2e_cnn"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["module"] == "e2e_cnn" and manifest["device"] == "cpu"
    (key, entry), = manifest["graphs"].items()
    assert entry["selected"] == status.modules["e2e_cnn"].graphs[0].selected
    log = (folder / "navdeploy.log").read_text()
    bind_s = status.modules["e2e_cnn"].bind_s
    assert bind_s is not None and 0 <= bind_s < status.modules["e2e_cnn"].seconds
    assert re.search(r"module e2e_cnn bound in \d+\.\d s", log) or status.modules["e2e_cnn"].reverted, log[-2000:]
    samples = torch.load(folder / key / "samples.pt", weights_only=True)
    assert len(samples["inputs"]) == len(samples["outputs"]) >= 2
    for fmt, state in entry["formats"].items():
        assert state["status"] != "ok" or (folder / key / build_dir(fmt, state["checksum"])).is_dir()
    assert not list(folder.rglob("*.tmp*")), "no half-written files are left behind"


def test_rerun_with_nothing_changed_reuses_every_result(optimized):
    model, status, workspace = optimized
    data = [(1, torch.randn(1, 3, 16, 16)) for _ in range(3)] + [(2, torch.randn(2, 3, 16, 16))]
    again = nav.optimize(model, data, nav.OptimizeConfig(workspace=workspace))
    graph = again.modules["e2e_cnn"].graphs[0]
    assert all(c.cached for c in graph.candidates if c.status != "skipped")
    assert graph.selected == status.modules["e2e_cnn"].graphs[0].selected


def test_changed_weights_are_never_served_from_stale_artifacts(optimized):
    model, status, workspace = optimized
    original = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.__wrapped__[0].weight.add_(0.5)  # "fine-tuning"
    with pytest.warns(RuntimeWarning, match="changed .*since it was optimized"):
        assert nav.load_optimized(workspace)["e2e_cnn"] is False
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(model(x), model.__wrapped__(x))
    model.load_state_dict(original)
    ms = status.modules["e2e_cnn"]
    assert nav.load_optimized(workspace)["e2e_cnn"] is (ms.optimized or ms.reverted is not None)  # bound either way


def test_fresh_process_reloads_without_optimizing(optimized):
    _, status, workspace = optimized
    script = textwrap.dedent(f"""
        import sys, torch, warnings
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import navdeploy as nav
        from test_optimize_e2e import small_cnn
        model = nav.Module(small_cnn(), name="e2e_cnn")
        loaded = nav.load_optimized({str(workspace)!r})
        x = torch.randn(4, 3, 16, 16)
        torch.testing.assert_close(model(x), model.__wrapped__(x), atol=1e-4, rtol=1e-3)
        print("LOADED", loaded["e2e_cnn"], model.is_optimized)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    from navdeploy.workspace.manifest import read_manifest

    # What the workspace holds now: a re-run above (test_rerun_with_nothing_changed...) may have reverted the module,
    # as the pipeline check's verdict on this tiny CNN is timing noise.
    manifest = read_manifest(workspace / "e2e_cnn")
    winner = next(iter(manifest.graphs.values())).selected
    assert winner == status.modules["e2e_cnn"].graphs[0].selected
    runs_winner = winner != "TorchCPU" and not manifest.reverted  # reverted: eager there too
    assert f"LOADED True {runs_winner}" in out.stdout


class TwoOutputs(nn.Module):
    """Returns an HF ModelOutput, takes a kwarg and a string constant."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 6)

    def forward(self, x, mask=None, mode: str = "sum"):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        h = self.proj(x) * mask.unsqueeze(-1)
        pooled = h.sum(1) if mode == "sum" else h.mean(1)
        return BaseModelOutputWithPooling(last_hidden_state=h, pooler_output=pooled)


@torch.no_grad()  # the optimized path: with grad on, parameters that require grad send a call to eager
def test_model_outputs_kwargs_strings_and_output_mapping(tmp_path, choose_candidate):
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    torch.manual_seed(0)
    inner = TwoOutputs().eval()
    plain = nav.Module(inner, name="e2e_modeloutput")
    data = [(2, (torch.randn(2, s, 6), {"mask": torch.ones(2, s), "mode": m})) for s in (3, 5) for m in ("sum", "mean")]
    config = nav.OptimizeConfig(workspace=tmp_path, target_formats=(nav.Format.ONNX,), batch_sizes=(1, 2),
                                profile_time_s=0.05)
    status = nav.optimize(plain, data, config)
    assert len(status.modules["e2e_modeloutput"].graphs) == 2  # "sum" and "mean" are two graphs
    assert all(g.selected for g in status.modules["e2e_modeloutput"].graphs)
    x, mask = torch.randn(1, 4, 6), torch.ones(1, 4)
    for mode in ("sum", "mean"):
        out = plain(x, mask=mask, mode=mode)
        ref = inner(x, mask=mask, mode=mode)
        assert type(out) is BaseModelOutputWithPooling
        torch.testing.assert_close(out.pooler_output, ref.pooler_output, atol=1e-4, rtol=1e-3)

    mapped = nav.Module(TwoOutputs().eval(), name="e2e_mapped",
                        output_mapping=lambda o: ("mapped", BaseModelOutputWithPooling(**o)))
    nav.optimize(mapped, data[:1], config)
    choose_candidate(mapped, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the optimized path, not the eager fallback
        out = mapped(torch.randn(1, 3, 6), mask=torch.ones(1, 3), mode="sum")
    assert out[0] == "mapped" and isinstance(out[1], BaseModelOutputWithPooling)


def test_another_pipelines_module_is_only_warned_about(tmp_path):
    """Two pipelines in one process: a module that an earlier optimize captured, left eager by a later
    load_optimized that found nothing for it, belongs to another pipeline; optimizing this one goes on with a
    warning naming it. In the "load, else optimize" flow a module never captured and not called stays an error."""
    fast = dict(runners=("TorchCPU",), profile_time_s=0.02)
    other = nav.Module(nn.Linear(3, 3), name="e2e_other_pipeline")
    nav.optimize(other, [(1, torch.randn(1, 3))], nav.OptimizeConfig(workspace=tmp_path / "other", **fast))
    nav.load_optimized(tmp_path / "empty")
    assert not other.is_optimized
    mine = nav.Module(nn.Linear(3, 3), name="e2e_this_pipeline")
    with pytest.warns(RuntimeWarning, match="e2e_other_pipeline.*captured by an earlier optimize"):
        status = nav.optimize(mine, [(1, torch.randn(1, 3))], nav.OptimizeConfig(workspace=tmp_path, **fast))
    assert set(status.modules) == {"e2e_this_pipeline"} and status.modules["e2e_this_pipeline"].graphs[0].selected
    with pytest.raises(nav.CaptureError, match="called none of the wrapped modules"):
        nav.optimize(lambda x: x, [(1, torch.randn(1, 3))], nav.OptimizeConfig(workspace=tmp_path))


def test_load_else_optimize_still_names_a_module_that_needs_forward_func(tmp_path):
    class Encoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(3, 3)

        def forward(self, x):
            return self.linear(x)

        def encode(self, x):
            return self.forward(x) * 2  # calls forward directly: the wrapper never sees it without forward_func

    used = nav.Module(nn.Linear(3, 3), name="e2e_load_else_used")
    encoder = nav.Module(Encoder(), name="e2e_load_else_encoder")
    nav.load_optimized(tmp_path)  # nothing there yet
    with pytest.raises(nav.CaptureError, match="e2e_load_else_encoder.*forward_func"):
        nav.optimize(lambda x: encoder.encode(used(x)), [(1, torch.randn(1, 3))],
                     nav.OptimizeConfig(workspace=tmp_path, runners=("TorchCPU",)))


def test_module_never_called_is_named_in_the_error(tmp_path):
    used = nav.Module(nn.Linear(3, 3), name="e2e_used")
    unused = nav.Module(nn.Linear(3, 3), name="e2e_unused")  # noqa: F841 - registered, never called
    with pytest.raises(nav.CaptureError, match="e2e_unused.*forward_func"):
        nav.optimize(used, [(1, torch.randn(1, 3))], nav.OptimizeConfig(workspace=tmp_path))
    assert not (tmp_path / "e2e_used").exists()
