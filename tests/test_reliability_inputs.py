"""Every user mistake gets a message that says what and how to fix it, and costs nothing: the workspace
(which already holds an earlier, good optimization) is left exactly as it was, byte for byte."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from torch import nn

import navdeploy as nav
from navdeploy.inplace.binding import bind


def fast(workspace, **kw) -> nav.OptimizeConfig:
    cfg = dict(workspace=workspace, target_formats=(nav.Format.TORCHSCRIPT,), batch_sizes=(1, 2), max_batch_size=2,
               profile_time_s=0.05, use_multiprocessing=False, pipeline_repeats=0)  # about inputs, not the check
    cfg.update(kw)
    return nav.OptimizeConfig(**cfg)


def snapshot(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with a hash of its bytes (folders too, so nothing new can hide)."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def prior(tmp_path_factory):
    """A workspace holding one finished optimization; every mistake below must leave it untouched."""
    ws = tmp_path_factory.mktemp("ws")
    module = nav.Module(nn.Linear(3, 2).eval(), name="rel_in_prior")
    nav.optimize(module, [(1, torch.randn(1, 3))], fast(ws))
    assert (ws / "rel_in_prior" / "manifest.json").is_file()
    return ws, module


@pytest.fixture
def ws(prior, request):
    """The shared workspace; after the test, it must be exactly as before and the prior module still loads."""
    workspace, module = prior
    before = snapshot(workspace)
    yield workspace
    assert snapshot(workspace) == before, f"{request.node.name} changed the workspace"
    assert bind(module, workspace / "rel_in_prior") is True  # and what it held still loads


@pytest.fixture
def uname(request):
    return "rel_in-" + request.node.name.replace("[", "-").replace("]", "")


class Returns(nn.Module):
    """Returns whatever ``make(y)`` builds from a tensor."""

    def __init__(self, make):
        super().__init__()
        self.linear = nn.Linear(3, 3)
        self.make = make

    def forward(self, x):
        return self.make(self.linear(x))


class Opaque:
    def __init__(self, value):
        self.value = value


def _stays_eager(module, run) -> str:
    """Run ``run()`` (a nav.optimize); the module must stay eager with one warning naming it. Returns the warning."""
    with pytest.warns(RuntimeWarning, match="stays eager") as caught:
        status = run()
    messages = [str(w.message) for w in caught if "stays eager" in str(w.message)]
    assert len(messages) == 1 and module.name not in status.modules and not module.is_optimized
    return messages[0]


class TakesOpaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(3, 3)

    def forward(self, x, extra=None):
        return self.linear(x.value if isinstance(x, Opaque) else x)


def test_argument_the_capture_cannot_handle_names_its_path_and_input_mapping(ws, uname):
    module = nav.Module(TakesOpaque().eval(), name=uname)
    msg = _stays_eager(module, lambda: nav.optimize(module, [(1, Opaque(torch.randn(1, 3)))], fast(ws)))
    assert uname in msg and "Opaque" in msg and "['args'][0]" in msg and "input_mapping" in msg


def test_an_uncapturable_module_stays_eager_and_the_others_are_optimized(tmp_path, uname):
    """An argument capture cannot handle (any object that is no tensor, constant, container or HF cache): that module
    stays eager; nav.optimize does not abort."""
    odd = nav.Module(TakesOpaque().eval(), name=f"{uname}-odd")
    fine = nav.Module(nn.Linear(3, 3).eval(), name=f"{uname}-fine")

    def pipeline(x):
        return fine(odd(x, extra=Opaque(1)))

    msg = _stays_eager(odd, lambda: nav.optimize(pipeline, [(1, torch.randn(1, 3))], fast(tmp_path)))
    assert "Opaque" in msg and "other modules are still optimized" in msg
    assert fine.is_optimized or fine.nav_state.bound  # optimized (eager may have won the Linear, then bound as eager)


def test_input_mapping_is_the_fix_that_message_suggests(ws, uname, tmp_path):
    module = nav.Module(nn.Linear(3, 3).eval(), name=uname, input_mapping=lambda a, k: ((a[0].value,), k))
    status = nav.optimize(module, [(1, Opaque(torch.randn(1, 3)))], fast(tmp_path))
    assert status.modules[uname].graphs[0].selected


@pytest.mark.parametrize("make, needle", [
    (lambda y: Opaque(y), "returned a value of type"),  # an object that is not a structure of tensors
    (lambda y: {"out": y, "extra": Opaque(1)}, "['extra']"),  # nested inside a structure: the path is named
    (lambda y: "a string", "returned no tensors"),
    (lambda y: None, "returned no tensors"),
    (lambda y: (1, "a", None), "returned no tensors"),
], ids=["object", "nested-object", "string", "none", "constants"])
def test_outputs_that_are_not_tensors_or_structures(ws, uname, make, needle):
    module = nav.Module(Returns(make).eval(), name=uname)
    msg = _stays_eager(module, lambda: nav.optimize(module, [(1, torch.randn(1, 3))], fast(ws)))
    assert uname in msg and needle in msg
    assert "wrap" in msg.lower()  # the fix: wrap (only) the part that computes tensors


def test_output_mapping_that_raises_is_reported_before_anything_is_built(ws, uname):
    def mapping(out):
        return out.last_hidden_state  # wrong: it receives a plain dict, not the ModelOutput

    from transformers.modeling_outputs import BaseModelOutputWithPooling

    module = nav.Module(Returns(lambda y: BaseModelOutputWithPooling(last_hidden_state=y, pooler_output=y.sum(-1))),
                        name=uname, output_mapping=mapping)
    with pytest.raises(nav.CaptureError) as info:
        nav.optimize(module, [(1, torch.randn(1, 3))], fast(ws))
    msg = str(info.value)
    assert f"output_mapping of module {uname!r} raised AttributeError" in msg
    assert "dict(last_hidden_state=Tensor, pooler_output=Tensor)" in msg  # what it was given
    assert "plain dicts" in msg and "BaseModelOutputWithPooling(**o)" in msg  # how to fix it
    assert isinstance(info.value.__cause__, AttributeError)
    assert not module.is_optimized


def test_output_mapping_that_raises_at_run_time_is_a_clear_error_not_a_silent_fallback(uname, tmp_path,
                                                                                        choose_candidate):
    broken = {"now": False}

    def mapping(out):
        if broken["now"]:
            raise KeyError("pooled")
        return out

    module = nav.Module(nn.Linear(3, 3).eval(), name=uname, output_mapping=mapping)
    nav.optimize(module, [(1, torch.randn(1, 3))], fast(tmp_path, batch_sizes=(1,), max_batch_size=1))
    choose_candidate(module, tmp_path, "TorchScriptCPU")
    with torch.no_grad():  # with grad on, parameters that require grad send the call to eager
        torch.testing.assert_close(module(torch.ones(1, 3)), module.__wrapped__(torch.ones(1, 3)))
        broken["now"] = True
        with pytest.raises(KeyError) as info:  # the user's own exception type, so their handling still works
            module(torch.ones(1, 3))
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert f"output_mapping of module {uname!r}" in notes and "Tensor" in notes


@pytest.mark.parametrize("under", [False, True], ids=["the file itself", "a folder under it"])
def test_workspace_that_is_a_file(uname, tmp_path, under):
    blocker = tmp_path / "file"
    blocker.write_text("a file, not a folder")
    workspace = blocker / "ws" if under else blocker
    module = nav.Module(nn.Linear(3, 3).eval(), name=uname)
    with pytest.raises(nav.WorkspaceError) as info:
        nav.optimize(module, [(1, torch.randn(1, 3))], fast(workspace))
    msg = str(info.value)
    assert str(workspace) in msg and "is a file, not a folder" in msg
    assert ("a folder above it" in msg) == under
    assert "OptimizeConfig(workspace=...)" in msg and "NAVDEPLOY_WORKSPACE" in msg
    assert blocker.read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]
    assert not module.is_optimized
    x = torch.randn(2, 3)
    torch.testing.assert_close(module(x), module.__wrapped__(x))  # still usable, eagerly


def test_workspace_that_cannot_be_created(uname, tmp_path):
    workspace = tmp_path / ("w" * 300)  # longer than a file name may be: mkdir fails, also for root
    module = nav.Module(nn.Linear(3, 3).eval(), name=uname)
    with pytest.raises(nav.WorkspaceError) as info:
        nav.optimize(module, [(1, torch.randn(1, 3))], fast(workspace))
    msg = str(info.value)
    assert str(workspace) in msg and "not writable" in msg and "name too long" in msg
    assert "OptimizeConfig(workspace=...)" in msg and "NAVDEPLOY_WORKSPACE" in msg
    assert list(tmp_path.iterdir()) == []
    assert not module.is_optimized


def test_read_only_workspace_folder(uname, tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("running as root: a 0o500 folder is still writable; test_workspace_that_cannot_be_created "
                    "covers the OSError path")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    module = nav.Module(nn.Linear(3, 3).eval(), name=uname)
    with pytest.raises(nav.WorkspaceError, match="not writable"):
        nav.optimize(module, [(1, torch.randn(1, 3))], fast(ro))
    assert list(ro.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_target_without_cuda(ws, uname):
    nav.Module(nn.Linear(3, 3), name=uname)
    with pytest.raises(nav.ConfigError) as info:
        fast(ws, target_device="cuda")
    assert "no CUDA device" in str(info.value) and "target_device='cpu'" in str(info.value)


@pytest.mark.parametrize("kwargs, field", [
    (dict(target_formats=("tensorrtt",)), "target_formats"),
    (dict(runners=("OnnxGPU",)), "runners"),
    (dict(tolerances={"atol": -1.0}), "atol"),
    (dict(batch_sizes=(0, 1)), "batch_sizes"),
    (dict(max_batch_size=0), "max_batch_size"),
])
def test_invalid_config_values(ws, kwargs, field):
    with pytest.raises(nav.ConfigError, match=field):
        fast(ws, **kwargs)


def test_forward_func_that_does_not_exist(ws, uname):
    with pytest.raises(AttributeError) as info:
        nav.Module(nn.Linear(3, 3), name=uname, forward_func="encode")
    assert "'encode'" in str(info.value) and "Linear" in str(info.value) and "'forward'" in str(info.value)


def test_not_an_nn_module(ws, uname):
    with pytest.raises(TypeError, match=r"torch.nn.Module.*nav.Module\(pipe.unet"):
        nav.Module(lambda x: x, name=uname)


def test_two_modules_with_the_same_name(ws, uname):
    first = nav.Module(nn.Linear(3, 3), name=uname)  # noqa: F841 - keeps the name taken
    with pytest.raises(ValueError, match=f"two nav.Modules are named '{uname}'.*name='{uname}_2'"):
        nav.Module(nn.Linear(3, 3), name=uname)


def test_module_never_called(ws, uname):
    used = nav.Module(nn.Linear(3, 3).eval(), name=uname + "-used")
    unused = nav.Module(nn.Linear(3, 3).eval(), name=uname + "-unused")  # noqa: F841 - registered, never called
    with pytest.raises(nav.CaptureError, match=f"'{uname}-unused'.*forward_func='forward'"):
        nav.optimize(used, [(1, torch.randn(1, 3))], fast(ws))


@pytest.mark.parametrize("data", [[], [torch.randn(1, 3)], [(0, torch.randn(1, 3))]])
def test_bad_dataloader(ws, uname, data):
    module = nav.Module(nn.Linear(3, 3), name=uname)
    with pytest.raises(nav.DataloaderError, match=r"\(batch_size, sample\)"):
        nav.optimize(module, data, fast(ws))
