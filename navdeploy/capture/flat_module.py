"""The wrapped module seen as a function of a flat tuple of tensors: what every exporter traces."""

from __future__ import annotations

from typing import Any, Optional

import torch

from navdeploy.capture.pytree import Spec, flatten, tensors_at, unflatten


class FlatModule(torch.nn.Module):
    """Calls ``module`` (or its ``forward_func`` method) with the structure of one graph.

    ``forward(*tensors)`` rebuilds the captured ``(args, kwargs)`` (constants included), runs the
    module and returns its output tensors as a tuple, in :func:`navdeploy.capture.pytree.flatten` order.
    An HF cache argument is built afresh from its tensors on every call (exporters trace the object's
    construction and its update) and the cache returned is flattened into outputs; input tensors eager changes in
    place (a StaticCache's) are copied first, so the traced function never writes into its inputs. With
    ``output_spec`` (what eager returned) the outputs are the tensors where eager had tensors, whatever a tracer
    makes of the constants (:func:`navdeploy.capture.pytree.tensors_at`).
    """

    def __init__(self, module: torch.nn.Module, input_spec: Spec, forward_func: Optional[str] = None,
                 output_spec: Optional[Spec] = None):
        super().__init__()
        self.inner = module
        self.input_spec = input_spec
        self.forward_func = forward_func
        self.output_spec = output_spec

    def call_inner(self, *args: Any, **kwargs: Any) -> Any:
        if self.forward_func:
            # The class attribute, not the instance one: nav.Module patches the instance to record calls.
            return getattr(type(self.inner), self.forward_func)(self.inner, *args, **kwargs)
        # forward, not the module call: the module's forward hooks run around the runner (nav.Module.__call__),
        # so they are neither baked into the artifact nor run twice.
        return self.inner.forward(*args, **kwargs)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        call = unflatten(self.input_spec, list(tensors), rebuild_classes=True)
        output = self.call_inner(*call["args"], **call["kwargs"])
        if self.output_spec is not None:
            return tuple(tensors_at(self.output_spec, output))
        return tuple(flatten(output, path="outputs")[1])
