"""``nav.Module``: a transparent proxy around an ``nn.Module`` that records calls while ``nav.optimize`` runs
and afterwards routes them to the selected runner (eager fallback for inputs it was not built for)."""

from __future__ import annotations

import contextlib
import copy
import functools
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.modules.module as _hooks  # the global forward hooks live there
import wrapt

from navdeploy.config import PRECISIONS, OptimizeConfig
from navdeploy.errors import ConfigError
from navdeploy.inplace import registry
from navdeploy.inplace.handler import OptimizedHandler
from navdeploy.inplace.hooks import call_with_hooks
from navdeploy.inplace.state import ModuleState, weights_precision


class Module(wrapt.ObjectProxy):
    """Wrap an ``nn.Module`` so ``nav.optimize`` can capture, optimize and swap it in place.

    The proxy behaves as the module: attribute access, ``state_dict``, ``.to()``, hooks and
    ``isinstance(m, nn.Module)`` keep working.

    Args:
        module: the ``torch.nn.Module`` to optimize.
        name: a name unique in the process; the workspace folder and Triton model name. Default: the class
            name in lower case.
        input_mapping: ``f(args: tuple, kwargs: dict) -> (args, kwargs)`` applied to every call before the
            module runs, e.g. to turn values navdeploy cannot capture into tensors.
        output_mapping: ``f(output) -> output`` applied to what optimized runners return. They return the
            eager output structure with HF ``ModelOutput``s and dataclasses as plain dicts, so
            ``lambda o: BaseModelOutputWithPooling(**o)`` restores the class.
        forward_func: the method the surrounding code calls when it does not call the module itself, e.g.
            ``"forward"`` when ``encode()`` calls ``self.forward(x)``.
        batching: whether axis 0 of every input and output is a batch axis; None infers it from the calls.
        precision: the precision the module's weights are in: ``"fp32"`` (default), ``"fp16"``, ``"bf16"``,
            ``"int8"`` (a pre-quantized module; kept as is).
    """

    def __init__(self, module: torch.nn.Module, name: Optional[str] = None,
                 input_mapping: Optional[Callable[[tuple, dict], tuple[tuple, dict]]] = None,
                 output_mapping: Optional[Callable[[Any], Any]] = None, forward_func: Optional[str] = None,
                 batching: Optional[bool] = None, precision: Optional[str] = None):
        if isinstance(module, Module):
            module._nav_unpatch()
            module = module.__wrapped__
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"nav.Module wraps torch.nn.Module instances; got {type(module).__name__}. "
                            "Wrap the nn.Module inside your pipeline, e.g. nav.Module(pipe.unet, name='unet').")
        if precision is not None and precision not in PRECISIONS:
            raise ConfigError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}.")
        if input_mapping is not None and not callable(input_mapping):
            raise TypeError("input_mapping must be callable: f(args, kwargs) -> (args, kwargs).")
        if output_mapping is not None and not callable(output_mapping):
            raise TypeError("output_mapping must be callable: f(output) -> output.")
        if forward_func is not None:
            method = getattr(type(module), forward_func, None)
            if not callable(method):
                raise AttributeError(f"forward_func={forward_func!r}: {type(module).__name__} has no method "
                                     f"{forward_func!r}; pass the name of the method your code calls (e.g. 'forward').")
        super().__init__(module)
        name = name or type(module).__name__.lower()
        if not isinstance(name, str) or not name or any(c in name for c in "/\\:") or name in (".", ".."):
            raise ValueError(f"name={name!r}: use a non-empty name without '/', '\\' or ':'.")
        other = registry.lookup(name)
        if other is not None and other.__wrapped__ is not module:
            raise ValueError(f"two nav.Modules are named {name!r}; pass a unique name=..., e.g. "
                             f"nav.Module(module, name='{name}_2').")
        self._self_state = ModuleState(name, input_mapping, output_mapping, forward_func, batching, precision)
        if forward_func is not None:
            self._nav_patch()
        registry.register(self)

    # --- what users see -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The module's name in the workspace and in the Triton repository."""
        return self._self_state.name

    @property
    def nav_state(self) -> ModuleState:
        """navdeploy's state of this module (wrapping options, routing): read by optimize and binding."""
        return self._self_state

    @property
    def optimize_config(self) -> Optional[OptimizeConfig]:
        """A per-module config; ``nav.optimize(..., config=...)`` does not override it."""
        return self._self_state.optimize_config

    @optimize_config.setter
    def optimize_config(self, config: Optional[OptimizeConfig]) -> None:
        if config is not None and not isinstance(config, OptimizeConfig):
            raise TypeError(f"optimize_config must be a nav.OptimizeConfig, got {type(config).__name__}.")
        self._self_state.optimize_config = config

    @property
    def precision(self) -> str:
        """The precision of the module's weights: the one given to ``nav.Module``, else read from its floating-point
        parameters when asked (fp16/bf16 weights are fp16/bf16; anything else fp32), so a module cast with
        ``.half()`` before or after wrapping is not cast again and is checked with its own precision's tolerance."""
        return self._self_state.precision or weights_precision(self.__wrapped__)

    @property
    def precision_inferred(self) -> bool:
        """True when ``precision`` was read from the weights rather than given."""
        return self._self_state.precision is None

    @property
    def is_optimized(self) -> bool:
        """True when calls go to an optimized runner."""
        return isinstance(self._self_state.handler, OptimizedHandler)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Every call of an optimized module pays for this path: attribute reads and one call into the handler.
        state = self._self_state
        if state.forward_func is not None:
            return self.__wrapped__(*args, **kwargs)  # the patched method does the routing
        inner = self.__wrapped__
        if state.input_mapping is not None:
            args, kwargs = state.input_mapping(args, kwargs)
        handler = state.handler
        if handler is None:
            return inner(*args, **kwargs)
        if not (inner._forward_pre_hooks or inner._forward_hooks or _hooks._global_forward_pre_hooks
                or _hooks._global_forward_hooks):  # no forward hooks, the module's or global ones (read inline)
            return handler(inner, args, kwargs)
        # The runner replaces forward, not the module call: the module's hooks still run around it, and see
        # the mapped inputs, as they do eagerly.
        return call_with_hooks(inner, lambda a, k: self._nav_dispatch(inner.forward, a, k), args, kwargs)

    def __repr__(self) -> str:
        state = "optimized" if self.is_optimized else "eager"
        return f"nav.Module(name={self._self_state.name!r}, {state}, {self.__wrapped__!r})"

    # Methods that return the module itself must return the proxy, or `m = m.to("cuda")` would unwrap it.
    def _nav_converted(self, result: Any) -> Any:
        """After a conversion of the module's tensors: the bound runner checks whether it still stands for them."""
        self._self_state.conversions += 1
        return self._nav_same(result)

    def _nav_same(self, result: Any) -> Any:
        return self if result is self.__wrapped__ else result

    def to(self, *args: Any, **kwargs: Any) -> Any:
        return self._nav_converted(self.__wrapped__.to(*args, **kwargs))

    def cuda(self, *args: Any, **kwargs: Any) -> Any:
        return self._nav_converted(self.__wrapped__.cuda(*args, **kwargs))

    def cpu(self) -> Any:
        return self._nav_converted(self.__wrapped__.cpu())

    def eval(self) -> Any:
        return self._nav_same(self.__wrapped__.eval())

    def train(self, mode: bool = True) -> Any:
        watch = getattr(self._self_state.handler, "watch", None)
        if mode and watch is not None:
            watch.for_training()  # before any training forward runs (see WeightsWatch.for_training)
        return self._nav_same(self.__wrapped__.train(mode))

    def half(self) -> Any:
        return self._nav_converted(self.__wrapped__.half())

    def float(self) -> Any:
        return self._nav_converted(self.__wrapped__.float())

    def requires_grad_(self, requires_grad: bool = True) -> Any:
        return self._nav_same(self.__wrapped__.requires_grad_(requires_grad))

    def double(self) -> Any:
        return self._nav_converted(self.__wrapped__.double())

    def bfloat16(self) -> Any:
        return self._nav_converted(self.__wrapped__.bfloat16())

    def apply(self, fn: Callable) -> Any:
        return self._nav_converted(self.__wrapped__.apply(fn))

    def to_empty(self, *args: Any, **kwargs: Any) -> Any:
        return self._nav_converted(self.__wrapped__.to_empty(*args, **kwargs))

    def share_memory(self) -> Any:
        return self._nav_same(self.__wrapped__.share_memory())

    def _apply(self, *args: Any, **kwargs: Any) -> Any:
        # A parent's .to()/.half() reaches its children through _apply, not through the methods above.
        return self._nav_converted(self.__wrapped__._apply(*args, **kwargs))

    # Pickling or copying a pipeline stores the plain module (without the forward_func patch):
    # a proxy is a process-local view.
    def __reduce_ex__(self, protocol: int) -> Any:
        with self._nav_unpatched():
            return self.__wrapped__.__reduce_ex__(protocol)

    def __copy__(self) -> Any:
        with self._nav_unpatched():
            return copy.copy(self.__wrapped__)

    def __deepcopy__(self, memo: dict) -> Any:
        with self._nav_unpatched():
            return copy.deepcopy(self.__wrapped__, memo)

    # --- routing --------------------------------------------------------------------------------
    def _nav_call(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """A call of ``fn`` (the patched ``forward_func``): mapped inputs, then the handler (as ``__call__``)."""
        state = self._self_state
        if state.input_mapping is not None:
            args, kwargs = state.input_mapping(args, kwargs)
        handler = state.handler
        return fn(*args, **kwargs) if handler is None else handler(fn, args, kwargs)

    def _nav_dispatch(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """The call (inputs already mapped) through the handler: recorder, optimized runner or none."""
        handler = self._self_state.handler
        if handler is None:
            return fn(*args, **kwargs)
        return handler(fn, args, kwargs)

    def _nav_patch(self) -> None:
        """Shadow ``forward_func`` on the instance so calls like ``self.forward(x)`` are routed too."""
        module, name = self.__wrapped__, self._self_state.forward_func
        # A plain instance attribute (bypasses nn.Module.__setattr__).
        module.__dict__[name] = _Routed(self, name, getattr(type(module), name).__get__(module))

    def _nav_unpatch(self) -> None:
        name = self._self_state.forward_func
        if name and isinstance(self.__wrapped__.__dict__.get(name), _Routed):
            del self.__wrapped__.__dict__[name]

    @contextlib.contextmanager
    def _nav_unpatched(self) -> Iterator[None]:
        """The module without the instance patch, e.g. while it is pickled for a child process."""
        self._nav_unpatch()
        try:
            yield
        finally:
            if self._self_state.forward_func is not None:
                self._nav_patch()


class _Routed:
    """The ``forward_func`` method of a wrapped module, routed through its nav.Module (``Module._nav_call``).

    A callable object rather than a closure so that a deep copy of the *module* (``copy.deepcopy(model)`` of the
    plain model the user still holds, e.g. for an EMA or reference copy) gets its own method, bound to the copy:
    deepcopy keeps functions as they are, and the copy would compute with the original's weights and runner."""

    def __init__(self, proxy: Module, name: str, original: Callable):
        # Callers that inspect the method (HF generate reads forward's signature to decide which inputs, e.g.
        # position_ids, to pass) see the original's signature, name and doc, not (*args, **kwargs).
        functools.update_wrapper(self, original)
        self._proxy = weakref.ref(proxy)
        self._name = name

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        proxy = self._proxy()
        if proxy is None:
            return self.__wrapped__(*args, **kwargs)
        return proxy._nav_call(self.__wrapped__, args, kwargs)

    def __deepcopy__(self, memo: dict) -> Any:
        original = self.__wrapped__
        copied = memo.get(id(original.__self__))  # the module's copy, made before its __dict__ is copied
        if copied is None:  # the method copied on its own: a plain method of a copy of the module
            copied = copy.deepcopy(original.__self__, memo)
        return getattr(type(copied), self._name).__get__(copied)


# The nn.Module methods above that return the module itself: one docstring for all of them.
for _name in ("to", "cuda", "cpu", "eval", "train", "half", "float", "requires_grad_", "double", "bfloat16", "apply",
              "to_empty", "share_memory"):
    getattr(Module, _name).__doc__ = (f"``torch.nn.Module.{_name}`` on the wrapped module; returns this nav.Module "
                                      f"(not the unwrapped module), so ``m = m.{_name}(...)`` keeps the wrapper.")


del _name
