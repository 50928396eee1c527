"""One version counter for many parameters, so that "was any of them edited in place?" is one read per call.

Every in-place op (``mul_``, ``copy_`` from ``load_state_dict``, an optimizer step) bumps the edited tensor's version
counter, which its views and ``detach()`` aliases share. Reading a counter from Python costs about as much as a
small Python call, so reading 100 of them on every call of an optimized module costs more than all its routing.
``share`` gives each eligible parameter a new tensor implementation over the same storage (same object, data,
``requires_grad``, grad and attributes; ``torch.utils.swap_tensors``) whose version counter is the one of a small
*anchor* tensor: an in-place edit of any of them bumps the anchor.

A parameter is shared only when nothing else can reach its data or its counter: no view, ``detach()`` alias or
``.data`` alias holds its storage, no autograd graph, TorchScript module or weak reference holds it, no tensor
hook is registered on it, and it is a plain dense ``nn.Parameter``. Other tensors keep their own counters and are
read one by one (``Versions.polled``).

The cost of sharing: autograd checks that a tensor saved for backward was not edited in place before the backward
runs, by its version counter; with one counter, an in-place edit of one parameter between a forward and its
backward also fails the backward of a graph that saved another. ``unshare`` gives the parameters their own
counters back, and the handler calls it when the module is used for training (training mode, or a call that needs
autograd), before that call runs.
"""

from __future__ import annotations

import operator
import weakref
from typing import Iterable, Optional

import torch

_version = operator.attrgetter("_version")
# id(parameter) -> (its tensor implementation's address, a weak reference to the Versions whose anchor it shares):
# a parameter taken over by another module's Versions (weights tied across two nav.Modules) is still seen by the
# first, which then also reads the new anchor.
_owners: dict[int, tuple[int, weakref.ref]] = {}
_storage_use_count = getattr(torch._C, "_storage_Use_Count", None)


class Versions:
    """The version counters one watch reads on every call: ``anchors`` (shared by many parameters) and ``polled``
    (tensors with their own counters). ``changed()`` says whether any of them moved since ``mark()``."""

    __slots__ = ("anchors", "polled", "shared", "_seen", "_single", "__weakref__")

    def __init__(self) -> None:
        self.anchors: tuple[torch.Tensor, ...] = ()
        self.polled: tuple[torch.Tensor, ...] = ()
        self.shared: list[torch.Tensor] = []  # the parameters that share an anchor of this Versions
        self._seen = 0
        self._single: Optional[torch.Tensor] = None  # the one counter to read, in the common case

    def total(self) -> int:
        """The sum of the counters: they only grow, so any edit makes it grow (while the set stays the same)."""
        return sum(map(_version, self.anchors)) + sum(map(_version, self.polled))

    def mark(self) -> None:
        """The current versions are the ones the runner stands for."""
        self._seen = self.total()
        self._single = self.anchors[0] if len(self.anchors) == 1 and not self.polled else None

    def changed(self) -> bool:
        """Whether any tensor was edited in place since ``mark()``: one read per anchor and per polled tensor."""
        single = self._single
        return (single._version if single is not None else self.total()) != self._seen

    def _adopt(self, anchor: torch.Tensor) -> None:
        # Another Versions took over some of our parameters: read their new anchor too, from its version now on.
        self.anchors += (anchor,)
        self._seen += anchor._version
        self._single = None


def _shareable(t: torch.Tensor) -> bool:
    """Whether nothing but ``t`` itself can reach its storage or version counter (see the module docstring)."""
    if type(t) is not torch.nn.Parameter or t.layout != torch.strided or t.is_quantized or not t.is_leaf:
        return False
    if t._backward_hooks is not None or getattr(t, "_post_accumulate_grad_hooks", None) is not None:
        return False
    if _storage_use_count is None or t._use_count() != 1 or weakref.getweakrefs(t):
        return False
    storage = t.untyped_storage()
    return _storage_use_count(storage._cdata) == 2  # t's implementation and the Python storage object above


def _rebase(param: torch.Tensor, shell: torch.Tensor) -> None:
    """Swap into ``param`` a new implementation over its own storage whose version counter is ``shell``'s."""
    with torch.no_grad():
        shell.set_(param)  # in place: keeps shell's version counter (and bumps it)
    new = torch.nn.Parameter(shell, requires_grad=param.requires_grad)  # detach(): still shell's counter
    new.__dict__.update(param.__dict__)
    if param.grad is not None:
        new.grad = param.grad
    torch.utils.swap_tensors(param, new)


@torch.inference_mode(False)  # an anchor made in inference mode would be an inference tensor, without a counter
def share(params: Iterable[torch.Tensor], others: Iterable[torch.Tensor] = ()) -> Versions:
    """Share one version counter per device among the eligible ``params``; every other tensor (``others``, e.g. the
    buffers, which batch norm edits in place during training forwards) is polled on its own counter."""
    versions = Versions()
    anchors: dict[tuple, torch.Tensor] = {}
    polled = []
    takeovers: list[tuple[Versions, torch.Tensor]] = []
    for param in params:
        if not _shareable(param):
            polled.append(param)
            continue
        previous = owner_of(param)
        # One anchor per device, and apart for the parameters another Versions shared (weights tied across two
        # modules): that one reads their new anchor, and an edit of only ours does not concern it.
        where = (param.device, id(previous) if previous is not None else None)
        anchor = anchors.get(where)
        if anchor is None:
            anchor = anchors[where] = torch.empty(0, dtype=torch.uint8, device=param.device)
        try:
            shell = anchor.view(param.dtype).detach()  # shares the anchor's counter
        except RuntimeError:
            polled.append(param)
            continue
        _rebase(param, shell)
        _owners[id(param)] = (param._cdata, weakref.ref(versions))
        if previous is not None:
            takeovers.append((previous, anchor))
        versions.shared.append(param)
    for previous, anchor in takeovers:  # after the last rebase (each bumps its anchor)
        if all(a is not anchor for a in previous.anchors):
            previous._adopt(anchor)
    versions.anchors = tuple(anchors.values())
    versions.polled = (*polled, *others)
    versions.mark()
    _prune()
    return versions


@torch.inference_mode(False)
def unshare(versions: Versions) -> None:
    """Give the shared parameters their own version counters back (autograd then checks each on its own); the
    anchors are still read, so an edit through an alias taken while they were shared is still seen."""
    edited = versions.changed()
    kept, mine = [], []
    for param in versions.shared:
        owner = _owners.get(id(param))
        if owner is None or owner[1]() is not versions or owner[0] != param._cdata:
            continue  # taken over by another Versions (which reads it now), or replaced
        if param._use_count() != 1 or weakref.getweakrefs(param):
            kept.append(param)  # held elsewhere now (a live graph): keep sharing rather than break that graph
            continue
        _rebase(param, torch.empty(0, dtype=param.dtype, device=param.device))
        del _owners[id(param)]
        mine.append(param)
    versions.shared = kept
    versions.polled = (*versions.polled, *mine)
    versions.mark()  # the set of counters changed: a new baseline, unless an edit was pending
    if edited:
        versions._seen = -1  # no total is negative: the pending edit stays seen as one


def _prune() -> None:
    for key in [k for k, (_, ref) in _owners.items() if ref() is None]:
        del _owners[key]


def owner_of(param: torch.Tensor) -> Optional[Versions]:
    """The Versions whose anchor ``param`` shares now, if any (for tests and diagnostics)."""
    owner = _owners.get(id(param))
    return owner[1]() if owner is not None and owner[0] == param._cdata else None
