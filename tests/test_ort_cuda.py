"""ONNX Runtime's CUDA execution provider (needs a GPU and onnxruntime-gpu; skipped with the reason elsewhere):
the OnnxCUDA candidate builds, verifies and profiles next to a torch candidate, runs on the CUDA provider, and its
IO binding keeps inputs and outputs on the GPU (no host copy in a call)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import navdeploy as nav
from navdeploy.formats.registry import RUNNERS
from navdeploy.inplace.binding import bind
from navdeploy.workspace.layout import module_dir
from navdeploy.workspace.manifest import read_manifest


def _cuda_ep_reason():
    if not torch.cuda.is_available():
        return "needs a CUDA GPU (run on the device machine)"
    return RUNNERS["OnnxCUDA"].unavailable_reason()


pytestmark = pytest.mark.skipif(bool(_cuda_ep_reason()), reason=str(_cuda_ep_reason()))


def _host_copies(fn) -> list[str]:
    """Names of the host<->device copies (and torch copies, ``aten::_to_copy``) recorded while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = [e.name for e in prof.events()]
    return [n for n in names if "HtoD" in n or "DtoH" in n or n == "aten::_to_copy"]


def test_onnx_cuda_candidate_runs_on_the_gpu_without_host_copies(tmp_path):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 3, padding=1)).cuda().eval()
    module = nav.Module(inner, name="ort_cuda")
    config = nav.OptimizeConfig(workspace=tmp_path, batch_sizes=(1, 4), max_batch_size=4, profile_time_s=0.1,
                                runners=("TorchCUDA", "TorchScriptCUDA", "OnnxCUDA"), precisions=("fp32",),
                                pipeline_repeats=0, thorough=True)  # OnnxCUDA profiled in full, even when it loses
    status = nav.optimize(module, [(1, torch.randn(1, 3, 32, 32, device="cuda"))], config)
    records = {c.name: c for c in status.modules["ort_cuda"].graphs[0].candidates}
    onnx = records["OnnxCUDA"]
    assert onnx.status == "ok", onnx
    assert {p.batch_size for p in onnx.profile} == {1, 4}

    # Bind OnnxCUDA itself (whatever won) and look inside the bound runner.
    folder = module_dir(tmp_path, "ort_cuda")
    manifest = read_manifest(folder)
    for entry in manifest.graphs.values():
        entry.selected = "OnnxCUDA"
    manifest.reverted = None
    assert bind(module, folder, manifest)
    (_, run), = module.nav_state.handler.graphs.values()
    assert run.session.get_providers()[0] == "CUDAExecutionProvider"
    x = torch.randn(4, 3, 32, 32, device="cuda")
    with torch.no_grad():
        out = run([x])[0]
        assert out.is_cuda
        torch.testing.assert_close(out, inner(x), atol=1e-3, rtol=1e-3)
        assert _host_copies(lambda: run([x])) == []
