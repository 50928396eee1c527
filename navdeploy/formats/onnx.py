"""ONNX (from the graph's shared ExportedProgram, with its dynamic shapes; the dynamo exporter on the module and the
TorchScript exporter as fallbacks) run by ONNX Runtime."""

from __future__ import annotations

import contextlib
import logging
import warnings
from typing import Optional

import torch

from navdeploy.formats.base import (
    BuildContext,
    Format,
    FormatSpec,
    LoadContext,
    RunFn,
    RunnerSpec,
    RunnerTriton,
    TritonMapping,
)
from navdeploy.formats.exported_program import dynamic_shapes, export_program

log = logging.getLogger(__name__)


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else ""


def _clear(folder) -> None:
    for leftover in folder.iterdir():
        leftover.unlink()


def export_onnx(ctx: BuildContext) -> None:
    """Write ``model.onnx`` (and its external data) into ``ctx.path``: translated from the graph's shared
    ExportedProgram (the one torch.export AOTInductor compiles too), else by the dynamo exporter from the module
    (its own export strategies), else by the TorchScript exporter."""
    path = str(ctx.path / "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(export_program(ctx), tuple(ctx.example), path, dynamo=True, external_data=True,
                              input_names=ctx.input_names, output_names=ctx.output_names)
            return
        except Exception as exc:  # noqa: BLE001 - the dynamo exporter has export strategies of its own
            log.warning("ONNX from the ExportedProgram failed (%s: %s); trying the dynamo exporter on the module",
                        type(exc).__name__, _first_line(exc))
        _clear(ctx.path)
        try:
            torch.onnx.export(ctx.module, tuple(ctx.example), path, dynamo=True, external_data=True,
                              dynamic_shapes=dynamic_shapes(ctx), input_names=ctx.input_names,
                              output_names=ctx.output_names)
            return
        except Exception as exc:  # noqa: BLE001 - fall back to the TorchScript-based exporter
            log.warning("dynamo ONNX export failed (%s: %s); trying the TorchScript exporter",
                        type(exc).__name__, _first_line(exc))
        _clear(ctx.path)
        axes = {name: {a: f"{name}_axis{a}" for a in dyn}
                for name, dyn in zip(ctx.input_names, ctx.dynamic_axes) if dyn}
        torch.onnx.export(ctx.module, tuple(ctx.example), path, dynamo=False, input_names=ctx.input_names,
                          output_names=ctx.output_names, dynamic_axes=axes, opset_version=17)


def _provider_check(provider: str):
    def check() -> Optional[str]:
        import onnxruntime

        if provider not in onnxruntime.get_available_providers():
            return f"onnxruntime has no {provider} (install onnxruntime-gpu)"
        return None

    return check


_HOST_COPY_WARNED = False


def _to_torch(value, device: torch.device) -> torch.Tensor:
    """An ORT output as a torch tensor without a copy, through DLPack: the protocol (``OrtValue.__dlpack__``, recent
    onnxruntime), else ``OrtValue.to_dlpack()`` (older builds). Only where neither exists does a CUDA output travel
    through host memory (``numpy()`` and back), and the log says so once."""
    global _HOST_COPY_WARNED
    with contextlib.suppress(AttributeError, TypeError, RuntimeError, BufferError):
        return torch.from_dlpack(value)
    with contextlib.suppress(AttributeError, RuntimeError):
        return torch.utils.dlpack.from_dlpack(value.to_dlpack())
    if device.type == "cuda" and not _HOST_COPY_WARNED:
        _HOST_COPY_WARNED = True
        log.warning("this onnxruntime build hands out no DLPack tensors: ONNX Runtime CUDA outputs are copied "
                    "through host memory")
    return torch.from_numpy(value.numpy()).to(device)


def session_options():
    """ORT session options that share the process with torch: ORT's threads never spin, and its pool is as large as
    torch's, not one thread per core on top of torch's own. Workers left spinning after a run slowed the next torch
    call of a pipeline 2-20x on 2 cores. Spinning only inside a run (``session.force_spinning_stop``) made a lone ORT
    run 20-35% faster (a small BERT 2.4 against 1.8 ms), yet the whole SD pipeline around its ONNX UNet erratic:
    fresh-process medians 20-32 against 22-26 ms, p90 up to 41 against up to 32 ms on 2 cores
    (``benchmarks/ort_spinning_check.py``)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def _loader(providers: list):
    def load(ctx: LoadContext) -> RunFn:
        import onnxruntime

        session = onnxruntime.InferenceSession(str(ctx.artifact), session_options(), providers=providers)
        if providers[0] != "CPUExecutionProvider" and session.get_providers()[0] != providers[0]:
            # ORT falls back to the next provider with only a log line when one cannot start (e.g. CUDA or cuDNN
            # libraries it cannot load): this runner would run elsewhere than its name says.
            raise RuntimeError(f"{providers[0]} did not start (the session runs {session.get_providers()}); "
                               "check that onnxruntime-gpu matches this CUDA and cuDNN (import torch first, or "
                               "call onnxruntime.preload_dlls())")
        names = [i.name for i in session.get_inputs()]
        out_names = [o.name for o in session.get_outputs()]
        device = torch.device(ctx.device)

        def run_cpu(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
            return [torch.from_numpy(o) for o in session.run(None, feeds)]

        def run_cuda(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            # IO binding: ORT reads the torch CUDA buffers in place and keeps outputs on the GPU.
            binding = session.io_binding()
            kept = [t.contiguous() for t in inputs]
            for name, t in zip(names, kept):
                binding.bind_input(name, "cuda", t.device.index or 0, torch.empty(0, dtype=t.dtype).numpy().dtype,
                                   tuple(t.shape), t.data_ptr())
            for name in out_names:
                binding.bind_output(name, "cuda", device.index or 0)
            torch.cuda.current_stream().synchronize()  # ORT uses its own stream
            session.run_with_iobinding(binding)
            return [_to_torch(v, device) for v in binding.get_outputs()]

        run = run_cuda if device.type == "cuda" else run_cpu
        run.session = session  # what it runs, for inspection (its options, providers)
        return run

    return load


FORMAT = FormatSpec(Format.ONNX, artifact="model.onnx", export=export_onnx, requires=("onnx", "onnxscript"),
                    triton=TritonMapping("onnxruntime", "onnxruntime_onnx", io_names="onnx-file",
                                         python_preference=2))
RUNNERS = [
    RunnerSpec("OnnxCPU", Format.ONNX, "cpu", _loader(["CPUExecutionProvider"]), requires=("onnxruntime",),
               search_rank=20, follows_up=False),
    RunnerSpec("OnnxCUDA", Format.ONNX, "cuda", _loader(["CUDAExecutionProvider", "CPUExecutionProvider"]),
               requires=("onnxruntime",), is_available=_provider_check("CUDAExecutionProvider"),
               triton=RunnerTriton(accelerator="cuda"), search_rank=30),
    RunnerSpec("OnnxTensorRT", Format.ONNX, "cuda",
               _loader(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]),
               requires=("onnxruntime",), is_available=_provider_check("TensorrtExecutionProvider"),
               builds_alone=True,  # the EP builds and times its engine when the session starts
               triton=RunnerTriton(accelerator="tensorrt"), search_rank=30),
]
