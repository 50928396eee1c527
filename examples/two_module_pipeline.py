"""A plain-Python pipeline with two ``nn.Module``s, each optimized with its own configuration.

The pipeline is not an ``nn.Module``: it is a class whose ``__call__`` runs an ``encoder`` and a ``head``
with a bit of Python in between. Each module gets a per-module ``optimize_config`` (as in the reference's
"Per module configuration"); the config passed to ``nav.optimize`` applies only to modules without one.

    python examples/two_module_pipeline.py
    python examples/two_module_pipeline.py --model-repository model_repository   # regenerate the committed one
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import nn

import navdeploy as nav

ENCODER_RUNNERS = ("OnnxCPU", "TorchScriptCPU")
HEAD_FORMATS = (nav.Format.TORCH_EXPORTEDPROGRAM,)
# The runner each module's models in the committed model_repository/ run: fixed, so that the repository does not
# depend on which candidate was fastest on the machine that regenerated it.
REPOSITORY_RUNNERS = {"encoder": "TorchScriptCPU", "head": "TorchExportCPU"}


class Encoder(nn.Module):
    """A small conv encoder: images [B, 3, 32, 32] -> features [B, 64]."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 64), nn.ReLU(),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


class Head(nn.Module):
    """An MLP classifier head: features [B, 64] -> logits [B, 10]."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 10))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)


class Pipeline:
    """Not an nn.Module: ``pipe(images, scale=0.5)`` -> class probabilities [B, 10]."""

    def __init__(self):
        torch.manual_seed(0)  # same weights in every process, so a fresh process can reuse the artifacts
        self.encoder = Encoder().eval()
        self.head = Head().eval()

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        features = self.encoder(images) * scale  # plain Python between the two modules
        return self.head(features).softmax(dim=-1)


def build_pipeline(workspace: Optional[str] = None) -> Pipeline:
    """The pipeline with both modules wrapped and their per-module configs set.

    ``workspace`` goes into the per-module configs too: a per-module config replaces the global one as a
    whole, so it must name the workspace itself (otherwise it uses ``$NAVDEPLOY_WORKSPACE`` or the default).
    """
    pipe = Pipeline()
    pipe.encoder = nav.Module(pipe.encoder, name="encoder")
    pipe.encoder.optimize_config = nav.OptimizeConfig(
        target_formats=(nav.Format.ONNX, nav.Format.TORCHSCRIPT),
        runners=ENCODER_RUNNERS,
        workspace=workspace,
    )
    pipe.head = nav.Module(pipe.head, name="head")
    pipe.head.optimize_config = nav.OptimizeConfig(
        target_formats=HEAD_FORMATS,
        workspace=workspace,
    )
    return pipe


def get_dataloader() -> list[tuple[int, tuple]]:
    """``(batch_size, (images, {"scale": ...}))``: the trailing dict becomes keyword arguments."""
    gen = torch.Generator().manual_seed(1)
    return [(b, (torch.randn(b, 3, 32, 32, generator=gen), {"scale": 0.5})) for b in (1, 2, 4)]


def main(workspace: Optional[str] = None) -> dict:
    """Optimize both modules in place, then compare with eager on new inputs.

    The global config below asks for torch.compile only; neither module uses it, because both have their own
    ``optimize_config``. After this returns, ``pipe(...)`` runs the selected runners.

    In a later, fresh process, rebuild the pipeline the same way and reuse the artifacts without optimizing
    again::

        pipe = build_pipeline(workspace)         # same code and weights -> same module fingerprints
        loaded = nav.load_optimized(workspace)   # {"encoder": True, "head": True}
        pipe(images, scale=0.5)                  # served by the selected runners

    ``nav.load_optimized()`` rebinds every live ``nav.Module`` from ``<workspace>/<name>/manifest.json``.
    Without an argument the workspace is each module's ``optimize_config.workspace``, else
    ``$NAVDEPLOY_WORKSPACE``, else ``~/.cache/navdeploy``. A module whose weights or code changed, or whose
    artifacts are missing, stays eager (with a warning) and maps to False.

    Returns a dict with ``pipeline``, ``status`` (OptimizeStatus), ``selected`` (module -> runner per graph),
    ``max_abs_diff`` (optimized vs eager on new inputs), ``images`` and ``eager`` (the reference outputs).
    """
    pipe = build_pipeline(workspace)
    images = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    eager = pipe(images, scale=0.5)  # reference, before optimizing: the wrapped modules still run eagerly

    global_config = nav.OptimizeConfig(target_formats=(nav.Format.TORCH,), runners=("TorchCompileCPU",),
                                       workspace=workspace)
    status = nav.optimize(pipe, get_dataloader(), config=global_config)

    optimized = pipe(images, scale=0.5)
    diff = (optimized - eager).abs().max().item()
    for name, runners in status.selected().items():
        tried = [c.runner for g in status.modules[name].graphs for c in g.candidates]
        print(f"{name}: tried {tried}, selected {runners}, runs {status.in_use()[name]}")
    print(f"max |optimized - eager| = {diff:.2e}")
    return {"pipeline": pipe, "status": status, "selected": status.selected(), "max_abs_diff": diff,
            "images": images, "eager": eager}


@contextlib.contextmanager
def _environment(**values: str) -> Iterator[None]:
    """Set environment variables for the duration of the block, then restore them."""
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _choose_runners(workspace: Path, runners: dict[str, str]) -> None:
    """Make ``runners[module]`` the selected candidate of every graph of each module, as a user may choose by
    hand in ``<workspace>/<module>/manifest.json``; the candidate must have been verified."""
    for module, runner in runners.items():
        path = workspace / module / "manifest.json"
        manifest = json.loads(path.read_text())
        for key, entry in manifest["graphs"].items():
            status = {c["runner"]: c["status"] for c in entry["candidates"]}.get(runner)
            if status not in ("ok", "screened"):  # screened: verified, only not profiled in full
                raise RuntimeError(f"{module} graph {key}: {runner} is {status or 'not a candidate'}, not verified")
            entry["selected"] = runner
        path.write_text(json.dumps(manifest, indent=2))


def export_repository(path: str | Path = "model_repository", profile_time_s: float = 0.05) -> Path:
    """Regenerate the committed ``model_repository/``: the Python-backend export of this pipeline.

    Optimizes both modules (fixed weights and inputs) in a temporary workspace, selects
    :data:`REPOSITORY_RUNNERS` in place of the fastest candidates, and exports with ``backend="python"``. The
    workspace is named by ``$NAVDEPLOY_WORKSPACE`` while this runs, so the repository's ``serve.py`` takes its
    workspace from the environment when it is served instead of naming this temporary folder.
    ``profile_time_s`` is short: timings do not enter the repository, only the batch sizes profiled.
    """
    with tempfile.TemporaryDirectory(prefix="navdeploy-repository-ws-") as tmp, \
            _environment(NAVDEPLOY_WORKSPACE=tmp, NAVDEPLOY_REPORT="0"):
        pipe = build_pipeline()
        for module in (pipe.encoder, pipe.head):
            # keep_artifacts: the runners chosen below may have lost, and losers' builds are pruned by default
            module.optimize_config = dataclasses.replace(module.optimize_config, profile_time_s=profile_time_s,
                                                         keep_artifacts=True)
        nav.optimize(pipe, get_dataloader())
        _choose_runners(Path(tmp), REPOSITORY_RUNNERS)
        return nav.export_model_repository(path, backend="python")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-repository", metavar="PATH", type=Path,
                        help="write the Python-backend model repository of this pipeline to PATH instead")
    args = parser.parse_args()
    if args.model_repository:
        print(f"wrote {export_repository(args.model_repository)}")
    else:
        main()
