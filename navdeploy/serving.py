"""``nav.serve``: a Python pipeline behind PyTriton, its wrapped modules running their selected runners in-process.

    handle = nav.serve(pipeline_fn, inputs=[nav.serving.Tensor("prompt", bytes, (1,))],
                       outputs=[nav.serving.Tensor("image", np.float32, (32, 32, 3))],
                       name="stable_diffusion", max_batch_size=4, blocking=False)
    ...                         # tritonclient requests to handle.http_url / handle.grpc_url
    handle.stop()               # or: with nav.serve(..., blocking=False) as handle: ...

How the pipeline is called: with one keyword argument per input. With batching (``max_batch_size >= 1``,
requests batched by PyTriton's ``@batch``) each argument holds the batch: a numpy array ``[B, *shape]``, or, for a
string input of shape ``(1,)``, a ``list[str]`` of length B. Without batching (``max_batch_size=0``) each call is
one request: arrays of the declared shape, a ``str`` for a string input of shape ``(1,)``. The pipeline returns a
dict (output name -> value), a tuple/list in the order of ``outputs``, or a single value when there is one
output; torch tensors, numpy arrays, lists of numbers and strings are accepted.

Strings travel as Triton ``BYTES`` tensors (UTF-8): declare them with dtype ``bytes`` (the pipeline gets ``bytes``)
or ``str`` (the pipeline gets ``str``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from navdeploy.errors import ConfigError, NavdeployError
from navdeploy.triton.server import free_ports, stub_environment

log = logging.getLogger("navdeploy")

__all__ = ["Tensor", "ServerHandle", "serve", "serve_from_spec", "infer_specs", "free_ports"]


@dataclass(frozen=True)
class Tensor:
    """One input or output of the served pipeline.

    Args:
        name: the tensor's name in requests and responses.
        dtype: a numpy dtype (``np.float32``, ``np.int64``...), ``bytes`` or ``str`` for strings (Triton BYTES).
        shape: the shape of ONE item, without the batch axis; ``-1`` marks an axis of any size.
        optional: an input the request may leave out (the pipeline then does not get that argument).
    """

    name: str
    dtype: Any
    shape: tuple[int, ...]
    optional: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"Tensor name={self.name!r}: use a non-empty string.")
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if any(s < -1 or s == 0 for s in self.shape):
            raise ConfigError(f"Tensor {self.name!r}: shape {self.shape} may hold sizes >= 1 and -1 (any size) only.")
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


# --- environment: what PyTriton needs on a machine like this one ------------------------------------------
def _check_environment() -> None:
    if int(np.__version__.split(".")[0]) >= 2:
        raise NavdeployError(f"nvidia-pytriton needs numpy<2 but numpy {np.__version__} is installed; "
                             "run: python -m pip install 'numpy<2'.")
    if importlib.util.find_spec("pytriton") is None:
        raise NavdeployError("nav.serve needs nvidia-pytriton; run: python -m pip install 'navdeploy[triton]' "
                             "(or 'nvidia-pytriton tritonclient[grpc,http]').")
    # PyTriton starts the Python-backend stub from this process's environment.
    stub_environment(os.environ)


def _resolve_ports(ports: Union[None, int, Sequence[int], Mapping[str, int]], host: str) -> dict[str, int]:
    names = ("http", "grpc", "metrics")
    if ports is None:
        return dict(zip(names, free_ports(3, host)))
    if isinstance(ports, int):
        ports = [ports]
    if isinstance(ports, Mapping):
        unknown = set(ports) - set(names)
        if unknown:
            raise ConfigError(f"ports: unknown keys {sorted(unknown)}; use 'http', 'grpc' and 'metrics'.")
        given = dict(ports)
    else:
        ports = list(ports)
        if len(ports) > 3:
            raise ConfigError(f"ports={ports!r}: give at most (http, grpc, metrics).")
        given = dict(zip(names, ports))
    for key, value in given.items():
        if not (isinstance(value, int) and 0 < value < 65536):
            raise ConfigError(f"ports[{key!r}]={value!r}: use a TCP port number 1..65535.")
    missing = [n for n in names if n not in given]
    extra = iter(p for p in free_ports(len(missing) + 3, host) if p not in given.values())
    given.update({n: next(extra) for n in missing})
    if len(set(given.values())) != 3:
        raise ConfigError(f"ports={given}: http, grpc and metrics need three different ports.")
    return given


# --- converting between the wire and the pipeline ----------------------------------------------------------
def _decode_input(spec: Tensor, array: np.ndarray, batched: bool) -> Any:
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


def _to_numpy(value: Any, spec: Tensor) -> np.ndarray:
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


class _PipelineCall:
    """The function PyTriton calls: decode inputs, call the pipeline, encode and check outputs.

    Errors raised here become the error response of that request only; the server keeps serving."""

    def __init__(self, func: Callable, inputs: Sequence[Tensor], outputs: Sequence[Tensor], batched: bool,
                 max_batch_size: int):
        self.func, self.inputs, self.outputs = func, list(inputs), list(outputs)
        self.batched, self.max_batch_size = batched, max_batch_size
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
            if self.batched:
                if batch is not None and array.shape[0] != batch:
                    raise PyTritonValidationError(f"inputs disagree on the batch size: {name!r} has {array.shape[0]}, "
                                                  f"others {batch}.")
                batch = array.shape[0]
        kwargs = {n: _decode_input(known[n], a, self.batched) for n, a in arrays.items()}
        with self.lock:
            result = self.func(**kwargs)
        named = _named_outputs(result, self.outputs)
        out = {}
        for spec in self.outputs:
            array = _to_numpy(named[spec.name], spec)
            if self.batched and (array.ndim == 0 or array.shape[0] != batch):
                raise NavdeployError(f"output {spec.name!r}: the pipeline returned shape {list(array.shape)} for a batch "
                                     f"of {batch}; a batching pipeline returns one item per input item on axis 0.")
            self._check(spec.name, array, spec, "output")
            out[spec.name] = array
        return out


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
        return _to_numpy([value] if isinstance(value, (str, bytes)) else value, spec).reshape((1, *spec.shape))
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
    kwargs = {t.name: _decode_input(t, arrays[t.name], batched) for t in inputs}
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


# --- the server ----------------------------------------------------------------------------------------------
def kill_processes_from(prefix: str) -> int:
    """SIGKILL every process whose executable path starts with ``prefix``, and their children; how many.

    When Triton's exit timeout ends before a Python backend model unloads, tritonserver exits and leaves the
    model's ``triton_python_backend_stub`` (and the process it started) running, orphaned, for good."""
    procs: dict[int, tuple[int, str]] = {}  # pid -> (parent pid, argv[0])
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            argv0 = (entry / "cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
            ppid = int(_stat(int(entry.name))[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to read
        procs[int(entry.name)] = (ppid, argv0)
    stubs = {pid for pid, (_, argv0) in procs.items() if argv0.startswith(prefix)}
    doomed = stubs | {pid for pid, (ppid, _) in procs.items() if ppid in stubs}
    count = len(doomed)
    for pid in doomed:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5  # SIGKILL is delivered asynchronously: return once they are gone
    while doomed and time.monotonic() < deadline:
        doomed = {pid for pid in doomed if _running(pid)}
        time.sleep(0.01)
    return count


def _stat(pid: int) -> list[str]:
    """The fields of ``/proc/<pid>/stat`` after the command name (state, parent pid, ...); the name, in
    parentheses, may itself hold spaces and parentheses."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def _running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie stays until init reaps it)."""
    try:
        return _stat(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


class ServerHandle:
    """A running PyTriton server. ``stop()`` it (idempotent) or use it as a context manager."""

    def __init__(self, triton: Any, name: str, host: str, ports: dict[str, int], inputs: list[Tensor],
                 outputs: list[Tensor], max_batch_size: int):
        self._triton = triton
        workspace = getattr(getattr(triton, "_workspace", None), "path", None)  # PyTriton's; None if it moves
        self._stub_prefix = f"{workspace}/tritonserver/" if workspace else None
        self.name, self.host, self.ports = name, host, ports
        self.inputs, self.outputs, self.max_batch_size = inputs, outputs, max_batch_size
        self._clients: list[Any] = []
        self._stopped = False
        self._lock = threading.Lock()
        self._on_term: Optional[_TermHandler] = None  # the SIGTERM handler of a background server

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.ports['http']}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.ports['grpc']}"

    @property
    def running(self) -> bool:
        return not self._stopped and self._triton.is_alive()

    def client(self, protocol: str = "http") -> Any:
        """A ``tritonclient`` client for this server, closed by ``stop()`` (closing clients first keeps stop fast)."""
        if protocol == "http":
            from tritonclient.http import InferenceServerClient
            client = InferenceServerClient(self.http_url)
        elif protocol == "grpc":
            from tritonclient.grpc import InferenceServerClient
            client = InferenceServerClient(self.grpc_url)
        else:
            raise ConfigError(f"protocol={protocol!r}: use 'http' or 'grpc'.")
        self._clients.append(client)
        return client

    def stop(self) -> None:
        """Close the clients made by :meth:`client`, then stop the server and its workspace."""
        # In the main thread, do not wait for the lock: a SIGTERM handler runs there and may have interrupted
        # this very stop() while it held the lock. Whoever holds it is stopping the server already.
        if not self._lock.acquire(blocking=not _in_main_thread()):
            return
        try:
            if self._stopped:
                return
            self._stopped = True
        finally:
            self._lock.release()
        for client in self._clients:
            with contextlib.suppress(Exception):
                client.close()
        self._clients.clear()
        self._release_signal_handler()
        self._triton.stop()
        if self._stub_prefix:
            killed = kill_processes_from(self._stub_prefix)
            if killed:
                log.warning("navdeploy: server %r: killed %d Python backend process(es) left running after Triton "
                            "exited (the model did not unload within exit_timeout_secs)", self.name, killed)
        log.info("navdeploy: server %r on %s stopped", self.name, self.http_url)

    def _release_signal_handler(self) -> None:
        """A stopped server needs no SIGTERM handler: put the previous one back. The handler must not keep this
        handle (and through PyTriton's bound models, the pipeline and its nav.Modules) alive: the signal module holds
        it, as does any handler installed later that chains to it."""
        on_term, self._on_term = self._on_term, None
        if on_term is None:
            return
        on_term.handle = None  # still chains to the previous handler, but no longer holds this server
        if _in_main_thread() and signal.getsignal(signal.SIGTERM) is on_term:
            signal.signal(signal.SIGTERM, on_term.previous if on_term.previous is not None else signal.SIG_DFL)

    def wait(self) -> None:
        """Block until the server stops (``stop()`` from another thread, SIGINT or SIGTERM)."""
        _wait(self)

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = "stopped" if self._stopped else "running"
        return f"ServerHandle({self.name!r}, http={self.http_url}, grpc={self.grpc_url}, {state})"


_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _wait(handle: ServerHandle, ready: Optional[str] = None) -> None:
    """Serve until SIGINT/SIGTERM (handled here, then the previous handlers are back) or the server dies.
    ``ready`` is printed once the handlers are in place: a supervisor that signals as soon as it reads it
    must not kill the process with the default handler."""
    # A flag, not a threading.Event: the handler runs in the main thread between bytecodes, possibly inside
    # Event.wait holding the Event's lock, and Event.set would then wait for that lock for ever (seen: a SIGTERM
    # hung a blocking server 1 time in 5).
    stop: list[int] = []
    previous = {}
    if _in_main_thread():
        for sig in _SIGNALS:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, lambda signum, frame: stop.append(signum))
    if ready:
        print(ready, flush=True)
    try:
        while not stop and handle.running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        handle.stop()


class _TermHandler:
    """SIGTERM in the background: stop the server (until it is stopped), then do what the previous handler did."""

    def __init__(self, handle: ServerHandle, previous: Any):
        self.handle: Optional[ServerHandle] = handle
        self.previous = previous

    def __call__(self, signum: int, frame: Any) -> None:
        handle = self.handle
        if handle is not None:
            handle.stop()
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)


def _install_background_handlers(handle: ServerHandle, previous: dict) -> None:
    """In the background: SIGINT behaves as before (KeyboardInterrupt; PyTriton's atexit stops the server);
    SIGTERM stops the server, then does what the previous handler did. ``handle.stop()`` puts the previous
    SIGTERM handler back."""
    signal.signal(signal.SIGINT, previous.get(signal.SIGINT) or signal.default_int_handler)
    handle._on_term = _TermHandler(handle, previous.get(signal.SIGTERM))
    signal.signal(signal.SIGTERM, handle._on_term)


def serve(infer_callable: Callable, inputs: Optional[Sequence[Tensor]] = None,
          outputs: Optional[Sequence[Tensor]] = None, name: str = "pipeline", max_batch_size: int = 8, *,
          sample: Optional[Mapping[str, Any]] = None, host: str = "127.0.0.1",
          ports: Union[None, int, Sequence[int], Mapping[str, int]] = None, blocking: bool = True,
          load_optimized: bool = True, workspace: Optional[Union[str, Path]] = None,
          max_queue_delay_us: int = 0, exit_timeout_secs: int = 10, log_verbose: int = 0,
          triton_workspace: Optional[Union[str, Path]] = None) -> ServerHandle:
    """Serve a Python pipeline through PyTriton; wrapped modules run their selected runners in-process.

    Args:
        infer_callable: the pipeline: called with one keyword argument per input (see the module docstring).
        inputs, outputs: :class:`Tensor` specs. Leave them out and give ``sample`` to infer them.
        name: the Triton model name (letters, digits, ``.``, ``_``, ``-``).
        max_batch_size: the largest batch PyTriton's ``@batch`` hands the pipeline; ``0`` for a pipeline that does
            not batch (one request per call). Larger batches are refused by the server with an error response.
        sample: one request item ``{input name: value}``, used to infer missing ``inputs``/``outputs`` (the pipeline
            is called once with it).
        host: the address the server binds to (default: loopback only).
        ports: ``None`` (free ports), an int (HTTP), ``(http, grpc, metrics)`` or ``{"http": .., "grpc": ..}``.
        blocking: serve until SIGINT/SIGTERM and return the (stopped) handle; with ``False`` return the running
            handle at once (``handle.stop()`` or ``with``); SIGINT still interrupts the program, and SIGTERM stops
            the server cleanly.
        load_optimized: call ``nav.load_optimized(workspace)`` first so every wrapped module runs its selected
            runner; pass ``False`` when the pipeline was just optimized in this process.
        max_queue_delay_us: dynamic batcher delay: how long the server waits to gather a batch.
        exit_timeout_secs: how long stopping waits for in-flight requests and for the model to unload (its Python
            backend stub takes ~2.5 s on an idle CPU machine). Stub processes still alive after it are killed.
    """
    _check_environment()
    from pytriton.model_config import DynamicBatcher, ModelConfig
    from pytriton.triton import Triton, TritonConfig

    if not callable(infer_callable):
        raise TypeError(f"nav.serve needs a callable pipeline; got {type(infer_callable).__name__}.")
    if not isinstance(max_batch_size, int) or max_batch_size < 0:
        raise ConfigError(f"max_batch_size={max_batch_size!r}: use an int >= 1 (batching) or 0 (no batching).")
    batched = max_batch_size > 0
    if load_optimized:
        from navdeploy.optimize import load_optimized as _load

        loaded = _load(workspace)
        log.info("navdeploy: serving %r with modules %s", name, loaded)
    if inputs is None or outputs is None:
        if sample is None:
            raise ConfigError("nav.serve needs inputs= and outputs= (lists of nav.serving.Tensor) or sample= (one "
                              "request item, e.g. {'prompt': 'a photo'}) to infer them from.")
        inferred_in, inferred_out = infer_specs(infer_callable, sample, batched, outputs)
        inputs = inputs if inputs is not None else inferred_in
        outputs = inferred_out
    inputs, outputs = list(inputs), list(outputs)
    for spec in (*inputs, *outputs):
        if not isinstance(spec, Tensor):
            raise TypeError(f"inputs/outputs hold nav.serving.Tensor specs; got {type(spec).__name__}.")
    if not inputs or not outputs:
        raise ConfigError("nav.serve needs at least one input and one output.")
    names = [t.name for t in inputs] + [t.name for t in outputs]
    if len(set(names)) != len(names):
        raise ConfigError(f"input and output names must be unique; got {names}.")
    port_map = _resolve_ports(ports, host)

    call = _PipelineCall(infer_callable, inputs, outputs, batched, max_batch_size)
    if batched:
        from pytriton.decorators import batch, group_by_keys

        infer_func = group_by_keys(batch(call))  # requests leaving out optional inputs are batched apart
        model_config = ModelConfig(max_batch_size=max_batch_size, batching=True,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us))
    else:
        def infer_func(requests: list) -> list[dict[str, np.ndarray]]:
            return [call(**{k: request[k] for k in request.keys()}) for request in requests]

        model_config = ModelConfig(max_batch_size=0, batching=False)

    config = TritonConfig(http_address=host, http_port=port_map["http"], grpc_address=host,
                          grpc_port=port_map["grpc"], metrics_address=host, metrics_port=port_map["metrics"],
                          allow_metrics=False, exit_timeout_secs=exit_timeout_secs, log_verbose=log_verbose)
    previous = {sig: signal.getsignal(sig) for sig in _SIGNALS} if _in_main_thread() else {}
    triton = Triton(config=config, workspace=str(triton_workspace) if triton_workspace else None)
    handle = ServerHandle(triton, name, host, port_map, inputs, outputs, max_batch_size)
    try:
        triton.bind(model_name=name, infer_func=infer_func, inputs=[t.to_pytriton() for t in inputs],
                    outputs=[t.to_pytriton() for t in outputs], config=model_config, strict=True)
        triton.run()
    except BaseException:
        with contextlib.suppress(Exception):
            triton.stop()
        raise
    finally:
        for sig, handler in previous.items():  # whatever PyTriton or its helpers installed is undone
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    log.info("navdeploy: serving %r at http://%s grpc://%s", name, handle.http_url, handle.grpc_url)
    if blocking:
        _wait(handle, f"navdeploy: serving model {name!r} at http://{handle.http_url} and grpc://{handle.grpc_url} "
                      "(Ctrl+C to stop)")
        return handle
    if previous:
        _install_background_handlers(handle, previous)
    return handle


# --- for the CLI ---------------------------------------------------------------------------------------------
def load_callable(spec: str) -> Callable:
    """``"package.module:attr"`` or ``"path/to/file.py:attr"`` -> the object (dots in attr walk attributes)."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ConfigError(f"{spec!r}: use 'module:function' or 'path/to/file.py:function'.")
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ConfigError(f"{spec!r}: use 'module:function' or 'path/to/file.py:function'.")
    if target.endswith(".py") or os.sep in target:
        path = Path(target).resolve()
        if not path.is_file():
            raise ConfigError(f"{spec!r}: file {path} does not exist.")
        module_name = f"navdeploy_serve_{path.stem}"
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))
        module_spec.loader.exec_module(module)
    else:
        if "" not in sys.path and os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())
        try:
            module = importlib.import_module(target)
        except ModuleNotFoundError as exc:
            raise ConfigError(f"{spec!r}: cannot import module {target!r} ({exc}).") from exc
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{spec!r}: {target!r} has no attribute {attr!r}.")
        obj = getattr(obj, part)
    return obj


def serve_from_spec(spec: str, *, factory: bool = False, **serve_kwargs: Any) -> ServerHandle:
    """``nav.serve`` for a pipeline named ``"module:function"`` (what ``navdeploy serve`` calls).

    With ``factory=True`` the named object is called without arguments and returns the pipeline callable
    (e.g. ``examples/stable_diffusion.py:make_server_pipeline``). ``serve_kwargs`` go to :func:`serve`; when the
    object has a ``navdeploy_serve`` dict attribute (e.g. inputs/outputs/max_batch_size), it supplies defaults.
    """
    obj = load_callable(spec)
    if factory:
        obj = obj()
    if not callable(obj):
        raise ConfigError(f"{spec!r} is a {type(obj).__name__}, not a callable pipeline.")
    defaults = dict(getattr(obj, "navdeploy_serve", None) or {})
    return serve(obj, **{**defaults, **serve_kwargs})
