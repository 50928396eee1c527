"""The module itself, run eagerly: the baseline every candidate is compared with."""

from navdeploy.formats.base import Format, FormatSpec, LoadContext, RunFn, RunnerSpec, as_list

FORMAT = FormatSpec(Format.TORCH)


def _load(ctx: LoadContext) -> RunFn:
    module = ctx.module
    return lambda inputs: as_list(module(*inputs))


RUNNERS = [RunnerSpec("TorchCPU", Format.TORCH, "cpu", _load), RunnerSpec("TorchCUDA", Format.TORCH, "cuda", _load)]
