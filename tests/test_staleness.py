"""A bound runner is used only while it stands for the live module: after its weights change (in place,
load_state_dict, replaced, .to()), in training mode, or when the call needs autograd, the call runs eagerly with
one warning that says why. Real TorchScript runners (an artifact built from the old weights)."""

from __future__ import annotations

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
