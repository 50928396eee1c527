"""Torch-TensorRT (dynamo frontend): TensorRT engines inside an ExportedProgram, inputs with the captured
min/opt/max shapes, precisions enabled by candidate precision. Written against the documented
``torch_tensorrt.compile(ir="dynamo")`` / ``torch_tensorrt.save`` API; not installable on CI machines."""

from __future__ import annotations

import torch

from navdeploy.formats.base import BuildContext, Format, FormatSpec, LoadContext, RunFn, RunnerSpec, as_list
from navdeploy.formats.tensorrt import optimization_profile

ENABLED_PRECISIONS = {"fp32": (torch.float32,), "tf32": (torch.float32,), "fp16": (torch.float32, torch.float16),
                      "bf16": (torch.float32, torch.bfloat16), "int8": (torch.float32, torch.float16, torch.int8)}


def _export(ctx: BuildContext) -> None:
    import torch_tensorrt

    profile = optimization_profile(ctx.graph, max((a.get(0, (1, 1))[1] for a in ctx.dynamic_axes), default=1))
    inputs = [torch_tensorrt.Input(min_shape=lo, opt_shape=opt, max_shape=hi, dtype=t.dtype)
              for (_, lo, opt, hi), t in zip(profile, ctx.example)]
    compiled = torch_tensorrt.compile(ctx.module, ir="dynamo", inputs=inputs,
                                      enabled_precisions=set(ENABLED_PRECISIONS[ctx.precision]))
    torch_tensorrt.save(compiled, str(ctx.path / "model.ep"), inputs=list(ctx.example))


def _load(ctx: LoadContext) -> RunFn:
    import torch_tensorrt  # noqa: F401 - registers the TensorRT ops the saved program calls

    module = torch.export.load(str(ctx.artifact)).module()
    return lambda inputs: as_list(module(*inputs))


FORMAT = FormatSpec(Format.TORCH_TRT, artifact="model.ep", export=_export, requires=("torch_tensorrt",))
RUNNERS = [RunnerSpec("TorchTensorRT", Format.TORCH_TRT, "cuda", _load, requires=("torch_tensorrt",),
                      precision_by="builder", builds_alone=True)]
