"""When a bound runner no longer stands for the live module: its weights changed since it was built, it is in
training mode (or a submodule whose forward reads its training flag is: Monte-Carlo dropout), the call needs
autograd, or it runs under ``torch.autocast``. Such calls run eagerly (the handler says why, once).

The checks run on every call of an optimized module, so each is a read or two: an in-place edit (``copy_`` from
``load_state_dict``, ``mul_`` under ``no_grad``, an optimizer step) bumps a version counter, and the parameters
share one (``versions.share``), so whether any was edited is one read whatever their number (buffers, and
parameters that cannot share, are read one by one); a replaced parameter or buffer goes through ``nn.Module``'s
registration hooks, which bump a process-wide generation when the module belongs to a bound one, and never inside
code torch.compile traces (and so does a tensor put straight into a module's
``_parameters`` or ``_buffers``: those dicts are swapped at the bind for ones that bump it); ``.to()``/``.half()``...
on the proxy bump the module's own conversion count (they change tensors through ``set_data``, which keeps the
version counter). A forward hook
registered on a submodule after the bind bumps the generation too: the runner does not run submodules, so their
hooks would silently not run (their forward-hook dicts, empty at the bind, are replaced by ones that bump it)."""

from __future__ import annotations

import functools
import itertools
import operator
import weakref
from collections import OrderedDict
from typing import TYPE_CHECKING, Any, Optional

import torch
import torch.nn.modules.module as nn_module

from navdeploy.inplace import versions

if TYPE_CHECKING:
    from navdeploy.inplace.state import ModuleState

_requires_grad = operator.attrgetter("requires_grad")
_generation = itertools.count(1)
_current = [0]  # bumped by the registration hooks; read on every call
_hooked = [False]
_TRAINING = ("training mode: the module is in training mode (dropout, batch-norm statistics); call .eval() to use "
             "the optimized runner")
_SUB_TRAINING = ("training mode: a submodule whose forward reads its training flag (dropout, batch norm) is in "
                 "training mode, e.g. dropout on for Monte-Carlo sampling; call .eval() on it to use the optimized "
                 "runner")
_training_flag = operator.itemgetter("training")
_AUTOGRAD = ("autograd: grad mode is on and its inputs or parameters require grad; the runner returns no gradients. "
             "Call it under torch.no_grad() or torch.inference_mode() to use the optimized runner")
_AUTOCAST = ("autocast: torch.autocast is on, under which eager computes in its lower precision and returns its dtype; "
             "the runner computes in the precision it was built for. Call it outside torch.autocast to use the "
             "optimized runner")
_autocast_on = torch._C._is_any_autocast_enabled  # one C call: is autocast on for any device type


_watched: weakref.WeakSet = weakref.WeakSet()  # every (sub)module of a bound module: whose registrations count
_compiling = torch.compiler.is_compiling


def _bump(*_: Any) -> None:
    # Not inside a forward torch.compile traces: Dynamo would put the counter's state in the compiled code's
    # guards, so every later bump anywhere would recompile it (and its compile-cache keys would differ from a
    # worker's, which has no hooks).
    if not _compiling():
        _current[0] = next(_generation)


def _registered(module: torch.nn.Module, *_: Any) -> None:
    """A parameter, buffer or submodule was registered on ``module``: it counts when ``module`` belongs to a bound
    module. Forwards that build containers on the fly (``self.resnets[1:]`` in diffusers' mid blocks makes a new
    ModuleList on every call) register into modules no runner stands for."""
    if not _compiling() and module in _watched:  # the membership test is not traced either
        _bump()


def _install_hooks() -> None:
    """Process-wide registration hooks, installed on the first bind (never at import)."""
    if _hooked[0]:
        return
    nn_module.register_module_parameter_registration_hook(_registered)
    nn_module.register_module_buffer_registration_hook(_registered)
    nn_module.register_module_module_registration_hook(_registered)
    _hooked[0] = True


class _Bumping:
    """Setting or deleting an entry bumps the generation the per-call check reads, so a change to the dict is seen at
    no cost per call. It pickles and copies as the plain dict it replaces (nothing of navdeploy's in a saved or
    copied module)."""

    __slots__ = ()
    _plain: type = dict

    def __setitem__(self, key: Any, value: Any) -> None:
        super().__setitem__(key, value)  # type: ignore[misc]
        _bump()

    def __delitem__(self, key: Any) -> None:
        super().__delitem__(key)  # type: ignore[misc]
        _bump()

    def __reduce__(self) -> tuple:
        return self._plain, (list(self.items()),)  # type: ignore[attr-defined]


class _WatchedHooks(_Bumping, OrderedDict):
    """A submodule's forward (pre-)hook dict: a hook added after the bind is seen."""

    __slots__ = ()
    _plain = OrderedDict


_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")


class _WatchedTensors(_Bumping, dict):
    """A module's ``_parameters`` or ``_buffers`` dict: a tensor put straight into it (``m._parameters["weight"] =
    p``, as accelerate's ``set_module_tensor_to_device`` does) goes through no registration hook."""

    __slots__ = ()


def watch_module_dicts(module: torch.nn.Module) -> list[tuple[str, OrderedDict]]:
    """Swap every (sub)module's ``_parameters`` and ``_buffers`` for a ``_WatchedTensors`` with the same entries, and
    the submodules' empty forward-hook dicts for ``_WatchedHooks``; once per module (a watched dict stays). Returns
    the submodules' watched hook dicts by name. Called
    before a bind loads its runners: a torch.compile runner's guards read those dicts, and a swap after its
    warm-up would make the first requests compile again. The registration hooks go in first for the same reason
    (compiled code guards on whether there are any), here and in a candidate's worker alike."""
    _install_hooks()
    for sub in module.modules():
        for attr in ("_parameters", "_buffers"):
            tensors = sub.__dict__.get(attr)
            if type(tensors) is dict:
                sub.__dict__[attr] = _WatchedTensors(tensors)
    return _watch_submodule_hooks(module)


def _watch_submodule_hooks(module: torch.nn.Module) -> list[tuple[str, OrderedDict]]:
    """The forward-hook dicts of ``module``'s submodules, each replaced by a ``_WatchedHooks`` where it is empty (a
    non-empty one stays: a hook's removal handle holds that very dict). Hooks of ``module`` itself run around the
    runner and need no watching."""
    watched = []
    for name, sub in module.named_modules():
        if sub is module:
            continue
        for attr in _HOOK_DICTS:
            hooks = sub.__dict__.get(attr)
            if type(hooks) is OrderedDict and not hooks:
                hooks = sub.__dict__[attr] = _WatchedHooks()
            if isinstance(hooks, _WatchedHooks):
                watched.append((name, hooks))
    return watched


def _hooks_reason(watched: list[tuple[str, OrderedDict]]) -> Optional[str]:
    names = sorted({name for name, hooks in watched if hooks})
    if not names:
        return None
    return (f"submodule hooks: forward hooks were registered on {', '.join(repr(n) for n in names[:3])}"
            f"{' and others' if len(names) > 3 else ''} after it was optimized; the runner does not run submodules, "
            "so their hooks would not run. Remove them to use the optimized runner")


@functools.lru_cache(maxsize=None)
def _reads_training(cls: type) -> bool:
    """Whether ``cls.forward`` reads ``self.training`` (dropout, batch norm, HF attention's dropout): a submodule of
    such a class put in training mode on its own changes what the module computes."""
    code = getattr(getattr(cls, "forward", None), "__code__", None)
    return code is not None and "training" in code.co_names


def _training_dicts(module: torch.nn.Module) -> tuple[dict, ...]:
    """The ``__dict__`` of each submodule whose forward reads its training flag and that has no such submodule
    below it (``.train()`` on any module reaches every one below it, so these are enough: an HF layer's flag goes
    with its dropouts'). The per-call check reads the flags from them directly (a C-level ``itemgetter`` over a
    tuple, ~1.3 µs for BERT-base's 37 dropouts)."""
    reads: dict[int, torch.nn.Module] = {id(sub): sub for sub in module.modules()
                                         if sub is not module and "training" in sub.__dict__
                                         and _reads_training(type(sub))}
    lowest = [sub for sub in reads.values()
              if not any(id(below) in reads for below in sub.modules() if below is not sub)]
    return tuple(sub.__dict__ for sub in lowest)


def _tensors(module: torch.nn.Module) -> tuple[torch.Tensor, ...]:
    return (*module.parameters(), *module.buffers())


def _kinds(tensors: tuple[torch.Tensor, ...]) -> tuple:
    return tuple((t.dtype, t.device) for t in tensors)


class WeightsWatch:
    """A snapshot of a module's parameters and buffers when its runner was bound, and the cheap test of
    whether a call may still use that runner."""

    def __init__(self, module: torch.nn.Module, state: ModuleState):
        _watched.update(module.modules())
        self.module = module
        self._state = state  # its conversion count: .to()/.half()... on the proxy
        self._seen_conversions = state.conversions
        self._tensors = _tensors(module)
        self._ids = tuple(map(id, self._tensors))
        self._kinds = _kinds(self._tensors)
        self._generation = _current[0]
        self.versions = versions.share(module.parameters(), module.buffers())
        self.changed: Optional[str] = None  # set once: a runner built from other weights never comes back
        self._training_seen = False
        # The bind swapped them already, before loading its runners: here they are only collected then.
        self._hook_dicts = watch_module_dicts(module)
        self._training_dicts = _training_dicts(module)
        self.hooks: Optional[str] = None  # while submodules have forward hooks added after the bind

    def _weights_changed(self) -> Optional[str]:
        if self._state.conversions != self._seen_conversions:
            self._seen_conversions = self._state.conversions
            current = _tensors(self.module)
            if _kinds(current) != self._kinds:  # a .to() onto the same dtype and device changes nothing
                return "its tensors were moved to another dtype or device (.to(), .half()...) since it was optimized"
            if tuple(map(id, current)) != self._ids:  # nn.Module._apply puts new buffers in without a hook
                return "its parameters or buffers were replaced since it was optimized"
        if self.versions.changed():
            return "its parameters or buffers were edited in place (e.g. load_state_dict) since it was optimized"
        if _current[0] != self._generation:  # some module registered a tensor or a hook: is it one of ours?
            self._generation = _current[0]
            self.hooks = _hooks_reason(self._hook_dicts)
            if tuple(map(id, _tensors(self.module))) != self._ids:
                return "its parameters or buffers were replaced since it was optimized"
        return None

    def release(self) -> None:
        """The runner is no longer bound: the parameters get their own version counters back."""
        versions.unshare(self.versions)

    def for_training(self) -> None:
        """The module is being trained: its parameters get their own version counters back (autograd checks each
        saved tensor by its counter; a shared one would fail a backward for an edit of another parameter)."""
        if not self._training_seen:
            self._training_seen = True
            if self.changed is None:
                self.changed = self._weights_changed()  # decided on the counters before they change hands
            versions.unshare(self.versions)

    def reason(self, inputs: list[torch.Tensor]) -> Optional[str]:
        """Why this call must run eagerly, or None when the runner stands for the module."""
        if self.changed is None and (self.versions.changed() or self._state.conversions != self._seen_conversions
                                     or _current[0] != self._generation):
            self.changed = self._weights_changed()
        if self.changed is not None:
            return f"stale runner: {self.changed}; re-run nav.optimize to optimize the new weights"
        if self.hooks is not None:
            return self.hooks
        if self.module.training:
            self.for_training()
            return _TRAINING
        if self._training_dicts and any(map(_training_flag, self._training_dicts)):
            self.for_training()
            return _SUB_TRAINING
        if torch.is_grad_enabled() and (any(map(_requires_grad, inputs)) or any(map(_requires_grad, self._tensors))):
            self.for_training()
            return _AUTOGRAD
        if _autocast_on():  # eager would compute in autocast's dtype; a runner is built in one precision
            return _AUTOCAST
        return None
