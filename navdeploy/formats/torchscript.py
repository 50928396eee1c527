"""TorchScript: ``torch.jit.trace`` of the flat module, frozen for inference."""

import warnings

import torch

from navdeploy.formats.base import (
    BuildContext,
    Format,
    FormatSpec,
    LoadContext,
    RunFn,
    RunnerSpec,
    TritonMapping,
    as_list,
)


def _export(ctx: BuildContext) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # trace/deprecation chatter goes nowhere useful; verify judges the result
        traced = torch.jit.trace(ctx.module, tuple(ctx.example), check_trace=False, strict=False)
        frozen = torch.jit.freeze(traced.eval())
    frozen.save(str(ctx.path / "model.pt"))


def _load(ctx: LoadContext) -> RunFn:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(ctx.artifact), map_location=ctx.device)
    return lambda inputs: as_list(module(*inputs))


# Triton's libtorch backend maps <name>__<index> tensor names to forward() argument positions.
FORMAT = FormatSpec(Format.TORCHSCRIPT, artifact="model.pt", export=_export,
                    triton=TritonMapping("pytorch", "pytorch_libtorch", io_names="INPUT__N", python_preference=1))
RUNNERS = [
    RunnerSpec("TorchScriptCPU", Format.TORCHSCRIPT, "cpu", _load, search_rank=30),
    RunnerSpec("TorchScriptCUDA", Format.TORCHSCRIPT, "cuda", _load, search_rank=40),
]
