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
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import numpy as np

from navdeploy.errors import ConfigError, NavdeployError
from navdeploy.serving.bounds import DEFAULT_MAX_REQUEST_BYTES, RequestBounds, captured_max_shapes
from navdeploy.serving.codec import PipelineCall
from navdeploy.serving.guard import RequestGuard
from navdeploy.serving.handle import ServerHandle
from navdeploy.serving.signals import SIGNALS, in_main_thread, install_background_handlers, wait_for_stop
from navdeploy.serving.specs import Tensor, infer_specs
from navdeploy.triton.server import check_stub_environment, check_stub_numpy, free_ports, stub_environment_while

log = logging.getLogger("navdeploy")


# --- environment: what PyTriton needs on a machine like this one ------------------------------------------
def _check_environment() -> None:
    if importlib.util.find_spec("pytriton") is None:
        raise NavdeployError("nav.serve needs nvidia-pytriton; run: python -m pip install 'navdeploy[triton]' "
                             "(or 'nvidia-pytriton tritonclient[grpc,http]').")
    # nvidia-pytriton 0.7.0 needs numpy<2 here, and its proxy model runs in the bundled Python-backend stub, which
    # reads numpy 1.x's structures and imports numpy and zmq from its own isolated interpreter.
    check_stub_numpy(np.__version__, "in this process")
    check_stub_environment(("numpy", "zmq"))


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


def serve(infer_callable: Callable, inputs: Optional[Sequence[Tensor]] = None,
          outputs: Optional[Sequence[Tensor]] = None, name: str = "pipeline", max_batch_size: int = 8, *,
          sample: Optional[Mapping[str, Any]] = None, host: str = "127.0.0.1",
          ports: Union[None, int, Sequence[int], Mapping[str, int]] = None, blocking: bool = True,
          load_optimized: bool = True, workspace: Optional[Union[str, Path]] = None,
          max_queue_delay_us: int = 0, exit_timeout_secs: int = 10, log_verbose: int = 0,
          triton_workspace: Optional[Union[str, Path]] = None,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> ServerHandle:
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
        max_request_bytes: the most bytes one request may declare for its inputs (shape x item size, strings 4
            bytes an element at least) and the largest HTTP body (decoded). With each input's fixed axes,
            ``Tensor.max_shape`` and ``max_batch_size`` it bounds what a request may declare; a request over the
            bounds is refused with an error before the server allocates anything (:mod:`navdeploy.serving.bounds`).
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
        from navdeploy.optimize.load import load_optimized as _load

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
    if not isinstance(max_request_bytes, int) or max_request_bytes < 1:
        raise ConfigError(f"max_request_bytes={max_request_bytes!r}: use an int >= 1 (bytes).")
    bounds = RequestBounds.of(inputs, max_batch_size, max_request_bytes,
                              captured_max_shapes(infer_callable, workspace))
    port_map = _resolve_ports(ports, host)
    # tritonserver's own HTTP endpoint listens on loopback only: HTTP clients reach it through the guard.
    triton_http = next(p for p in free_ports(4, "127.0.0.1") if p not in port_map.values())

    call = PipelineCall(infer_callable, inputs, outputs, batched, max_batch_size, bounds)
    if batched:
        from pytriton.decorators import batch, group_by_keys

        infer_func = group_by_keys(batch(call))  # requests leaving out optional inputs are batched apart
        model_config = ModelConfig(max_batch_size=max_batch_size, batching=True,
                                   batcher=DynamicBatcher(max_queue_delay_microseconds=max_queue_delay_us))
    else:
        def infer_func(requests: list) -> list[dict[str, np.ndarray]]:
            return [call(**{k: request[k] for k in request.keys()}) for request in requests]

        model_config = ModelConfig(max_batch_size=0, batching=False)

    config = TritonConfig(http_address="127.0.0.1", http_port=triton_http, grpc_address=host,
                          grpc_port=port_map["grpc"], metrics_address=host, metrics_port=port_map["metrics"],
                          allow_metrics=False, exit_timeout_secs=exit_timeout_secs, log_verbose=log_verbose)
    previous = {sig: signal.getsignal(sig) for sig in SIGNALS} if in_main_thread() else {}
    triton = Triton(config=config, workspace=str(triton_workspace) if triton_workspace else None)
    handle = ServerHandle(triton, name, host, port_map, inputs, outputs, max_batch_size)
    try:
        # PyTriton copies os.environ when it starts tritonserver, whose Python-backend stubs inherit it: the
        # variables the stub needs are set only while the server starts, and this process keeps its own.
        with stub_environment_while():
            triton.bind(model_name=name, infer_func=infer_func, inputs=[t.to_pytriton() for t in inputs],
                        outputs=[t.to_pytriton() for t in outputs], config=model_config, strict=True)
            triton.run()
        handle.guard = RequestGuard(bounds, name, host, port_map["http"], triton_http, exit_timeout_secs)
        handle.guard.start()
    except BaseException:
        with contextlib.suppress(Exception):
            triton.stop()
        raise
    finally:
        for sig, handler in previous.items():  # whatever PyTriton or its helpers installed is undone
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    log.info("navdeploy: serving %r at http://%s grpc://%s", name, handle.http_url, handle.grpc_url)
    if blocking:
        wait_for_stop(handle, f"navdeploy: serving model {name!r} at http://{handle.http_url} and "
                              f"grpc://{handle.grpc_url} (Ctrl+C to stop)")
        return handle
    if previous:
        install_background_handlers(handle, previous)
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
