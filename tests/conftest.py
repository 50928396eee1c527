"""Shared test fixtures."""

from __future__ import annotations

import contextlib
import gc
from pathlib import Path
from typing import Callable, ContextManager

import pytest


@pytest.fixture(scope="session")
def isolated_env(tmp_path_factory) -> Callable[..., ContextManager[Path]]:
    """``with isolated_env("name") as workspace:`` — while open, NAVDEPLOY_WORKSPACE and TORCHINDUCTOR_CACHE_DIR
    point into fresh temporary folders (nothing lands in ~/.cache); when it closes, the nav.Modules dropped inside
    are collected (nav.optimize picks up every live nav.Module). Usable from fixtures of any scope."""

    @contextlib.contextmanager
    def env(name: str = "default_ws"):
        workspace = tmp_path_factory.mktemp(name)
        patch = pytest.MonkeyPatch()
        patch.setenv("NAVDEPLOY_WORKSPACE", str(workspace))
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path_factory.mktemp("inductor")))
        try:
            yield workspace
        finally:
            patch.undo()
            gc.collect()

    return env


@pytest.fixture(scope="session")
def choose_candidate() -> Callable[..., None]:
    """``choose_candidate(module, workspace, runner="OnnxCPU")`` makes ``runner`` the selected candidate of every
    graph of the module in its manifest on disk, as a user may choose one by hand, and binds the module to it as
    load_optimized does. For tests of the optimized path on tiny modules: which of eager and ONNX wins a
    Linear(4, 4) is timing noise (eager won on slower CI machines)."""
    from navdeploy.binding import bind
    from navdeploy.workspace import read_manifest, write_json_atomic

    def choose(module, workspace, runner: str = "OnnxCPU") -> None:
        folder = Path(workspace) / module.name
        manifest = read_manifest(folder)
        for entry in manifest["graphs"].values():
            assert {c["runner"]: c["status"] for c in entry["candidates"]}.get(runner) == "ok", entry["candidates"]
            entry["selected"] = runner
        write_json_atomic(folder / "manifest.json", manifest)
        assert bind(module, folder) and module.is_optimized

    return choose
