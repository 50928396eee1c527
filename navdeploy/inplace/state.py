"""What navdeploy knows of one wrapped module: how it was wrapped, and how its calls are routed now.

``nav.Module`` keeps one ``ModuleState``; the orchestration and binding read and change a module only through it."""

from __future__ import annotations

import contextlib
import itertools
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from navdeploy.config import OptimizeConfig

# ``handler(fn, args, kwargs)``: runs the call (inputs already mapped) its own way; ``fn`` is the eager forward.
Handler = Callable[[Callable, tuple, dict], Any]

_order = itertools.count(1)
_LOW = {torch.float16: "fp16", torch.bfloat16: "bf16"}


def weights_precision(module: torch.nn.Module) -> str:
    """fp16 or bf16 when the module's floating-point parameters (else buffers) are in that dtype, else fp32."""
    for tensor in (*module.parameters(), *module.buffers()):
        if tensor.is_floating_point():
            return _LOW.get(tensor.dtype, "fp32")
    return "fp32"


@dataclass
class ModuleState:
    """The wrapping options of one ``nav.Module`` and its routing: ``handler`` None is eager pass-through."""

    name: str
    input_mapping: Optional[Callable[[tuple, dict], tuple[tuple, dict]]]
    output_mapping: Optional[Callable[[Any], Any]]
    forward_func: Optional[str]
    batching: Optional[bool]
    precision: Optional[str]  # None: read from the weights when needed (Module.precision)
    optimize_config: Optional[OptimizeConfig] = None
    handler: Optional[Handler] = None
    bound: bool = False  # a selection (possibly eager itself) is in place
    captured: bool = False  # an optimize captured its calls
    order: int = 0  # creation order, for a stable order of modules
    conversions: int = 0  # .to()/.half()/.apply()... on the proxy: the bound runner re-checks dtypes and devices

    def __post_init__(self) -> None:
        self.order = next(_order)

    def bind(self, handler: Optional[Handler]) -> None:
        """Route calls through ``handler`` (None: eager) from now on; the module counts as bound."""
        self._release(handler)
        self.handler = handler
        self.bound = True

    def unbind(self) -> None:
        """Back to eager pass-through, with no selection in place."""
        self._release(None)
        self.handler = None
        self.bound = False

    def _release(self, successor: Optional[Handler]) -> None:
        # The handler being replaced gives back what it changed (an optimized handler: the shared version counter).
        release = getattr(self.handler, "release", None)
        if release is not None and self.handler is not successor:
            release()

    @contextlib.contextmanager
    def routed_through(self, handler: Optional[Handler]) -> Iterator[None]:
        """Calls go through ``handler`` for the block (e.g. the recorder while capturing), then as before."""
        previous = self.handler
        self.handler = handler
        try:
            yield
        finally:
            self.handler = previous
