"""Every live ``nav.Module`` of the process, by name. Weak: a pipeline that is dropped does not keep its
modules registered."""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:  # annotations only: the module imports this registry
    from navdeploy.inplace.module import Module

_modules: weakref.WeakValueDictionary[str, Module] = weakref.WeakValueDictionary()


def register(module: Module) -> None:
    """Add (or replace) the module under its name."""
    _modules[module.name] = module


def lookup(name: str) -> Optional[Module]:
    """The live module of that name, if any."""
    return _modules.get(name)


def registered_modules() -> list[Module]:
    """Every live ``nav.Module``, in creation order."""
    return sorted(_modules.values(), key=lambda m: m.nav_state.order)


def clear() -> None:
    """Forget every module (tests: one failed sample must not leave names taken for the next)."""
    _modules.clear()
