"""Fast unit tests of the nav.Module proxy (eager mode; no nav.optimize)."""

from __future__ import annotations

import copy
import inspect
import pickle
import warnings

import pytest
import torch

import navdeploy as nav
from navdeploy.inplace.registry import registered_modules


class Encoder(torch.nn.Module):
    """Code that calls self.forward() from another method, as many pipelines do."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(4, 3)

    def forward(self, x):
        return self.proj(x)

    def encode(self, x):
        return self.forward(x) * 2


class Parent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.child = torch.nn.Linear(4, 2)
        self.head = torch.nn.Linear(2, 1)
        self.register_buffer("scale", torch.ones(1))

    def forward(self, x):
        return self.head(self.child(x)) * self.scale


@pytest.fixture
def uname(request):
    """A process-unique module name for this test."""
    return "test_module-" + request.node.name.replace("[", "-").replace("]", "")


def recording_handler(log):
    def handler(fn, args, kwargs):
        log.append((args, kwargs))
        return fn(*args, **kwargs)
    return handler


def test_proxy_is_module_and_forwards_attributes(uname):
    inner = torch.nn.Linear(4, 2)
    m = nav.Module(inner, name=uname)
    assert isinstance(m, torch.nn.Module) and isinstance(m, torch.nn.Linear)
    assert isinstance(m, nav.Module)
    assert m.__wrapped__ is inner
    assert m.name == uname
    assert m.weight is inner.weight and m.in_features == 4
    m.custom_attr = 5  # set through the proxy lands on the module
    assert inner.custom_attr == 5
    x = torch.randn(3, 4)
    assert torch.equal(m(x), inner(x))
    assert not m.is_optimized
    assert uname in repr(m) and "eager" in repr(m)
    assert m in registered_modules()


def test_state_dict_keys_identical(uname):
    inner = Parent()
    m = nav.Module(inner, name=uname)
    assert list(m.state_dict()) == list(inner.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, inner.state_dict()[k])
    assert [n for n, _ in m.named_parameters()] == [n for n, _ in inner.named_parameters()]


def test_state_dict_keys_as_child(uname):
    parent = Parent()
    before = list(parent.state_dict())
    parent.child = nav.Module(parent.child, name=uname)
    assert isinstance(parent.child, nav.Module)
    assert list(parent.state_dict()) == before
    assert "child.weight" in before
    # loading a state dict goes through the proxy to the real parameters
    sd = {k: torch.zeros_like(v) for k, v in parent.state_dict().items()}
    parent.load_state_dict(sd)
    assert torch.count_nonzero(parent.child.__wrapped__.weight) == 0
    assert torch.equal(parent(torch.randn(2, 4)), torch.zeros(2, 1))


@pytest.mark.parametrize("method, args", [("to", ("cpu",)), ("to", (torch.float32,)), ("eval", ()),
                                          ("train", ()), ("float", ()), ("cpu", ()), ("half", ()),
                                          ("requires_grad_", (False,))])
def test_self_returning_methods_return_proxy(uname, method, args):
    m = nav.Module(torch.nn.Linear(2, 2), name=uname)
    result = getattr(m, method)(*args)
    assert result is m


def test_eval_and_to_change_the_module(uname):
    inner = torch.nn.Linear(2, 2)
    m = nav.Module(inner, name=uname)
    assert m.eval() is m and inner.training is False
    assert m.to(torch.float64) is m and inner.weight.dtype == torch.float64
    assert m.float() is m and inner.weight.dtype == torch.float32


@pytest.mark.parametrize("method, args", [("double", ()), ("bfloat16", ()), ("apply", (lambda mod: None,))])
def test_other_self_returning_methods_return_proxy(uname, method, args):
    m = nav.Module(torch.nn.Linear(2, 2), name=uname)
    assert getattr(m, method)(*args) is m


def test_forward_hooks_fire_in_eager_mode(uname):
    m = nav.Module(torch.nn.Linear(4, 2), name=uname)
    seen = []
    pre = m.register_forward_pre_hook(lambda mod, inp: seen.append(("pre", inp[0].shape)))
    post = m.register_forward_hook(lambda mod, inp, out: seen.append(("post", out.shape)))
    m(torch.randn(3, 4))
    assert seen == [("pre", torch.Size([3, 4])), ("post", torch.Size([3, 2]))]
    pre.remove()
    post.remove()
    m(torch.randn(3, 4))
    assert len(seen) == 2


def test_forward_hook_can_replace_output(uname):
    m = nav.Module(torch.nn.Linear(4, 2), name=uname)
    m.register_forward_hook(lambda mod, inp, out: torch.zeros_like(out))
    assert torch.equal(m(torch.randn(1, 4)), torch.zeros(1, 2))


def test_optimize_config_property(uname):
    m = nav.Module(torch.nn.Linear(2, 2), name=uname)
    assert m.optimize_config is None
    cfg = nav.OptimizeConfig(max_batch_size=2)
    m.optimize_config = cfg
    assert m.optimize_config is cfg
    assert not hasattr(m.__wrapped__, "optimize_config")  # kept on the proxy, not the module
    with pytest.raises(TypeError, match="OptimizeConfig"):
        m.optimize_config = {"max_batch_size": 2}
    assert m.optimize_config is cfg
    m.optimize_config = None
    assert m.optimize_config is None


@pytest.mark.parametrize("bad", [lambda x: x, object(), None, "linear"])
def test_non_module_raises_type_error(uname, bad):
    with pytest.raises(TypeError, match="torch.nn.Module"):
        nav.Module(bad, name=uname)


def test_invalid_arguments(uname):
    with pytest.raises(nav.ConfigError, match="precision"):
        nav.Module(torch.nn.Linear(1, 1), name=uname, precision="fp64")
    with pytest.raises(TypeError, match="input_mapping"):
        nav.Module(torch.nn.Linear(1, 1), name=uname, input_mapping=3)
    with pytest.raises(TypeError, match="output_mapping"):
        nav.Module(torch.nn.Linear(1, 1), name=uname, output_mapping=3)
    for bad in ("a/b", "c:d", "back\\slash", ".."):
        with pytest.raises(ValueError, match="name"):
            nav.Module(torch.nn.Linear(1, 1), name=bad)


def test_duplicate_names_raise(uname):
    first = nav.Module(torch.nn.Linear(2, 2), name=uname)
    with pytest.raises(ValueError) as info:
        nav.Module(torch.nn.Linear(2, 2), name=uname)
    assert repr(uname) in str(info.value)
    assert first.name == uname  # the first keeps its registration
    assert [m for m in registered_modules() if m.name == uname] == [first]


def test_name_free_again_after_proxy_dropped(uname):
    import gc

    first = nav.Module(torch.nn.Linear(2, 2), name=uname)
    del first
    gc.collect()
    assert nav.Module(torch.nn.Linear(2, 2), name=uname).name == uname


def test_rewrapping_a_proxy(uname):
    inner = Encoder()
    m1 = nav.Module(inner, name=uname, forward_func="forward")
    m2 = nav.Module(m1, name=uname)
    assert m2.__wrapped__ is inner  # no proxy of a proxy
    assert "forward" not in inner.__dict__  # the old patch is gone
    assert [m for m in registered_modules() if m.name == uname] == [m2]
    x = torch.randn(1, 4)
    assert torch.equal(m2(x), inner(x))
    # the same module wrapped again under its name is not a duplicate
    m3 = nav.Module(inner, name=uname)
    assert m3.__wrapped__ is inner


def test_missing_forward_func_is_a_clear_error(uname):
    with pytest.raises(AttributeError) as info:
        nav.Module(Encoder(), name=uname, forward_func="predict")
    assert "forward_func='predict'" in str(info.value) and "Encoder" in str(info.value)
    assert uname not in [m.name for m in registered_modules()]


def test_handler_sees_direct_calls(uname):
    inner = torch.nn.Linear(4, 2)
    m = nav.Module(inner, name=uname)
    log = []
    m.nav_state.handler = recording_handler(log)
    x = torch.randn(1, 4)
    assert torch.equal(m(x), inner(x))
    assert len(log) == 1 and log[0][0][0] is x
    inner(x)  # calling the unwrapped module is not routed
    assert len(log) == 1


def test_input_mapping_applied_before_handler(uname):
    log = []
    m = nav.Module(torch.nn.Linear(2, 2), name=uname,
                   input_mapping=lambda args, kwargs: ((torch.as_tensor(args[0], dtype=torch.float32),), {}))
    m.nav_state.handler = recording_handler(log)
    out = m([[1.0, 2.0]])
    assert out.shape == (1, 2)
    assert isinstance(log[0][0][0], torch.Tensor)


def test_forward_func_routes_self_forward_calls(uname):
    inner = Encoder()
    m = nav.Module(inner, name=uname, forward_func="forward")
    log = []
    m.nav_state.handler = recording_handler(log)
    x = torch.randn(2, 4)
    expected = inner.proj(x)
    assert torch.allclose(m.encode(x), expected * 2)  # encode() calls self.forward(x)
    assert len(log) == 1 and log[0][0][0] is x
    assert torch.allclose(inner.encode(x), expected * 2)  # also via the unwrapped module
    assert len(log) == 2
    assert torch.allclose(m(x), expected)  # calling the proxy routes once, not twice
    assert len(log) == 3


def test_forward_func_hooks_still_fire(uname):
    inner = Encoder()
    m = nav.Module(inner, name=uname, forward_func="forward")
    seen = []
    m.register_forward_hook(lambda mod, inp, out: seen.append(out.shape))
    log = []
    m.nav_state.handler = recording_handler(log)
    m(torch.randn(2, 4))
    assert seen == [torch.Size([2, 3])] and len(log) == 1


def test_without_forward_func_self_forward_is_not_routed(uname):
    inner = Encoder()
    m = nav.Module(inner, name=uname)
    log = []
    m.nav_state.handler = recording_handler(log)
    m.encode(torch.randn(1, 4))
    assert log == []


def test_unpatched_context(uname):
    inner = Encoder()
    m = nav.Module(inner, name=uname, forward_func="forward")
    assert "forward" in inner.__dict__
    with m._nav_unpatched():
        assert "forward" not in inner.__dict__
        pickle.dumps(inner)
    assert "forward" in inner.__dict__


def test_pickle_and_deepcopy_of_parent_give_plain_module(uname):
    parent = Parent()
    parent.child = nav.Module(parent.child, name=uname)
    x = torch.randn(2, 4)
    expected = parent(x)
    for clone in (pickle.loads(pickle.dumps(parent)), copy.deepcopy(parent)):
        assert type(clone.child) is torch.nn.Linear
        assert not isinstance(clone.child, nav.Module)
        assert list(clone.state_dict()) == list(parent.state_dict())
        assert torch.allclose(clone(x), expected)
        assert clone.child.weight is not parent.child.weight
    # copying the proxy itself gives the plain module too
    assert type(copy.copy(parent.child)) is torch.nn.Linear
    assert type(copy.deepcopy(parent.child)) is torch.nn.Linear
    assert [m for m in registered_modules() if m.name == uname] == [parent.child]


def test_deepcopy_with_forward_func_gives_independent_module(uname):
    inner = Encoder()
    m = nav.Module(inner, name=uname, forward_func="forward")
    clone = copy.deepcopy(m)
    with torch.no_grad():
        clone.proj.weight.zero_()
        clone.proj.bias.zero_()
    assert torch.equal(clone(torch.randn(1, 4)), torch.zeros(1, 3))
    pickle.dumps(m)



def test_deepcopy_of_the_plain_module_computes_with_the_copy(uname):
    """With forward_func the user often keeps calling the plain module (model.generate), and copies it (an EMA or
    reference copy): the copy's forward must be its own, not the original's routed one (deepcopy keeps functions
    as they are, so a routing closure in the instance dict computed with the original's weights and runner)."""
    inner = Encoder()
    m = nav.Module(inner, name=uname, forward_func="forward")
    log = []
    m.nav_state.handler = recording_handler(log)
    clone = copy.deepcopy(inner)
    with torch.no_grad():
        clone.proj.weight.zero_()
        clone.proj.bias.zero_()
    x = torch.randn(1, 4)
    assert torch.equal(clone.encode(x), torch.zeros(1, 3))
    assert torch.equal(clone(x), torch.zeros(1, 3))
    assert log == []  # not routed through the original's nav.Module
    assert inspect.signature(clone.forward) == inspect.signature(inner.forward)
    assert torch.allclose(inner.encode(x), inner.proj(x) * 2) and len(log) == 1  # the original is still routed

@torch.no_grad()  # the optimized path: with grad on, parameters that require grad send a call to eager
def test_forward_hooks_run_around_the_optimized_runner(tmp_path, uname, choose_candidate):
    """Hooks are part of calling a module: registered before or after optimize, they run in optimized mode too,
    once per call, and a hook that rewrites inputs or outputs does so around the runner."""
    torch.manual_seed(0)
    inner = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    m = nav.Module(inner, name=uname)
    m.register_forward_pre_hook(lambda mod, args: (args[0] * 2,))  # before optimize: part of the captured calls
    nav.optimize(m, [(2, torch.randn(2, 4))], nav.OptimizeConfig(workspace=tmp_path, runners=("OnnxCPU",),
                                                                  target_formats=(nav.Format.ONNX,),
                                                                  batch_sizes=(1, 2), profile_time_s=0.02))
    choose_candidate(m, tmp_path)
    assert m.is_optimized
    seen = []
    m.register_forward_hook(lambda mod, args, out: seen.append(out.shape))
    add_one = m.register_forward_hook(lambda mod, args, kwargs, out: out + 1, with_kwargs=True)
    x = torch.randn(2, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the optimized path, not the eager fallback
        out = m(x)
    torch.testing.assert_close(out, inner.forward(x * 2) + 1, atol=1e-5, rtol=1e-4)
    assert seen == [torch.Size([2, 4])]
    assert m(x).sub(1).sub(inner.forward(x * 2)).abs().max() < 1e-5  # the pre-hook runs once, not twice
    add_one.remove()
    torch.testing.assert_close(m(x), inner.forward(x * 2), atol=1e-5, rtol=1e-4)
    # A forward hook that a pre-hook registers runs in the same call, as nn.Module reads its hooks after forward.
    late = []

    def add_late_hook(mod, args):
        if not late:
            mod.register_forward_hook(lambda mod, args, out: late.append("late"))

    adder = m.register_forward_pre_hook(add_late_hook)
    m(x)
    assert late == ["late"]
    adder.remove()
    # A hook registered with always_call=True runs when the call raises, as nn.Module runs it.
    failed = []
    m.register_forward_hook(lambda mod, args, out: failed.append(out), always_call=True)
    with pytest.raises(RuntimeError):
        m(torch.randn(2, 5))  # wrong feature size: the call raises
    assert failed == [None]


def test_hooks_see_mapped_inputs_eagerly_and_when_optimized(tmp_path, uname, choose_candidate):
    inner = torch.nn.Linear(4, 4).eval()
    m = nav.Module(inner, name=uname, input_mapping=lambda args, kwargs: ((torch.stack(args[0]),), kwargs))
    seen = []
    m.register_forward_pre_hook(lambda mod, args: seen.append(type(args[0]).__name__))
    rows = [torch.randn(4), torch.randn(4)]
    m(rows)
    nav.optimize(m, [(2, (rows,))], nav.OptimizeConfig(workspace=tmp_path, runners=("OnnxCPU",),
                                                        target_formats=(nav.Format.ONNX,), batch_sizes=(1, 2),
                                                        profile_time_s=0.02))
    choose_candidate(m, tmp_path)
    assert m.is_optimized
    seen.clear()
    torch.testing.assert_close(m(rows), inner(torch.stack(rows)), atol=1e-5, rtol=1e-4)
    assert seen == ["Tensor", "Tensor"]  # the call above, and the reference inner(...) on the right
