"""TensorRT: the ONNX export built into an engine with one optimization profile from the captured
min/opt/max shapes, precision flags by candidate precision, and a timing cache kept in the workspace.
The runner enqueues with ``execute_async_v3`` on the current torch CUDA stream, inputs and outputs stay on
the GPU. Written against the TensorRT 10 Python API; TensorRT cannot be installed on navdeploy's CI machines,
so only the shape/flag logic is unit-tested there."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from navdeploy.capture.graph import Graph
from navdeploy.formats.base import BuildContext, Format, FormatSpec, LoadContext, RunFn, RunnerSpec, TritonMapping
from navdeploy.formats.onnx import export_onnx

log = logging.getLogger("navdeploy")
WORKSPACE_BYTES = 8 << 30
TIMING_CACHE = "tensorrt.timing.cache"

# (flags to set, flags to clear) per candidate precision. fp32 clears TF32 so it is compared as true fp32;
# int8 expects a pre-quantized (Q/DQ) network and keeps fp16 for the layers that are not quantized.
PRECISION_FLAGS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "fp32": ((), ("TF32",)),
    "tf32": (("TF32",), ()),
    "fp16": (("FP16",), ()),
    "bf16": (("BF16",), ()),
    "int8": (("INT8", "FP16"), ()),
}


def optimization_profile(graph: Graph, max_batch_size: int) -> list[tuple[str, tuple, tuple, tuple]]:
    """(input name, min, opt, max) shapes for one TensorRT optimization profile from what was captured.

    Static axes are the captured size; dynamic axes span the captured range; the batch axis (when the
    graph batches) spans 1..max_batch_size with the captured batch as opt."""
    profile = []
    for i, (spec, axes) in enumerate(zip(graph.inputs, graph.dynamic_axes(max_batch_size))):
        lo, opt, hi = list(spec.opt_shape), list(spec.opt_shape), list(spec.opt_shape)
        for axis, (a_min, a_max) in axes.items():
            lo[axis], hi[axis] = a_min, a_max
            opt[axis] = min(max(opt[axis], a_min), a_max)
        profile.append((f"input__{i}", tuple(lo), tuple(opt), tuple(hi)))
    return profile


def build_engine(onnx_path: Path, plan_path: Path, profile, precision: str, cache_path: Path) -> None:
    """Parse the ONNX file, build and serialize the engine; reuse and update the timing cache."""
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # explicit batch is the only mode in TensorRT 10
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse the ONNX model: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    set_flags, clear_flags = PRECISION_FLAGS[precision]
    for flag in set_flags:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    for flag in clear_flags:
        config.clear_flag(getattr(trt.BuilderFlag, flag))
    opt_profile = builder.create_optimization_profile()
    for name, lo, opt, hi in profile:
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.exists() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise RuntimeError("TensorRT failed to build the engine (see navdeploy.log)")
    plan_path.write_bytes(bytes(engine))
    # Replaced whole: a build killed mid-write must not leave a torn cache that fails the next build.
    tmp = cache_path.with_name(f"{cache_path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(bytes(config.get_timing_cache().serialize()))
    os.replace(tmp, cache_path)


def _export(ctx: BuildContext) -> None:
    export_onnx(ctx)
    build_engine(ctx.path / "model.onnx", ctx.path / "model.plan", optimization_profile(ctx.graph, _max_batch(ctx)),
                 ctx.precision, ctx.module_dir / TIMING_CACHE)


def _max_batch(ctx: BuildContext) -> int:
    return max((axes.get(0, (1, 1))[1] for axes in ctx.dynamic_axes), default=1)


def _torch_dtype(trt_dtype) -> torch.dtype:
    import tensorrt as trt

    return {trt.float32: torch.float32, trt.float16: torch.float16, trt.bfloat16: torch.bfloat16,
            trt.int32: torch.int32, trt.int64: torch.int64, trt.int8: torch.int8, trt.bool: torch.bool,
            trt.uint8: torch.uint8}[trt_dtype]


def _load(ctx: LoadContext) -> RunFn:
    import tensorrt as trt

    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(Path(ctx.artifact).read_bytes())
    context = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
    out_dtypes = [_torch_dtype(engine.get_tensor_dtype(n)) for n in outputs]

    def run(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        kept = []  # keep contiguous copies alive until the enqueue is done
        for name, t in zip(inputs, tensors):
            t = t.contiguous()
            kept.append(t)
            context.set_input_shape(name, tuple(t.shape))
            context.set_tensor_address(name, t.data_ptr())
        results = []
        for name, dtype in zip(outputs, out_dtypes):
            out = torch.empty(tuple(context.get_tensor_shape(name)), dtype=dtype, device="cuda")
            context.set_tensor_address(name, out.data_ptr())
            results.append(out)
        if not context.execute_async_v3(torch.cuda.current_stream().cuda_stream):
            raise RuntimeError("TensorRT execute_async_v3 failed")
        return results

    return run


FORMAT = FormatSpec(Format.TENSORRT, artifact="model.plan", export=_export, requires=("tensorrt", "onnx"),
                    triton=TritonMapping("tensorrt", "tensorrt_plan", copy_artifact_only=True))
RUNNERS = [RunnerSpec("TensorRT", Format.TENSORRT, "cuda", _load, requires=("tensorrt",), precision_by="builder",
                      builds_alone=True)]
