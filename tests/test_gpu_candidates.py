"""GPU candidates: the logic that needs no GPU is tested everywhere; the runs need CUDA (and TensorRT /
Torch-TensorRT for theirs) and are skipped with the reason where absent."""

from __future__ import annotations

import importlib.util
import threading
import warnings

import pytest
import torch
from torch import nn

import navdeploy as nav
from navdeploy.candidates.precision import (
    candidate_name,
    candidate_precisions,
    cast_module,
    needs_cast,
    tolerance_precision,
)
from navdeploy.capture.flat_module import FlatModule
from navdeploy.capture.recorder import Recorder
from navdeploy.formats.base import LoadContext
from navdeploy.formats.compile import channels_last_copy, compile_target
from navdeploy.formats.registry import RUNNERS, runners_for
from navdeploy.formats.tensorrt import PRECISION_FLAGS, optimization_profile
from navdeploy.inplace import binding
from navdeploy.workspace.records import CandidateRecord, ProfilePoint

CUDA = torch.cuda.is_available()


def _graph(calls, fn=lambda x, m: (x * m.unsqueeze(-1)).sum(1)):
    """The graph navdeploy captures from calling ``fn`` with each of ``calls`` (tuples of positional args)."""
    rec = Recorder("g", 4, None)
    for args in calls:
        rec.record(fn, args, {})
    return rec.finish()[0]


def test_tensorrt_profile_spans_captured_shapes_and_batch_range():
    graph = _graph([(torch.ones(2, 5, 3), torch.ones(2, 5)), (torch.ones(1, 9, 3), torch.ones(1, 9))])
    (n0, lo0, opt0, hi0), (n1, lo1, opt1, hi1) = optimization_profile(graph, max_batch_size=16)
    assert (n0, n1) == ("input__0", "input__1")
    assert lo0 == (1, 5, 3) and hi0 == (16, 9, 3) and opt0 == (2, 5, 3)  # opt: the first captured call
    assert lo1 == (1, 5) and hi1 == (16, 9)
    for lo, opt, hi in ((lo0, opt0, hi0), (lo1, opt1, hi1)):
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi))


def test_tensorrt_profile_of_an_unbatched_graph_is_static_where_nothing_varied():
    rec = Recorder("u", 4, False)
    rec.record(lambda x: x * 2, (torch.ones(3, 4),), {})
    (_, lo, opt, hi), = optimization_profile(rec.finish()[0], max_batch_size=8)
    assert lo == opt == hi == (3, 4)


def test_precision_flags_and_candidates():
    assert PRECISION_FLAGS["fp16"][0] == ("FP16",)
    assert "TF32" in PRECISION_FLAGS["fp32"][1]  # fp32 means fp32: TF32 off, so it verifies at fp32 tolerance
    assert "INT8" in PRECISION_FLAGS["int8"][0]
    # The reference: fp32 modules get fp32 and fp16 candidates on CUDA; an int8 module stays int8.
    assert candidate_precisions("fp32", "cuda", None) == ("fp32", "fp16")
    assert candidate_precisions("fp32", "cpu", None) == ("fp32",)
    assert candidate_precisions("int8", "cuda", None) == ("int8",)
    assert not needs_cast("fp16", "int8") and needs_cast("fp16", "fp32")
    assert candidate_name("TensorRT", "fp16", "fp32") == "TensorRT[fp16]"
    assert candidate_name("TensorRT", "int8", "int8") == "TensorRT"
    assert RUNNERS["TensorRT"].precision_by == "builder"  # TensorRT gets a flag, the module is not re-cast


def test_fp32_candidates_are_checked_at_tf32_tolerance_where_eager_itself_rounds_to_tf32():
    """cuDNN runs fp32 convolutions in TF32 by default, so eager's own outputs carry TF32 rounding on CUDA: a
    correct compiled conv differs from it by 2.6e-4 on the H200, past the fp32 tolerance."""
    conv = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    linear = nn.Sequential(nn.Linear(4, 4))
    conv_flag, matmul = torch.backends.cudnn.allow_tf32, torch.get_float32_matmul_precision()
    try:
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("highest")
        assert tolerance_precision("fp32", conv, "cuda") == "tf32"
        assert tolerance_precision("fp16", conv, "cuda") == "fp16"  # other precisions keep their own
        assert tolerance_precision("fp32", conv, "cpu") == "fp32"  # no TF32 on the CPU
        assert tolerance_precision("fp32", linear, "cuda") == "fp32"  # fp32 matmuls stay IEEE by default
        torch.set_float32_matmul_precision("high")
        assert tolerance_precision("fp32", linear, "cuda") == "tf32"
        torch.set_float32_matmul_precision("highest")
        torch.backends.cudnn.allow_tf32 = False  # the user asked for IEEE convolutions: strict check
        assert tolerance_precision("fp32", conv, "cuda") == "fp32"
    finally:
        torch.backends.cudnn.allow_tf32 = conv_flag
        torch.set_float32_matmul_precision(matmul)
    config = nav.OptimizeConfig(tolerances={"atol": 1e-6})  # the user's override applies to the tf32 check too
    assert config.tolerance_for("tf32") == (1e-6, 1e-2)


def test_gpu_runners_are_registered_with_their_requirements():
    names = {r.name for r in runners_for("cuda")}
    # max-autotune is opt-in: tried when named, never by default (it takes over 280 s on ResNet-50).
    assert "TorchCompileCUDAMaxAutotune" not in names
    assert [r.name for r in runners_for("cuda", names=("TorchCompileCUDAMaxAutotune",))] == [
        "TorchCUDA", "TorchCompileCUDAMaxAutotune"]
    assert {"TorchCUDA", "TorchCompileCUDA", "TorchCompileCUDAGraphs",
            "TorchScriptCUDA", "TorchExportCUDA", "AOTInductorCUDA", "OnnxCUDA", "OnnxTensorRT", "TensorRT",
            "TorchTensorRT"} <= names
    if importlib.util.find_spec("tensorrt") is None:
        assert "tensorrt" in RUNNERS["TensorRT"].unavailable_reason()
    if importlib.util.find_spec("torch_tensorrt") is None:
        assert "torch_tensorrt" in RUNNERS["TorchTensorRT"].unavailable_reason()
    # The reference's per-module config names these runners: it must validate.
    nav.OptimizeConfig(target_formats=(nav.Format.TENSORRT, nav.Format.ONNX), runners=("TensorRT", "OnnxCUDA"))


def test_bf16_candidates_on_cpu_are_cast_copies_checked_against_fp32(tmp_path):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    module = nav.Module(inner, name="gpu_logic_bf16")
    config = nav.OptimizeConfig(workspace=tmp_path, target_formats=(nav.Format.TORCH, nav.Format.ONNX),
                                runners=("TorchCPU", "OnnxCPU"), precisions=("fp32", "bf16"), batch_sizes=(1, 2),
                                profile_time_s=0.05, use_multiprocessing=False)
    status = nav.optimize(module, [(2, torch.randn(2, 16))], config)
    records = {c.name: c for c in status.modules["gpu_logic_bf16"].graphs[0].candidates}
    assert {"TorchCPU", "TorchCPU[bf16]", "OnnxCPU", "OnnxCPU[bf16]"} == set(records)
    bf16 = records["TorchCPU[bf16]"]
    assert bf16.precision == "bf16" and bf16.max_abs_err > 0  # really ran in bf16
    assert inner[0].weight.dtype == torch.float32  # the user's module was not re-cast
    if records["OnnxCPU[bf16]"].verified:
        assert (tmp_path / "gpu_logic_bf16" / status.modules["gpu_logic_bf16"].graphs[0].key / "onnx-bf16").is_dir()
    x = torch.randn(2, 16)
    out = module(x)
    assert out.dtype == torch.float32  # whatever won, eager's dtype comes back
    torch.testing.assert_close(out, inner(x), atol=5e-2, rtol=5e-2)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device machine)")
def test_cuda_candidates_end_to_end(tmp_path):
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(16, 10)).cuda().eval()
    module = nav.Module(inner, name="gpu_e2e")
    config = nav.OptimizeConfig(workspace=tmp_path, batch_sizes=(1, 4), max_batch_size=4, profile_time_s=0.1,
                                runners=("TorchCUDA", "TorchCompileCUDAGraphs", "TorchScriptCUDA", "TorchExportCUDA",
                                         "OnnxCUDA", "TensorRT"))
    status = nav.optimize(module, [(1, torch.randn(1, 3, 32, 32, device="cuda"))], config)
    records = {c.name: c for c in status.modules["gpu_e2e"].graphs[0].candidates}
    # Verified: profiled in full, or screened out by a faster one (timing decides which; eager was screened out on
    # an H100 in session 30).
    assert records["TorchCUDA"].verified, records["TorchCUDA"]
    assert records["TorchCompileCUDAGraphs[fp16]"].verified, records["TorchCompileCUDAGraphs[fp16]"]
    x = torch.randn(4, 3, 32, 32, device="cuda")
    out = module(x)
    assert out.is_cuda and out.dtype == torch.float32
    torch.testing.assert_close(out, inner(x), atol=1e-2, rtol=1e-2)


class _PositionalConvNet(nn.Module):
    """A conv net with a 4-D parameter that forward views: only conv weights may change layout."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.norm = nn.BatchNorm2d(8)
        self.pos = nn.Parameter(torch.randn(1, 8, 7, 7))

    def forward(self, x):
        y = self.norm(self.conv(x)).relu()
        return y + self.pos.view(1, -1).view_as(self.pos)


class _Features:
    """A feature extractor hooked onto a submodule, keeping what it saw on itself."""

    def __init__(self):
        self.seen = []

    def hook(self, module, args, output):
        self.seen.append(tuple(output.shape))


def _load_context(module, device, precision):
    graph = _graph([(torch.randn(1, 3, 9, 9),)], module)
    return LoadContext(None, FlatModule(module, graph.input_spec), graph, device, precision)


def test_conv_modules_are_compiled_from_a_channels_last_copy():
    net = _PositionalConvNet().eval()
    copy = channels_last_copy(net)
    assert copy is not net
    assert copy.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert copy.pos.is_contiguous()  # not a conv weight: its layout stays, so the view in forward still works
    assert net.conv.weight.is_contiguous() and not net.conv.weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 9, 9)
    torch.testing.assert_close(copy.eval()(x), net(x))
    mlp = nn.Sequential(nn.Linear(4, 4))
    assert channels_last_copy(mlp) is mlp  # nothing to gain, so no copy
    features = _Features()
    net.conv.register_forward_hook(features.hook)  # a bound method: deepcopy alone would copy its object
    channels_last_copy(net).eval()(x)
    assert features.seen == [(2, 8, 7, 7)]  # the user's extractor saw the copy's call
    features.seen.clear()
    cast_module(net, "bf16")(x.bfloat16())  # cast copies (an fp16 candidate of an fp32 module) likewise
    assert features.seen == [(2, 8, 7, 7)]
    net.lock = threading.Lock()  # cannot be deep-copied: compiled as it is rather than failing the candidate
    assert channels_last_copy(net) is net


def test_compile_targets_by_device_and_precision():
    """CUDA half precisions compile a channels-last copy with automatic dynamic shapes; CUDA fp32 compiles the
    module itself (TF32 rounding of NHWC kernels fails the fp32 tolerance); the CPU compiles a batching graph
    once with every axis dynamic."""
    net = _PositionalConvNet().eval()
    module, dynamic = compile_target(_load_context(net, "cuda", "fp16"))
    assert module.inner is not net and module.inner.conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert dynamic is None
    ctx = _load_context(net, "cuda", "fp32")
    assert compile_target(ctx) == (ctx.module, None)
    ctx = _load_context(net, "cpu", "fp16")
    assert ctx.graph.batching and compile_target(ctx) == (ctx.module, True)


def test_runners_warm_up_at_every_profiled_batch_size():
    """A bound runner is called at each profiled batch size before the user's first call (a torch.compile
    runner compiles again for a second batch size); graphs that do not batch get the captured one."""
    graph = _graph([(torch.ones(2, 5, 3), torch.ones(2, 5))])
    captured = [torch.randn(2, 5, 3), torch.randn(2, 5)]
    record = CandidateRecord("TorchCUDA", "TorchCUDA", "torch", "fp32", "cuda",
                             profile=[ProfilePoint(b, 1.0, 1.0, 1.0) for b in (1, 2, 8)])
    assert binding.extra_warm_up_sizes(graph, record, captured) == [1, 8]  # 2 is the captured batch, on any device
    graph.batching = False
    record.profile = [ProfilePoint(None, 1.0, 1.0, 1.0)]
    assert binding.extra_warm_up_sizes(graph, record, captured) == []


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device machine)")
def test_compiled_conv_module_hands_out_contiguous_outputs():
    """The CUDA compile runners run a channels-last copy in fp16; the user still gets eager-layout outputs
    (.view works), at every batch size, and the user's module keeps its layout."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).cuda().eval().half()
    graph = _graph([(torch.randn(1, 3, 16, 16, device="cuda").half(),)], inner)
    for runner in ("TorchCompileCUDA", "TorchCompileCUDAGraphs"):
        run = RUNNERS[runner].load(LoadContext(None, FlatModule(inner, graph.input_spec), graph, "cuda", "fp16"))
        for batch in (1, 4):
            x = torch.randn(batch, 3, 16, 16, device="cuda").half()
            with torch.no_grad():
                (out,) = run([x])
            assert out.is_contiguous(), runner
            torch.testing.assert_close(out.view(batch, -1), inner(x).view(batch, -1), atol=1e-2, rtol=1e-2)
    assert not inner[0].weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device machine)")
def test_bound_compile_runner_serves_every_profiled_batch_size_without_compiling(tmp_path):
    """Bound from the manifest (as load_optimized binds), a CUDA-graph compile runner of an fp32 conv module's
    fp16 candidate has compiled for each profiled batch size before the first call: serving batch 4 compiles
    nothing, and the outputs are the eager ones, in fp32, on the GPU."""
    from torch._dynamo.utils import counters

    from navdeploy.workspace.manifest import read_manifest

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).cuda().eval()
    module = nav.Module(inner, name="gpu_warm")
    config = nav.OptimizeConfig(workspace=tmp_path, batch_sizes=(1, 4), max_batch_size=4, profile_time_s=0.1,
                                runners=("TorchCUDA", "TorchCompileCUDAGraphs"), thorough=True)  # profiled at 1 and 4
    nav.optimize(module, [(1, torch.randn(1, 3, 16, 16, device="cuda"))], config)
    folder = tmp_path / "gpu_warm"
    manifest = read_manifest(folder)
    manifest.reverted = None  # chosen here whatever the pipeline check decided
    for entry in manifest.graphs.values():
        assert {c.name: c.status for c in entry.candidates}["TorchCompileCUDAGraphs[fp16]"] == "ok"
        entry.selected = "TorchCompileCUDAGraphs[fp16]"
    before_bind = counters["stats"]["unique_graphs"]
    assert binding.bind(module, folder, manifest) and module.is_optimized
    compiled = counters["stats"]["unique_graphs"]
    assert compiled > before_bind  # bind compiled (warmed up) the runner
    for batch in (4, 1):
        x = torch.randn(batch, 3, 16, 16, device="cuda")
        with torch.no_grad(), warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            out = module(x)
        # Served by the runner: an eager fallback would also give fp32 outputs and compile nothing.
        assert not [w for w in seen if "navdeploy" in str(w.message)], [str(w.message) for w in seen]
        assert out.is_cuda and out.dtype == torch.float32 and out.is_contiguous()
        torch.testing.assert_close(out, inner(x), atol=1e-2, rtol=1e-2)
    assert counters["stats"]["unique_graphs"] == compiled, "a profiled batch size compiled on the first call"


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device machine)")
def test_parallel_builds_on_the_gpu_profile_alone(tmp_path):
    """Two build workers, each with its own CUDA context, build compile and TorchScript candidates side by side;
    no candidate profiles while another builds, and the bound winner gives eager's outputs on the GPU."""
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1)).cuda().eval()
    module = nav.Module(inner, name="gpu_parallel")
    config = nav.OptimizeConfig(workspace=tmp_path, batch_sizes=(1, 4), max_batch_size=4, profile_time_s=0.1,
                                precisions=("fp32",), build_workers=2, thorough=True,  # every one profiled
                                runners=("TorchCUDA", "TorchScriptCUDA", "TorchCompileCUDA", "TorchExportCUDA"))
    status = nav.optimize(module, [(1, torch.randn(1, 3, 16, 16, device="cuda"))], config)
    records = status.modules["gpu_parallel"].graphs[0].candidates
    assert all(c.status == "ok" for c in records), [(c.name, c.error) for c in records]
    assert len({c.pid for c in records}) == 2
    windows = {c.name: c.window for c in records}
    for name, w in windows.items():
        for other, o in windows.items():
            if other != name:
                for start, end in ((o.start, o.verified), (o.profile, o.end)):
                    assert not (start < w.end and w.profile < end), f"{other} ran while {name} profiled"
    x = torch.randn(4, 3, 16, 16, device="cuda")
    with torch.no_grad():
        out = module(x)
    assert out.is_cuda
    torch.testing.assert_close(out, inner(x), atol=1e-3, rtol=1e-3)


@pytest.mark.cuda
@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is None or not CUDA,
                    reason="TensorRT is not installable on these machines (needs the tensorrt package and a GPU)")
def test_tensorrt_candidate_builds_and_verifies(tmp_path):
    inner = nn.Sequential(nn.Linear(8, 8), nn.ReLU()).cuda().eval()
    module = nav.Module(inner, name="gpu_trt")
    config = nav.OptimizeConfig(workspace=tmp_path, target_formats=(nav.Format.TENSORRT,), runners=("TensorRT",),
                                batch_sizes=(1, 2), profile_time_s=0.1)
    status = nav.optimize(module, [(1, torch.randn(1, 8, device="cuda"))], config)
    records = {c.name: c for c in status.modules["gpu_trt"].graphs[0].candidates}
    assert records["TensorRT"].verified and records["TensorRT[fp16]"].verified
    assert (tmp_path / "gpu_trt" / "tensorrt.timing.cache").exists()


@pytest.mark.cuda
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU (run on the device machine)")
def test_cuda_profile_matches_an_event_timed_loop():
    """navdeploy's profile of a launch-bound call agrees with CUDA events around a loop of calls (a sync per
    call would overstate it), and a call that is slow on the GPU is not understated."""
    from navdeploy.candidates.profile import measure

    x = torch.randn(64, device="cuda")
    big = torch.randn(4096, 4096, device="cuda")

    def launch_bound():
        y = x
        for _ in range(200):
            y = y + 1
        return y

    def gpu_bound():
        return big @ big

    for fn in (launch_bound, gpu_bound):
        for _ in range(5):
            fn()
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(50):
            fn()
        end.record()
        torch.cuda.synchronize()
        loop_ms = start.elapsed_time(end) / 50
        profiled = measure(fn, None, "cuda", 0.5)
        assert 0.7 < profiled.p50_ms / loop_ms < 1.3, (fn.__name__, profiled.p50_ms, loop_ms)
