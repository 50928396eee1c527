"""``torch.export`` ExportedProgram (``.pt2``) with the captured dynamic axes."""

from __future__ import annotations

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


def dynamic_shapes(ctx: BuildContext) -> tuple:
    """torch.export dynamic_shapes for the flat inputs: one ``{axis: Dim}`` per input, by position."""
    shapes = []
    for i, axes in enumerate(ctx.dynamic_axes):
        shapes.append({axis: torch.export.Dim(f"in{i}_axis{axis}", min=lo, max=hi) for axis, (lo, hi) in axes.items()}
                      or None)
    return (tuple(shapes),)  # FlatModule.forward(*tensors): the varargs are one positional tuple


def export_program(ctx: BuildContext) -> torch.export.ExportedProgram:
    """Export the flat module; dims the model forces to a constant fall back to Dim.AUTO."""
    try:
        return torch.export.export(ctx.module, tuple(ctx.example), dynamic_shapes=dynamic_shapes(ctx))
    except Exception as exc:  # constraint violations have several exception types
        if "Constraints violated" not in str(exc) and "specialized" not in str(exc):
            raise
        auto = tuple([{a: torch.export.Dim.AUTO for a in axes} or None for axes in ctx.dynamic_axes])
        return torch.export.export(ctx.module, tuple(ctx.example), dynamic_shapes=(auto,))


def _export(ctx: BuildContext) -> None:
    torch.export.save(export_program(ctx), str(ctx.path / "model.pt2"))


def _load(ctx: LoadContext) -> RunFn:
    module = torch.export.load(str(ctx.artifact)).module()
    return lambda inputs: as_list(module(*inputs))


# No native Triton backend loads an ExportedProgram: its graphs are served by model.py, which prefers it.
FORMAT = FormatSpec(Format.TORCH_EXPORTEDPROGRAM, artifact="model.pt2", export=_export,
                    triton=TritonMapping(python_preference=0))
RUNNERS = [
    RunnerSpec("TorchExportCPU", Format.TORCH_EXPORTEDPROGRAM, "cpu", _load),
    RunnerSpec("TorchExportCUDA", Format.TORCH_EXPORTEDPROGRAM, "cuda", _load),
]
