"""A bound runner is used only while it stands for the live module: after its weights change (in place,
load_state_dict, replaced, .to()), in training mode, or when the call needs autograd, the call runs eagerly with
one warning that says why. Real TorchScript runners (an artifact built from the old weights). Also the routing
those checks sit in: the route remembered per call structure and shape, the outputs in eager's dtype."""

from __future__ import annotations

import collections
import contextlib
import copy
import gc
import warnings

import pytest
import torch

import navdeploy as nav

CONFIG = nav.OptimizeConfig(runners=("TorchScriptCPU",), use_multiprocessing=False, batch_sizes=(1, 2),
                            profile_time_s=0.05)


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 8)
        self.drop = torch.nn.Dropout(0.5)
        self.b = torch.nn.Linear(8, 3)
        self.register_buffer("shift", torch.zeros(3))

    def forward(self, x):
        return self.b(self.drop(torch.relu(self.a(x)))) + self.shift


@pytest.fixture
def bound(isolated_env, choose_candidate, request):
    """A Net bound to its TorchScript artifact; the eager twin computes what the live weights give."""
    with isolated_env("staleness") as ws:
        torch.manual_seed(0)
        module = nav.Module(Net().eval(), name=f"stale_{request.node.name}"[:60])
        x = torch.randn(2, 6)
        with torch.no_grad():
            nav.optimize(module, [(2, x)], config=CONFIG)
        choose_candidate(module, ws, "TorchScriptCPU")
        yield module, x


@contextlib.contextmanager
def _serve(isolated_env, choose_candidate, name, before_bind=lambda net: None):
    """A Net bound to a TorchScript artifact another nav.Module (of a copy) built, as in a process that loads a
    workspace: a build in this process leaves the weights' storage referenced by TorchScript (torch.jit.freeze),
    and the parameters of a module whose storage something else holds keep their own version counters."""
    with isolated_env("staleness_served") as ws:
        torch.manual_seed(0)
        net = Net().eval()
        builder = nav.Module(copy.deepcopy(net), name=name)
        x = torch.randn(2, 6)
        with torch.no_grad():
            nav.optimize(builder, [(2, x)], config=CONFIG)
        del builder
        gc.collect()
        module = nav.Module(net, name=name)
        before_bind(net)
        choose_candidate(module, ws, "TorchScriptCPU")
        yield module, x


@pytest.fixture
def served(isolated_env, choose_candidate, request):
    with _serve(isolated_env, choose_candidate, f"served_{request.node.name}"[:60]) as bound_module:
        yield bound_module


def _eager(module, x):
    with torch.no_grad():
        return module.__wrapped__.forward(x)


def _call(module, x, match):
    """Call the module; exactly one navdeploy warning mentioning ``match`` (None: none at all)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = module(x)
    messages = [str(w.message) for w in caught if "navdeploy" in str(w.message)]
    if match is None:
        assert messages == []
    else:
        assert len(messages) == 1 and match in messages[0], messages
    return out


def test_unchanged_module_uses_the_runner(bound):
    module, x = bound
    with torch.no_grad():
        out = _call(module, x, None)
    torch.testing.assert_close(out, _eager(module, x))


def test_in_place_edit_runs_eagerly_with_the_new_weights(bound):
    module, x = bound
    with torch.no_grad():
        module.b.weight.mul_(3.0)
        out = _call(module, x, "edited in place")
        torch.testing.assert_close(out, _eager(module, x))
        again = _call(module, x, None)  # warned once; still eager, still right
    torch.testing.assert_close(again, _eager(module, x))


def test_load_state_dict_runs_eagerly_with_the_new_weights(bound):
    module, x = bound
    other = Net().eval()
    module.load_state_dict(other.state_dict())
    with torch.no_grad():
        out = _call(module, x, "stale runner")
    torch.testing.assert_close(out, other(x).detach())


def test_replaced_parameter_runs_eagerly(bound):
    module, x = bound
    module.b.weight = torch.nn.Parameter(torch.randn(3, 8))
    with torch.no_grad():
        out = _call(module, x, "replaced")
    torch.testing.assert_close(out, _eager(module, x))


def test_to_another_dtype_runs_eagerly_and_to_the_same_one_changes_nothing(bound):
    module, x = bound
    module.to(torch.float32)  # same dtype and device: the runner still stands
    with torch.no_grad():
        _call(module, x, None)
    module.to(torch.float64)
    assert "another dtype or device" in module.nav_state.handler.watch.reason([x])
    with torch.no_grad():
        out = _call(module, x.double(), "runs eagerly")  # float64 inputs are also a structure it was not built for
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, _eager(module, x.double()))


def test_training_mode_runs_eagerly(bound):
    module, x = bound
    module.train()
    torch.manual_seed(1)
    with torch.no_grad():
        out = _call(module, x, "training mode")
    torch.manual_seed(1)
    torch.testing.assert_close(out, _eager(module, x))  # dropout applied, as eager does
    module.eval()
    with torch.no_grad():
        _call(module, x, None)  # back to the runner


def test_a_call_that_needs_autograd_runs_eagerly_and_gets_gradients(bound):
    module, x = bound
    out = _call(module, x, "autograd")  # grad mode on, parameters require grad
    assert out.requires_grad
    out.sum().backward()
    assert module.a.weight.grad is not None
    module.requires_grad_(False)
    inputs = x.clone().requires_grad_(True)
    out = module(inputs)  # an input that requires grad: still eager, with its gradient
    out.sum().backward()
    assert inputs.grad is not None
    with torch.no_grad():
        _call(module, x, None)  # the runner again


def test_later_optimize_picks_up_the_new_weights(bound, choose_candidate):
    module, x = bound
    with torch.no_grad():
        module.b.bias.add_(1.0)
        nav.optimize(module, [(2, x)], config=CONFIG)
        out = _call(module, x, None)
    torch.testing.assert_close(out, _eager(module, x))


def test_a_parents_conversion_is_seen(bound):
    module, x = bound
    parent = torch.nn.Sequential(module)  # .to()/.double() of a parent reach the proxy through _apply
    parent.double()
    assert "another dtype or device" in module.nav_state.handler.watch.reason([x])


def test_shared_counters_see_an_edit_of_any_parameter_and_are_given_back_with_the_runner(served):
    from navdeploy.inplace.versions import owner_of

    module, x = served
    watch = module.nav_state.handler.watch
    assert all(owner_of(p) is watch.versions for p in module.parameters())  # one counter for the parameters
    with torch.no_grad():
        _call(module, x, None)
        module.a.bias.sub_(0.25)
        out = _call(module, x, "edited in place")
    torch.testing.assert_close(out, _eager(module, x))
    module.nav_state.bind(None)  # back to eager, as the pipeline check does with a runner that does not help
    assert all(owner_of(p) is None for p in module.parameters())  # their own counters again


def test_an_edit_through_an_alias_taken_before_binding_is_seen(isolated_env, choose_candidate):
    aliases = []  # a detach() shares the weight's storage and version counter
    with _serve(isolated_env, choose_candidate, "served_alias", lambda net: aliases.append(net.b.weight.detach())) \
            as (module, x), torch.no_grad():
        _call(module, x, None)
        aliases[0].mul_(3.0)
        out = _call(module, x, "edited in place")
        torch.testing.assert_close(out, _eager(module, x))


@pytest.mark.parametrize("start", ["train()", "a call that needs autograd", "a training call of a new structure"])
def test_training_gets_each_parameter_its_own_version_counter_back(served, start):
    """Autograd checks the tensors a backward needs by their version counters: training a bound module must work
    as it does unwrapped, also when another parameter is edited in place between the forward and the backward."""
    from navdeploy.inplace.versions import owner_of

    module, x = served
    assert owner_of(module.a.weight) is not None  # shared while it serves the runner
    if start == "train()":
        module.train()
    elif start == "a call that needs autograd":
        _call(module, x, "autograd")  # eval mode, grad on, parameters require grad
    else:
        module.__wrapped__.train()  # not through the nav.Module
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            module(x=x)  # by keyword: a structure the runner was not built for, eager
    assert owner_of(module.a.weight) is None and owner_of(module.b.bias) is None
    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the training-mode warning (tested above)
        loss = module(x).sum()
    with torch.no_grad():
        module.b.bias.add_(0.5)  # after the forward saved module.a.weight
    loss.backward()
    optimizer.step()
    module.eval()
    with torch.no_grad():
        out = _call(module, x, "edited in place")
    torch.testing.assert_close(out, _eager(module, x))


def test_the_route_of_a_call_is_remembered_only_for_the_same_structure_and_shapes(isolated_env, choose_candidate):
    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 3)

        def forward(self, x, mode="plain", scale=1.0):
            return self.lin(x) * (scale if mode == "plain" else -scale)

    with isolated_env("staleness_routes") as ws:
        torch.manual_seed(0)
        module = nav.Module(Scaled().eval(), name="stale_routes")
        with torch.no_grad():
            nav.optimize(module, [(2, (torch.randn(2, 6), {"mode": "plain", "scale": 2.0}))], config=CONFIG)
        choose_candidate(module, ws, "TorchScriptCPU")
        x = torch.randn(2, 6)
        with torch.no_grad():
            for _ in range(2):  # the second call of each is served by the remembered route
                out = _call_kw(module, x, {"mode": "plain", "scale": 2.0}, None)
                torch.testing.assert_close(out, module.__wrapped__(x, mode="plain", scale=2.0))
                out = _call_kw(module, x, {"scale": 2.0, "mode": "plain"}, None)  # keyword order: same graph
                torch.testing.assert_close(out, module.__wrapped__(x, mode="plain", scale=2.0))
            for kwargs, match in (({"mode": "flip", "scale": 2.0}, "new input structure"),
                                  ({"mode": "plain", "scale": 3.0}, "new input structure"),
                                  ({"mode": "plain", "scale": True}, "new input structure")):
                out = _call_kw(module, x, kwargs, match)
                torch.testing.assert_close(out, module.__wrapped__(x, **kwargs))
                module.nav_state.handler._warned.clear()
            big = torch.randn(9, 6)  # batch 9 > max_batch_size 8
            out = _call_kw(module, big, {"mode": "plain", "scale": 2.0}, "outside the optimized range")
            torch.testing.assert_close(out, module.__wrapped__(big, mode="plain", scale=2.0))
            _call_kw(module, x, {"mode": "plain", "scale": 2.0}, None)


def _call_kw(module, x, kwargs, match):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = module(x, **kwargs)
    messages = [str(w.message) for w in caught if "navdeploy" in str(w.message)]
    assert (messages == []) if match is None else (len(messages) == 1 and match in messages[0]), messages
    return out


def test_runner_outputs_come_back_in_the_dtype_eager_returned_on_every_call(bound):
    module, x = bound
    handler = module.nav_state.handler
    (key, (graph, run)), = handler.graphs.items()
    handler.graphs[key] = (graph, lambda inputs: [t.double() for t in run(inputs)])  # a runner computing in fp64
    with torch.no_grad():
        for _ in range(3):
            out = _call(module, x, None)
            assert out.dtype == torch.float32
            torch.testing.assert_close(out, _eager(module, x))


def test_a_call_under_autocast_runs_eagerly_in_autocasts_dtype(bound):
    """Under torch.autocast eager computes the linears in bfloat16; the runner was built in float32."""
    module, x = bound
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = _call(module, x, "autocast")
        expected = _eager(module, x)
    assert out.dtype == expected.dtype
    torch.testing.assert_close(out, expected)  # the runner's float32 result differs by ~1e-2
    with torch.no_grad():
        _call(module, x, None)  # the runner again outside autocast


def test_a_negative_zero_constant_is_not_routed_as_zero(isolated_env, choose_candidate):
    """-0.0 == 0.0 and they hash alike, but a graph traced with one is not the graph of the other."""
    import math

    class Signed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(6, 3)

        def forward(self, x, offset=1.0):
            return self.lin(x) + math.copysign(1.0, offset)

    with isolated_env("staleness_zero") as ws:
        torch.manual_seed(0)
        module = nav.Module(Signed().eval(), name="stale_signed_zero")
        x = torch.randn(2, 6)
        with torch.no_grad():
            nav.optimize(module, [(2, (x, {"offset": 0.0}))], config=CONFIG)
        choose_candidate(module, ws, "TorchScriptCPU")
        with torch.no_grad():
            _call_kw(module, x, {"offset": 0.0}, None)  # remembered: the route of offset=0.0
            out = _call_kw(module, x, {"offset": -0.0}, "new input structure")
            torch.testing.assert_close(out, module.__wrapped__(x, offset=-0.0))


def test_a_submodule_in_training_mode_runs_eagerly(bound):
    module, x = bound
    module.drop.train()  # dropout on, the rest in eval mode (Monte-Carlo dropout)
    torch.manual_seed(1)
    with torch.no_grad():
        out = _call(module, x, "a submodule whose forward reads its training flag")
    torch.manual_seed(1)
    torch.testing.assert_close(out, _eager(module, x))
    module.drop.eval()
    with torch.no_grad():
        out = _call(module, x, None)  # the runner again
    torch.testing.assert_close(out, _eager(module, x))


def test_a_submodule_hook_registered_after_optimize_runs(bound):
    """An activation-steering pre-hook and a feature-capture hook on submodules: the call runs eagerly (the runner
    does not run submodules), and once they are removed the runner is used again."""
    module, x = bound
    seen = []
    steer = module.b.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
    capture = module.a.register_forward_hook(lambda mod, args, out: seen.append(out))
    with torch.no_grad():
        out = _call(module, x, "submodule hooks")
    assert len(seen) == 1
    torch.testing.assert_close(out, _eager(module, x))  # the eager twin runs the hooks too
    steer.remove()
    capture.remove()
    with torch.no_grad():
        _call(module, x, None)  # the runner again: no warning
    assert len(seen) == 2
    assert type(copy.deepcopy(module.__wrapped__).b._forward_pre_hooks) is collections.OrderedDict  # nothing of ours


def test_a_parameter_replaced_in_the_parameters_dict_runs_eagerly(bound):
    """accelerate's set_module_tensor_to_device puts tensors straight into _parameters (no registration hook)."""
    module, x = bound
    module.b._parameters["weight"] = torch.nn.Parameter(torch.randn(3, 8))
    with torch.no_grad():
        out = _call(module, x, "replaced")
    torch.testing.assert_close(out, _eager(module, x))
    assert type(copy.deepcopy(module.__wrapped__).b._parameters) is dict  # nothing of ours in a copy
