"""torch.compile (inductor) of the eager module. Nothing is written: compiled graphs land in the
inductor cache, which navdeploy points into the workspace so reloads compile from cache."""

import torch

from navdeploy.config import Format
from navdeploy.formats.base import LoadContext, RunFn, RunnerSpec, as_list


def _load(ctx: LoadContext) -> RunFn:
    # One dynamic compile instead of a recompile per profiled batch size.
    dynamic = ctx.graph.batching or any(t.dynamic_axes for t in ctx.graph.inputs)
    compiled = torch.compile(ctx.module, dynamic=dynamic or None)
    return lambda inputs: as_list(compiled(*inputs))


RUNNERS = [
    RunnerSpec("TorchCompileCPU", Format.TORCH, "cpu", _load),
    RunnerSpec("TorchCompileCUDA", Format.TORCH, "cuda", _load),
]
