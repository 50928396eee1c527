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
