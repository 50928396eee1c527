"""nav.optimize rejects bad inputs before it captures or builds anything (fast; nothing is written)."""

from __future__ import annotations

import os

import pytest
import torch

import navdeploy as nav


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    ws = tmp_path / "workspace"
    ws.mkdir()
    monkeypatch.setenv("NAVDEPLOY_WORKSPACE", str(ws))
    monkeypatch.delenv("NAVDEPLOY_CONSOLE_OUTPUT", raising=False)
    monkeypatch.delenv("NAVIGATOR_CONSOLE_OUTPUT", raising=False)
    inductor = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    yield ws
    assert list(ws.iterdir()) == [], "nav.optimize wrote to the workspace while rejecting its inputs"
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == inductor


@pytest.fixture
def model(request):
    name = "test_optimize_inputs-" + request.node.name.replace("[", "-").rstrip("]")
    m = nav.Module(torch.nn.Linear(3, 2), name=name)
    calls = []

    def pipeline(x):
        calls.append(x)
        return m(x)

    yield m, pipeline, calls
    assert calls == [], "the pipeline ran although the inputs were invalid"
    assert not m.is_optimized


def test_empty_dataloader(workspace, model):
    _, pipeline, _ = model
    for empty in ([], (), iter([])):
        with pytest.raises(nav.DataloaderError) as info:
            nav.optimize(pipeline, empty)
        assert "(batch_size, sample)" in str(info.value)
        assert "empty" in str(info.value)


def test_dataloader_not_iterable(workspace, model):
    _, pipeline, _ = model
    with pytest.raises(nav.DataloaderError, match=r"\(batch_size, sample\)"):
        nav.optimize(pipeline, 42)


@pytest.mark.parametrize("items", [
    [torch.randn(1, 3)],  # a bare sample, not a pair
    [(1, torch.randn(1, 3), "extra")],  # a triple
    [(1,)],
    [(1, torch.randn(1, 3)), "oops"],  # second item bad
    [{"batch_size": 1, "sample": torch.randn(1, 3)}],
])
def test_item_not_a_pair(workspace, model, items):
    _, pipeline, _ = model
    with pytest.raises(nav.DataloaderError) as info:
        nav.optimize(pipeline, items)
    msg = str(info.value)
    assert "(batch_size, sample)" in msg
    assert f"item {len(items) - 1}" in msg  # names the offending item


@pytest.mark.parametrize("batch_size", [0, -1, 1.0, "1", True, None])
def test_bad_batch_size(workspace, model, batch_size):
    _, pipeline, _ = model
    with pytest.raises(nav.DataloaderError, match="batch_size an int >= 1"):
        nav.optimize(pipeline, [(batch_size, torch.randn(1, 3))])


def test_dataloader_errors_are_value_errors(workspace, model):
    _, pipeline, _ = model
    with pytest.raises(ValueError):
        nav.optimize(pipeline, [(0, torch.randn(1, 3))])
    with pytest.raises(nav.NavdeployError):
        nav.optimize(pipeline, [])


@pytest.mark.parametrize("func", [None, 3, "pipeline", [1, 2]])
def test_non_callable_first_argument(workspace, model, func):
    with pytest.raises(TypeError, match="callable"):
        nav.optimize(func, [(1, torch.randn(1, 3))])


def test_non_config_rejected(workspace, model):
    _, pipeline, _ = model
    with pytest.raises(TypeError, match="OptimizeConfig"):
        nav.optimize(pipeline, [(1, torch.randn(1, 3))], config={"max_batch_size": 2})
