"""``nav.Module``: a transparent proxy around an ``nn.Module`` that records calls while ``nav.optimize`` runs
and afterwards routes them to the selected runner (eager fallback for inputs it was not built for)."""

from __future__ import annotations

import contextlib
import copy
import warnings
import weakref
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn.modules.module as _hooks  # the global forward hooks live there
import wrapt

from navdeploy.capture import CaptureError, Graph, describe, flatten_call, spec_key, unflatten
from navdeploy.config import PRECISIONS, OptimizeConfig
from navdeploy.errors import ConfigError
from navdeploy.formats import RunFn
from navdeploy.verify import conform

# name -> live nav.Module. Weak, so a pipeline that is dropped does not keep its modules registered.
_REGISTRY: "weakref.WeakValueDictionary[str, Module]" = weakref.WeakValueDictionary()


def registered_modules() -> list["Module"]:
    """Every live ``nav.Module``, in creation order."""
    return sorted(_REGISTRY.values(), key=lambda m: m._self_order)


_counter = 0


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
        global _counter
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
        other = _REGISTRY.get(name)
        if other is not None and other.__wrapped__ is not module:
            raise ValueError(f"two nav.Modules are named {name!r}; pass a unique name=..., e.g. "
                             f"nav.Module(module, name='{name}_2').")
        _counter += 1
        self._self_order = _counter
        self._self_name = name
        self._self_input_mapping = input_mapping
        self._self_output_mapping = output_mapping
        self._self_forward_func = forward_func
        self._self_batching = batching
        self._self_precision = precision or "fp32"
        self._self_optimize_config: Optional[OptimizeConfig] = None
        self._self_handler: Optional[Callable] = None  # None: eager pass-through
        self._self_bound = False  # True once a selection (possibly eager itself) is in place
        self._self_captured = False  # True once an optimize captured its calls
        self._self_status = None
        if forward_func is not None:
            self._nav_patch()
        _REGISTRY[name] = self

    # --- what users see -------------------------------------------------------------------------
    @property
    def name(self) -> str:
        """The module's name in the workspace and in the Triton repository."""
        return self._self_name

    @property
    def optimize_config(self) -> Optional[OptimizeConfig]:
        """A per-module config; ``nav.optimize(..., config=...)`` does not override it."""
        return self._self_optimize_config

    @optimize_config.setter
    def optimize_config(self, config: Optional[OptimizeConfig]) -> None:
        if config is not None and not isinstance(config, OptimizeConfig):
            raise TypeError(f"optimize_config must be a nav.OptimizeConfig, got {type(config).__name__}.")
        self._self_optimize_config = config

    @property
    def precision(self) -> str:
        return self._self_precision

    @property
    def is_optimized(self) -> bool:
        """True when calls go to an optimized runner."""
        return isinstance(self._self_handler, OptimizedHandler)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self._self_forward_func is not None:
            return self.__wrapped__(*args, **kwargs)  # the patched method does the routing
        inner = self.__wrapped__
        if self._self_handler is None or not _has_forward_hooks(inner):
            return self._nav_call(inner, args, kwargs)
        # The runner replaces forward, not the module call: the module's hooks still run around it, and see
        # the mapped inputs, as they do eagerly.
        mapping = self._self_input_mapping
        if mapping is not None:
            args, kwargs = mapping(args, kwargs)
        return _call_with_hooks(inner, lambda a, k: self._nav_dispatch(inner.forward, a, k), args, kwargs)

    def __repr__(self) -> str:
        state = "optimized" if self.is_optimized else "eager"
        return f"nav.Module(name={self._self_name!r}, {state}, {self.__wrapped__!r})"

    # Methods that return the module itself must return the proxy, or `m = m.to("cuda")` would unwrap it.
    def _nav_same(self, result: Any) -> Any:
        return self if result is self.__wrapped__ else result

    def to(self, *args: Any, **kwargs: Any) -> Any:
        return self._nav_same(self.__wrapped__.to(*args, **kwargs))

    def cuda(self, *args: Any, **kwargs: Any) -> Any:
        return self._nav_same(self.__wrapped__.cuda(*args, **kwargs))

    def cpu(self) -> Any:
        return self._nav_same(self.__wrapped__.cpu())

    def eval(self) -> Any:
        return self._nav_same(self.__wrapped__.eval())

    def train(self, mode: bool = True) -> Any:
        return self._nav_same(self.__wrapped__.train(mode))

    def half(self) -> Any:
        return self._nav_same(self.__wrapped__.half())

    def float(self) -> Any:
        return self._nav_same(self.__wrapped__.float())

    def requires_grad_(self, requires_grad: bool = True) -> Any:
        return self._nav_same(self.__wrapped__.requires_grad_(requires_grad))

    def double(self) -> Any:
        return self._nav_same(self.__wrapped__.double())

    def bfloat16(self) -> Any:
        return self._nav_same(self.__wrapped__.bfloat16())

    def apply(self, fn: Callable) -> Any:
        return self._nav_same(self.__wrapped__.apply(fn))

    def to_empty(self, *args: Any, **kwargs: Any) -> Any:
        return self._nav_same(self.__wrapped__.to_empty(*args, **kwargs))

    def share_memory(self) -> Any:
        return self._nav_same(self.__wrapped__.share_memory())

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
        mapping = self._self_input_mapping
        if mapping is not None:
            args, kwargs = mapping(args, kwargs)
        return self._nav_dispatch(fn, args, kwargs)

    def _nav_dispatch(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        """The call (inputs already mapped) through the handler: recorder, optimized runner or none."""
        handler = self._self_handler
        if handler is None:
            return fn(*args, **kwargs)
        return handler(fn, args, kwargs)

    def _nav_patch(self) -> None:
        """Shadow ``forward_func`` on the instance so calls like ``self.forward(x)`` are routed too."""
        module, name = self.__wrapped__, self._self_forward_func
        original = getattr(type(module), name).__get__(module)
        proxy_ref = weakref.ref(self)

        def routed(*args: Any, **kwargs: Any) -> Any:
            proxy = proxy_ref()
            if proxy is None:
                return original(*args, **kwargs)
            return proxy._nav_call(original, args, kwargs)

        routed.__navdeploy_routed__ = True
        module.__dict__[name] = routed  # bypasses nn.Module.__setattr__: a plain instance attribute

    def _nav_unpatch(self) -> None:
        name = self._self_forward_func
        if name and getattr(self.__wrapped__.__dict__.get(name), "__navdeploy_routed__", False):
            del self.__wrapped__.__dict__[name]

    @contextlib.contextmanager
    def _nav_unpatched(self) -> Iterator[None]:
        """The module without the instance patch, e.g. while it is pickled for a child process."""
        self._nav_unpatch()
        try:
            yield
        finally:
            if self._self_forward_func is not None:
                self._nav_patch()


# The nn.Module methods above that return the module itself: one docstring for all of them.
for _name in ("to", "cuda", "cpu", "eval", "train", "half", "float", "requires_grad_", "double", "bfloat16", "apply",
              "to_empty", "share_memory"):
    getattr(Module, _name).__doc__ = (f"``torch.nn.Module.{_name}`` on the wrapped module; returns this nav.Module "
                                      f"(not the unwrapped module), so ``m = m.{_name}(...)`` keeps the wrapper.")
del _name


def _has_forward_hooks(module: torch.nn.Module) -> bool:
    return bool(module._forward_pre_hooks or module._forward_hooks or _hooks._global_forward_pre_hooks
                or _hooks._global_forward_hooks)


def _call_with_hooks(module: torch.nn.Module, forward: Callable[[tuple, dict], Any], args: tuple, kwargs: dict) -> Any:
    """``forward(args, kwargs)`` with the module's (and global) forward pre-hooks and hooks applied as
    ``nn.Module.__call__`` applies them, for when a runner stands in for ``forward``: hooks registered with
    ``always_call=True`` also run when the call raises (with the output None if there was none)."""
    output, called = None, set()

    def forward_hooks() -> tuple:  # read when they run, as nn.Module does: a pre-hook may add or remove some
        return (*_hooks._global_forward_hooks.items(), *module._forward_hooks.items())

    try:
        for hook_id, hook in (*_hooks._global_forward_pre_hooks.items(), *module._forward_pre_hooks.items()):
            if hook_id in module._forward_pre_hooks_with_kwargs:
                result = hook(module, args, kwargs)
                if result is not None:
                    if not (isinstance(result, tuple) and len(result) == 2):
                        raise RuntimeError(f"forward pre-hook must return None or a tuple of (new_args, new_kwargs), "
                                           f"but got {result}.")
                    args, kwargs = result
            else:
                result = hook(module, args)
                if result is not None:
                    args = result if isinstance(result, tuple) else (result,)
        output = forward(args, kwargs)
        for hook_id, hook in forward_hooks():
            called.add(hook_id)
            result = _call_forward_hook(module, hook_id, hook, args, kwargs, output)
            if result is not None:
                output = result
        return output
    except Exception:
        always = module._forward_hooks_always_called.keys() | _hooks._global_forward_hooks_always_called.keys()
        for hook_id, hook in forward_hooks():
            if hook_id in always and hook_id not in called:
                try:
                    result = _call_forward_hook(module, hook_id, hook, args, kwargs, output)
                    output = output if result is None else result
                except Exception as exc:  # noqa: BLE001 - torch silences these too: the first error is the one to see
                    warnings.warn(f"module forward hook with always_call=True raised an exception that was silenced "
                                  f"as another error was raised in forward: {exc}", stacklevel=3)
        raise


def _call_forward_hook(module: torch.nn.Module, hook_id: int, hook: Callable, args: tuple, kwargs: dict,
                       output: Any) -> Any:
    if hook_id in module._forward_hooks_with_kwargs or hook_id in _hooks._global_forward_hooks_with_kwargs:
        return hook(module, args, kwargs, output)
    return hook(module, args, output)


_CONSTANTS = (str, int, float, bool, type(None))


def _flat_signature(args: tuple, kwargs: dict) -> Optional[tuple]:
    """(dtype, rank, device) of each tensor and the value of each constant, or None when a call nests containers."""
    signature: list = []
    for value in (*args, *(kwargs[k] for k in sorted(kwargs))):
        if isinstance(value, torch.Tensor):
            signature.append((value.dtype, value.dim(), value.device.type))
        elif isinstance(value, _CONSTANTS):
            signature.append((type(value), value))
        else:
            return None
    return (len(args), tuple(sorted(kwargs)), tuple(signature))


class OptimizedHandler:
    """Routes a call to the runner of its graph; anything the runner was not built for runs eagerly."""

    def __init__(self, name: str, graphs: dict[str, tuple[Graph, RunFn]], max_batch_size: int,
                 output_mapping: Optional[Callable]):
        self.name = name
        self.graphs = graphs
        self.max_batch_size = max_batch_size
        self.output_mapping = output_mapping
        self._warned: set[str] = set()
        self._keys: dict[tuple, str] = {}

    def _fallback(self, reason: str, fn: Callable, args: tuple, kwargs: dict) -> Any:
        kind = reason.split(":")[0]
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(f"navdeploy: module {self.name!r} runs eagerly for this call: {reason}. "
                          "Re-run nav.optimize with a dataloader covering these inputs to optimize them too.",
                          RuntimeWarning, stacklevel=4)
        return fn(*args, **kwargs)

    def _graph_key(self, args: tuple, kwargs: dict) -> tuple[Optional[str], list[torch.Tensor]]:
        """The graph key and flat tensors of a call. Flat calls (tensors and constants only, the common case)
        skip hashing the full spec: their key is memoised by a cheap signature."""
        signature = _flat_signature(args, kwargs)
        if signature is not None and signature in self._keys:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            tensors += [kwargs[k] for k in sorted(kwargs) if isinstance(kwargs[k], torch.Tensor)]
            return self._keys[signature], tensors
        spec, tensors = flatten_call(args, kwargs, self.name)
        key = spec_key(spec, tensors)
        if signature is not None:
            self._keys[signature] = key
        return key, tensors

    def __call__(self, fn: Callable, args: tuple, kwargs: dict) -> Any:
        try:
            key, tensors = self._graph_key(args, kwargs)
        except CaptureError as exc:
            return self._fallback(f"uncapturable input: {exc}", fn, args, kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            return self._fallback("new input structure: not seen while optimizing", fn, args, kwargs)
        graph, run = entry
        reason = graph.accepts(tensors, self.max_batch_size)
        if reason is not None:
            return self._fallback(f"input outside the optimized range: {reason}", fn, args, kwargs)
        try:
            with torch.no_grad():
                outputs = conform(run(tensors), graph.outputs)
        except Exception as exc:  # noqa: BLE001 - never crash the user's pipeline on a runner error
            return self._fallback(f"runner error: {type(exc).__name__}: {exc}", fn, args, kwargs)
        if self.output_mapping is not None:
            structured = unflatten(graph.output_spec, outputs, rebuild_classes=False)
            try:
                return self.output_mapping(structured)
            except Exception as exc:
                # The user's function: a clear error, never a silent eager fallback that would hide the bug.
                exc.add_note(f"navdeploy: raised by the output_mapping of module {self.name!r}, called with the "
                             f"optimized runner's output {describe(structured)} (HF ModelOutputs and dataclasses "
                             "arrive as plain dicts).")
                raise
        return unflatten(graph.output_spec, outputs)
