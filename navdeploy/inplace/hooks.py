"""Forward pre-hooks and hooks applied around a runner that stands in for ``forward``, as
``nn.Module.__call__`` applies them."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.modules.module as _hooks  # the global forward hooks live there


def call_with_hooks(module: torch.nn.Module, forward: Callable[[tuple, dict], Any], args: tuple, kwargs: dict) -> Any:
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
