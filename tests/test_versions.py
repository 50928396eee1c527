"""One version counter for a module's parameters (navdeploy.inplace.versions): an in-place edit of any of them is
seen in one read; the parameters stay the same objects with the same data; tensors something else can reach are
read one by one; weights tied across two modules are seen by both; training gets the counters back."""

from __future__ import annotations

import weakref

import pytest
import torch
from torch import nn

from navdeploy.inplace import versions


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_shared_parameters_keep_identity_data_grad_and_attributes():
    net = _net()
    params = list(net.parameters())
    before = [(id(p), p.data_ptr(), p.detach().clone(), p.requires_grad) for p in params]
    net[0].weight.grad = torch.ones(8, 4)
    net[2].bias.requires_grad_(False)
    net[0].bias.tag = "kept"  # libraries set attributes on parameters (e.g. HF's _is_hf_initialized)
    shared = versions.share(net.parameters())
    assert len(shared.shared) == 4 and shared.polled == () and len(shared.anchors) == 1
    for p, (ident, ptr, data, _) in zip(net.parameters(), before):
        assert id(p) == ident and p.data_ptr() == ptr and type(p) is nn.Parameter and p.is_leaf
        assert torch.equal(p, data)
    assert [p.requires_grad for p in net.parameters()] == [True, True, True, False]
    assert torch.equal(net[0].weight.grad, torch.ones(8, 4)) and net[0].bias.tag == "kept"
    assert not shared.changed()


@pytest.mark.parametrize("edit", [
    lambda net: net[2].bias.add_(1.0),
    lambda net: net[0].weight[0].zero_(),  # through a view taken after sharing
    lambda net: net.load_state_dict(_net().state_dict()),
    lambda net: nn.init.normal_(net[0].weight),
])
def test_an_in_place_edit_of_any_parameter_is_seen(edit):
    net = _net()
    shared = versions.share(net.parameters())
    with torch.no_grad():
        edit(net)
    assert shared.changed()


def test_training_steps_work_and_are_seen():
    """Training works without unshare: forward, backward and optimizer step edit no parameter between a forward and
    its backward; batch norm edits its statistics during the forward, so buffers keep their own counters."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    shared = versions.share(net.parameters(), net.buffers())
    assert len(shared.shared) == 8 and len(shared.polled) == 6
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    for _ in range(2):
        net(torch.randn(2, 3, 8, 8)).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
    assert shared.changed()


def test_tensors_something_else_can_reach_are_read_one_by_one():
    net = _net()
    alias = net[0].weight.detach()  # shares storage and counter with the parameter
    view = net[0].bias[:2]
    net[2].weight.register_hook(lambda grad: grad)
    ref = weakref.ref(net[2].bias)
    buffer = torch.zeros(3)
    shared = versions.share(net.parameters(), (buffer,))
    assert {id(t) for t in shared.polled} == {id(net[0].weight), id(net[0].bias), id(net[2].weight),
                                              id(net[2].bias), id(buffer)}
    with torch.no_grad():
        alias.mul_(2.0)  # taken before: a shared counter would not see it
    assert shared.changed()
    shared.mark()
    with torch.no_grad():
        view.fill_(0.5)
    assert shared.changed()
    shared.mark()
    buffer.add_(1.0)
    assert shared.changed() and ref() is not None


def test_weights_tied_across_two_modules_are_seen_by_both():
    net = _net()
    other = nn.Sequential(nn.Linear(2, 2))
    other.add_module("tied", net[2])  # net's last layer in another module too: the same Parameters
    first = versions.share(net.parameters())
    second = versions.share(other.parameters())  # takes net[2]'s parameters over
    assert not first.changed() and not second.changed()  # sharing is no edit
    with torch.no_grad():
        net[2].weight.mul_(2.0)
    assert first.changed() and second.changed()
    first.mark()
    second.mark()
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    assert first.changed() and not second.changed()
    first.mark()
    with torch.no_grad():
        other[0].weight.mul_(2.0)
    assert second.changed() and not first.changed()


def test_unshare_gives_autograd_its_own_counters_back():
    net = _net()
    shared = versions.share(net.parameters())
    loss = net(torch.randn(3, 4)).sum()  # saves net[2].weight for backward
    with torch.no_grad():
        net[0].bias.add_(0.0)  # an edit of another parameter before the backward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the cost of one counter, which unshare removes
    del loss  # its graph holds the parameters: unshare leaves alone what a live graph holds
    shared.mark()
    alias = net[0].weight.detach()  # taken while shared: shares the anchor's counter
    versions.unshare(shared)
    assert shared.shared == [] and len(shared.polled) == 4 and not shared.changed()
    loss = net(torch.randn(3, 4)).sum()
    with torch.no_grad():
        net[0].bias.add_(0.0)
    loss.backward()  # each parameter has its own counter again
    assert shared.changed()
    shared.mark()
    with torch.no_grad():
        alias.mul_(2.0)
    assert shared.changed()  # the anchor is still read


def test_unshare_keeps_an_edit_made_before_it_seen():
    net = _net()
    shared = versions.share(net.parameters())
    with torch.no_grad():
        net[0].weight.add_(1.0)
    versions.unshare(shared)
    assert shared.changed()


def test_sharing_in_inference_mode_leaves_normal_parameters():
    net = _net()
    with torch.inference_mode():  # e.g. nav.optimize called under inference_mode
        shared = versions.share(net.parameters())
    assert len(shared.shared) == 4 and not any(p.is_inference() for p in net.parameters())
    net(torch.randn(3, 4)).sum().backward()
    torch.optim.SGD(net.parameters(), lr=0.1).step()
    assert shared.changed()
    with torch.inference_mode():
        versions.unshare(shared)
    assert not any(p.is_inference() for p in net.parameters())
