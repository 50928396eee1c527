"""``torch.export`` ExportedProgram (``.pt2``) with the captured dynamic axes."""

from __future__ import annotations

import time

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
    """The flat module's ExportedProgram: exported once per graph and precision in a worker and shared by the
    formats that start from it (AOTInductor, ONNX, the ExportedProgram itself; none of them changes it). The
    export that runs it records ``torch_export_s``."""
    shared = ctx.shared if ctx.shared is not None else {}
    if "exported_program" in shared:
        return shared["exported_program"]
    if "export_error" in shared:  # it failed for an earlier format: it would fail the same way again
        raise shared["export_error"]
    start = time.perf_counter()
    try:
        program = _export(ctx)
    except Exception as exc:
        shared["export_error"] = exc
        raise
    finally:
        ctx.timings["torch_export_s"] = time.perf_counter() - start
    shared["exported_program"] = program
    return program


def _export(ctx: BuildContext) -> torch.export.ExportedProgram:
    """Export the flat module; dims the model forces to a constant fall back to Dim.AUTO."""
    try:
        return torch.export.export(ctx.module, tuple(ctx.example), dynamic_shapes=dynamic_shapes(ctx))
    except Exception as exc:  # constraint violations have several exception types
        if "Constraints violated" not in str(exc) and "specialized" not in str(exc):
            raise
        auto = tuple([{a: torch.export.Dim.AUTO for a in axes} or None for axes in ctx.dynamic_axes])
        return torch.export.export(ctx.module, tuple(ctx.example), dynamic_shapes=(auto,))


def _save(ctx: BuildContext) -> None:
    torch.export.save(export_program(ctx), str(ctx.path / "model.pt2"))


def _load(ctx: LoadContext) -> RunFn:
    module = torch.export.load(str(ctx.artifact)).module()
    return lambda inputs: as_list(module(*inputs))


# No native Triton backend loads an ExportedProgram: its graphs are served by model.py, which prefers it.
FORMAT = FormatSpec(Format.TORCH_EXPORTEDPROGRAM, artifact="model.pt2", export=_save,
                    triton=TritonMapping(python_preference=0))
RUNNERS = [
    # It runs the exported aten graph uncompiled, at about eager's speed (0.74-1.35x eager's time in the CPU
    # pipelines' full profiles, never selected in ~250 graphs of benchmarks/results): built last among what it shares
    # the export with, and by default only where nothing else gives model.py an artifact.
    RunnerSpec("TorchExportCPU", Format.TORCH_EXPORTEDPROGRAM, "cpu", _load, search_rank=40, follows_up=False,
               runs_eager_kernels=True),
    RunnerSpec("TorchExportCUDA", Format.TORCH_EXPORTEDPROGRAM, "cuda", _load, search_rank=50,
               runs_eager_kernels=True),
]
