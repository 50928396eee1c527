"""Between the wire and the pipeline: requests decoded into the pipeline's arguments, its results encoded
into named output arrays, with errors that say which input or output was wrong."""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional, Sequence

import numpy as np

from navdeploy.errors import NavdeployError

if TYPE_CHECKING:  # annotations only: the runtime import goes the other way
    from navdeploy.serving.bounds import RequestBounds
    from navdeploy.serving.specs import Tensor


log = logging.getLogger("navdeploy")


# --- converting between the wire and the pipeline ----------------------------------------------------------
def decode_input(spec: Tensor, array: np.ndarray, batched: bool) -> Any:
    if not spec.is_string:
        return array
    want_str = spec.dtype in (str, np.str_) or (isinstance(spec.dtype, np.dtype) and spec.dtype.kind == "U")

    def conv(x: Any) -> Any:
        b = x if isinstance(x, (bytes, np.bytes_)) else str(x).encode()
        return bytes(b).decode("utf-8") if want_str else bytes(b)

    if spec.shape == (1,):
        if batched:
            return [conv(x) for x in array.reshape(array.shape[0], -1)[:, 0]]
        return conv(array.reshape(-1)[0])
    return np.vectorize(conv, otypes=[object])(array) if array.size else array.astype(object)


def to_numpy(value: Any, spec: Tensor) -> np.ndarray:
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch here
        value = value.detach().cpu().numpy()
    if spec.is_string:
        arr = np.asarray(value, dtype=object)
        flat = [x if isinstance(x, bytes) else (x.encode("utf-8") if isinstance(x, str) else str(x).encode())
                for x in arr.reshape(-1)]
        return np.array(flat, dtype=np.bytes_).reshape(arr.shape)
    return np.asarray(value, dtype=np.dtype(spec.dtype))


def _named_outputs(result: Any, outputs: Sequence[Tensor]) -> dict[str, Any]:
    names = [t.name for t in outputs]
    if isinstance(result, Mapping):
        missing = [n for n in names if n not in result]
        if missing:
            raise NavdeployError(f"the pipeline returned {sorted(result)} but outputs {missing} are declared.")
        return {n: result[n] for n in names}
    if isinstance(result, tuple) or (isinstance(result, list) and len(outputs) > 1):
        if len(result) != len(outputs):
            raise NavdeployError(f"the pipeline returned {len(result)} values; {len(outputs)} outputs are declared "
                                 f"({', '.join(names)}).")
        return dict(zip(names, result))
    if len(outputs) != 1:
        raise NavdeployError(f"the pipeline returned one value; {len(outputs)} outputs are declared. Return a dict "
                             "keyed by output name.")
    return {names[0]: result}


def _shape_matches(shape: Sequence[int], spec_shape: Sequence[int]) -> bool:
    return len(shape) == len(spec_shape) and all(s == -1 or s == a for a, s in zip(shape, spec_shape))


class PipelineCall:
    """The function PyTriton calls: decode inputs, call the pipeline, encode and check outputs.

    Errors raised here become the error response of that request only; the server keeps serving."""

    def __init__(self, func: Callable, inputs: Sequence[Tensor], outputs: Sequence[Tensor], batched: bool,
                 max_batch_size: int, bounds: Optional[RequestBounds] = None):
        self.func, self.inputs, self.outputs = func, list(inputs), list(outputs)
        self.batched, self.max_batch_size = batched, max_batch_size
        self.bounds = bounds  # checked here too: gRPC requests reach the pipeline without the HTTP guard
        self.lock = threading.Lock()  # one pipeline call at a time: pipelines keep state (schedulers, caches)

    def _check(self, name: str, array: np.ndarray, spec: Tensor, what: str) -> None:
        from pytriton.exceptions import PyTritonValidationError

        shape = array.shape[1:] if self.batched else array.shape
        if not _shape_matches(shape, spec.shape):
            raise PyTritonValidationError(f"{what} {name!r}: shape {list(shape)} per item does not match the declared "
                                          f"shape {list(spec.shape)} (-1: any size).")
        if spec.is_string != (array.dtype.kind in "SUO"):
            raise PyTritonValidationError(f"{what} {name!r}: dtype {array.dtype} does not match the declared "
                                          f"{'BYTES' if spec.is_string else np.dtype(spec.dtype).name}.")

    def __call__(self, **arrays: np.ndarray) -> dict[str, np.ndarray]:
        from pytriton.exceptions import PyTritonValidationError

        known = {t.name: t for t in self.inputs}
        unknown = sorted(set(arrays) - set(known))
        if unknown:
            raise PyTritonValidationError(f"unknown input(s) {unknown}; the model takes {sorted(known)}.")
        missing = [t.name for t in self.inputs if not t.optional and t.name not in arrays]
        if missing:
            raise PyTritonValidationError(f"missing input(s) {missing}; the model takes {sorted(known)}.")
        batch = None
        for name, array in arrays.items():
            self._check(name, array, known[name], "input")
            problem = self.bounds.shape_problem(name, array.shape) if self.bounds is not None else None
            if problem:
                raise PyTritonValidationError(problem)
            if self.batched:
                if batch is not None and array.shape[0] != batch:
                    raise PyTritonValidationError(f"inputs disagree on the batch size: {name!r} has {array.shape[0]}, "
                                                  f"others {batch}.")
                batch = array.shape[0]
        kwargs = {n: decode_input(known[n], a, self.batched) for n, a in arrays.items()}
        with self.lock:
            result = self.func(**kwargs)
        named = _named_outputs(result, self.outputs)
        out = {}
        for spec in self.outputs:
            array = to_numpy(named[spec.name], spec)
            if self.batched and (array.ndim == 0 or array.shape[0] != batch):
                raise NavdeployError(f"output {spec.name!r}: the pipeline returned shape {list(array.shape)} "
                                     f"for a batch of {batch}; a batching pipeline returns one item per input item "
                                     "on axis 0.")
            self._check(spec.name, array, spec, "output")
            out[spec.name] = array
        return out
