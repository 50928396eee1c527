"""torch.compile (inductor) of the eager module, in several modes. Nothing is written: compiled graphs land
in the inductor cache, which navdeploy points into the workspace so reloads compile from cache."""

import torch

from navdeploy.config import Format
from navdeploy.formats.base import LoadContext, RunFn, RunnerSpec, as_list


def _loader(mode: str):
    def load(ctx: LoadContext) -> RunFn:
        # One dynamic compile instead of a recompile per profiled batch size.
        dynamic = ctx.graph.batching or any(t.dynamic_axes for t in ctx.graph.inputs)
        compiled = torch.compile(ctx.module, mode=None if mode == "default" else mode, dynamic=dynamic or None)
        if mode != "reduce-overhead":
            return lambda inputs: as_list(compiled(*inputs))

        def run_graphs(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
            # CUDA graphs replay into static buffers that the next replay overwrites: hand out copies.
            torch.compiler.cudagraph_mark_step_begin()
            return [t.clone() for t in as_list(compiled(*inputs))]

        return run_graphs

    return load


RUNNERS = [
    RunnerSpec("TorchCompileCPU", Format.TORCH, "cpu", _loader("default")),
    RunnerSpec("TorchCompileCUDA", Format.TORCH, "cuda", _loader("default")),
    RunnerSpec("TorchCompileCUDAMaxAutotune", Format.TORCH, "cuda", _loader("max-autotune-no-cudagraphs")),
    RunnerSpec("TorchCompileCUDAGraphs", Format.TORCH, "cuda", _loader("reduce-overhead")),
]
