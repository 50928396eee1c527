"""The served pipeline's inputs and outputs: ``Tensor`` specs, given or inferred from one call."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np

from navdeploy.errors import ConfigError
from navdeploy.serving.codec import decode_input, to_numpy

log = logging.getLogger("navdeploy")


@dataclass(frozen=True)
class Tensor:
    """One input or output of the served pipeline.

    Args:
        name: the tensor's name in requests and responses.
        dtype: a numpy dtype (``np.float32``, ``np.int64``...), ``bytes`` or ``str`` for strings (Triton BYTES).
        shape: the shape of ONE item, without the batch axis; ``-1`` marks an axis of any size.
        optional: an input the request may leave out (the pipeline then does not get that argument).
        max_shape: for an input, the largest size of each axis of one item (same length as ``shape``; a fixed axis
            repeats its size, ``-1`` leaves an axis bounded only by ``nav.serve``'s ``max_request_bytes``).
            ``nav.serve`` refuses a request declaring more before the server allocates anything (see
            :mod:`navdeploy.serving.bounds`). ``None``: ``-1`` axes are bounded by the range captured for the
            wrapped module the input is passed to, where that is known, else by the byte limit only.
    """

    name: str
    dtype: Any
    shape: tuple[int, ...]
    optional: bool = False
    max_shape: Optional[tuple[int, ...]] = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Tensor name={self.name!r}: use a non-empty string.")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < -1 or s == 0 for s in self.shape):
            raise ConfigError(f"Tensor {self.name!r}: shape {self.shape} may hold sizes >= 1 and -1 (any size) only.")
        if self.max_shape is not None:
            object.__setattr__(self, "max_shape", tuple(int(s) for s in self.max_shape))
            if len(self.max_shape) != len(self.shape) or any(
                    m != s if s != -1 else (m < 1 and m != -1) for s, m in zip(self.shape, self.max_shape)):
                raise ConfigError(f"Tensor {self.name!r}: max_shape {self.max_shape} must have one size per axis "
                                  f"of shape {self.shape}: the same size on a fixed axis, a bound >= 1 (or -1) on a "
                                  "-1 axis.")
        if not self.is_string:
            try:
                np.dtype(self.dtype)
            except TypeError:
                raise ConfigError(f"Tensor {self.name!r}: dtype {self.dtype!r} is not a numpy dtype; use e.g. "
                                  "np.float32, np.int64, bytes or str.") from None

    @property
    def is_string(self) -> bool:
        return self.dtype in (bytes, str, np.bytes_, np.str_, object) or (
            isinstance(self.dtype, np.dtype) and self.dtype.kind in "SUO")

    @property
    def wire_dtype(self) -> Any:
        """The dtype PyTriton declares: ``np.bytes_`` for strings, else the numpy dtype."""
        return np.bytes_ if self.is_string else np.dtype(self.dtype).type

    def to_pytriton(self) -> Any:
        from pytriton.model_config import Tensor as PTensor

        return PTensor(name=self.name, dtype=self.wire_dtype, shape=self.shape, optional=self.optional)


# --- specs from a sample -----------------------------------------------------------------------------------
def _spec_of(name: str, value: Any) -> Tensor:
    if isinstance(value, (str, bytes)):
        return Tensor(name, str if isinstance(value, str) else bytes, (1,))
    if hasattr(value, "detach") and hasattr(value, "cpu"):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype.kind in "SUO":
        kind = str if array.dtype.kind == "U" or (array.size and isinstance(array.reshape(-1)[0], str)) else bytes
        return Tensor(name, kind, array.shape or (1,))
    return Tensor(name, array.dtype, array.shape or (1,))


def _as_batch_of_one(spec: Tensor, value: Any) -> np.ndarray:
    if spec.is_string:
        return to_numpy([value] if isinstance(value, (str, bytes)) else value, spec).reshape((1, *spec.shape))
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value, dtype=np.dtype(spec.dtype)).reshape((1, *spec.shape))


def infer_specs(func: Callable, sample: Mapping[str, Any], batched: bool = True,
                outputs: Optional[Sequence[Tensor]] = None) -> tuple[list[Tensor], list[Tensor]]:
    """Input and output specs from one request item: ``sample`` maps input names to one item's value
    (a ``str``/``bytes`` prompt, an array, a tensor); the pipeline is called once to learn the outputs.

    Inferred shapes are exactly the sample's; declare ``Tensor``s with ``-1`` axes where sizes vary."""
    if not isinstance(sample, Mapping) or not sample:
        raise ConfigError("sample must be a non-empty dict: input name -> one request item's value, "
                          "e.g. {'prompt': 'a photo of an astronaut'}.")
    inputs = [_spec_of(n, v) for n, v in sample.items()]
    if outputs is not None:
        return inputs, list(outputs)
    arrays = {t.name: _as_batch_of_one(t, sample[t.name]) for t in inputs}
    if not batched:
        arrays = {n: a[0] for n, a in arrays.items()}
    kwargs = {t.name: decode_input(t, arrays[t.name], batched) for t in inputs}
    result = func(**kwargs)
    if isinstance(result, Mapping):
        named = dict(result)
    elif isinstance(result, tuple):
        named = {f"output_{i}": v for i, v in enumerate(result)}
    else:
        named = {"output_0": result}
    specs = []
    for name, value in named.items():
        spec = _spec_of(name, value)
        shape = spec.shape[1:] if batched else spec.shape
        if batched and (not spec.shape or spec.shape[0] != 1):
            raise ConfigError(f"output {name!r} of a batch of one has shape {list(spec.shape)}: a batching pipeline "
                              "returns one item per input item on axis 0 (or pass max_batch_size=0).")
        specs.append(Tensor(name, spec.dtype, shape or (1,)))
    return inputs, specs
