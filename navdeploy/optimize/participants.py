"""Which wrapped modules a run optimizes, decided from what the capture pass recorded: the ones the callable
called with inputs navdeploy can capture. The others keep what they have, with a warning or a clear error."""

from __future__ import annotations

import warnings

from navdeploy.capture.recorder import Recorder
from navdeploy.errors import CaptureError
from navdeploy.inplace.module import Module

_USER = 4  # stacklevel of the user's nav.optimize call: here, run_optimize, navdeploy.api, the user
_HINT = ("If your code calls a method such as self.forward(x) or encode() instead of the module itself, pass "
         "forward_func='forward' (that method's name) to nav.Module.")


def _names(names: list[str]) -> str:
    return ", ".join(map(repr, names))


def modules_to_optimize(modules: list[Module], recorders: dict[str, Recorder]) -> list[Module]:
    """The modules to optimize. Warns for modules whose every call had an input or output capture cannot
    handle (they stay eager; the others are still optimized) and for modules an earlier optimize captured that
    this callable did not call (another pipeline's). Raises CaptureError, naming them, for modules never
    captured and not called: most likely called through a method (``forward_func``)."""
    uncapturable = {m.name: recorders[m.name].uncapturable for m in modules
                    if recorders[m.name].uncapturable and not recorders[m.name].graphs}
    for name, reason in uncapturable.items():
        warnings.warn(f"navdeploy: module {name!r} stays eager: none of its calls could be captured ({reason}). "
                      "The other modules are still optimized.", RuntimeWarning, stacklevel=_USER)
    modules = [m for m in modules if m.name not in uncapturable]
    # Modules optimized by an earlier call and not used by this callable keep what they have (also after a
    # load_optimized that bound them: the usual "load, else optimize" flow optimizes only the others).
    modules = [m for m in modules if recorders[m.name].graphs or not m.nav_state.bound]
    earlier = [m.name for m in modules if not recorders[m.name].graphs and m.nav_state.captured]
    if earlier:
        warnings.warn(f"navdeploy: wrapped module(s) {_names(earlier)} (captured by an earlier optimize) were not "
                      f"called by this callable; they stay as they are. {_HINT}", RuntimeWarning, stacklevel=_USER)
        modules = [m for m in modules if m.name not in earlier]
    uncalled = [m.name for m in modules if not recorders[m.name].graphs]
    if uncalled and len(uncalled) == len(modules):
        raise CaptureError(f"the callable called none of the wrapped modules ({_names(uncalled)}) while it ran "
                           f"over the dataloader. {_HINT}")
    if uncalled:
        raise CaptureError(f"wrapped module(s) {_names(uncalled)} were never called while the callable ran over the "
                           f"dataloader. {_HINT}")
    if not modules and not uncapturable:
        raise CaptureError(f"the callable called none of the wrapped modules while it ran over the dataloader. "
                           f"{_HINT}")
    return modules


def nested(modules: list[Module]) -> bool:
    """Whether one wrapped module holds another: such modules are optimized one after another (a job sends the
    outer module's weights, the inner one's included, while the inner one may be binding)."""
    inner = {id(m) for m in modules} | {id(m.__wrapped__) for m in modules}
    return any(id(sub) in inner for m in modules for sub in m.__wrapped__.modules() if sub is not m.__wrapped__)
