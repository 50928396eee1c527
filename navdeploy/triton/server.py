"""Serve a model repository with the ``tritonserver`` binary bundled in the ``nvidia-pytriton`` wheel.

That binary holds only the Python backend. Launching it outside PyTriton needs: a ``--backend-directory`` with
``python/`` holding ``libtriton_python.so``, ``triton_python_backend_utils.py`` and the stub built for this
Python (``python_backend_stubs/3.X/``); the interpreter's ``bin`` first on ``PATH``; ``LD_LIBRARY_PATH`` with
this Python's ``LIBDIR`` (else the stub loads the distro's libpython) and the wheel's bundled libraries.
:class:`TritonServer` does all of that, binds 127.0.0.1 on chosen or free ports, waits for readiness and stops
cleanly.

Where the wheel keeps its libraries (``libtritonserver``, ``libcudart-*.so.12``, ...): ``nvidia_pytriton.libs``
beside the ``pytriton`` package. Its binaries find them through an RPATH relative to their own place
(``$ORIGIN/../../../nvidia_pytriton.libs``), which holds only where the wheel installed them: PyTriton runs a copy
of ``tritonserver`` from its own workspace and adds one folder to ``LD_LIBRARY_PATH`` — ``nvidia_pytriton.libs``
when ``pytriton`` lies in one of ``site.getsitepackages()``, else ``pytriton/tritonserver/external_libs`` (a source
checkout), a folder the wheel does not have. A ``pip install --target`` folder on ``PYTHONPATH`` is such an
"else", so there the copy finds no ``libcudart``: :func:`bundled_library_dirs` finds the folder that exists.

The stub embeds Python in isolated mode (``sys.flags.isolated``): it runs the first ``python3`` on its ``PATH``
(this interpreter's ``bin``, which both PyTriton and navdeploy put first) with that environment's site-packages and
``.pth`` files, and ignores ``PYTHONPATH`` and the user site. It is built with pybind11's numpy 1.x interface (it
imports ``numpy.core.multiarray`` and reads numpy 1.x's array-descriptor layout): with numpy 2 there, a request's
input arrives wrong and the response comes back empty. So Python-backend models need ``numpy<2`` installed *in that
environment*, where ``PYTHONPATH`` cannot put it: :func:`check_stub_environment` asks that interpreter.

    with TritonServer("model_repository") as server:
        client = tritonclient.http.InferenceServerClient(server.http_url)
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator, MutableMapping, Optional, Sequence

from navdeploy.errors import NavdeployError
from navdeploy.triton.validate import parse_config


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as exc:
        raise NavdeployError("serving a repository needs the nvidia-pytriton wheel (it bundles tritonserver): "
                             "pip install 'navdeploy[triton]'") from exc
    return Path(pytriton.__file__).resolve().parent


def bundled_library_dirs() -> list[str]:
    """The folders of the libraries bundled in the nvidia-pytriton wheel that exist here: ``nvidia_pytriton.libs``
    beside the ``pytriton`` package (a wheel install, ``pip install --target`` included) and
    ``pytriton/tritonserver/external_libs`` (a source checkout). A copy of ``tritonserver`` or of the stub outside
    the wheel's folders needs them on ``LD_LIBRARY_PATH``."""
    root = _pytriton_root()
    candidates = [root.parent / "nvidia_pytriton.libs", root / "tritonserver" / "external_libs"]
    return [str(p) for p in candidates if p.is_dir()]


def stub_python() -> Path:
    """The interpreter the Python-backend stub embeds: ``python3`` in this interpreter's ``bin`` (first on the
    ``PATH`` the server gets), else this interpreter."""
    for candidate in (Path(sys.executable).parent / "python3", Path(sys.exec_prefix) / "bin" / "python3"):
        if candidate.exists():
            return candidate
    return Path(sys.executable)


_PROBE = """
import importlib, json, sys
found = {}
for name in sys.argv[1:]:
    try:
        found[name] = getattr(importlib.import_module(name), "__version__", "")
    except Exception:
        found[name] = None
print(json.dumps(found))
"""


def stub_packages(modules: Sequence[str], python: Optional[Path] = None) -> dict[str, Optional[str]]:
    """Module -> version (None: not importable) as the stub's Python sees them: ``python`` (default
    :func:`stub_python`) in isolated mode, as the stub runs it (``PYTHONPATH`` does not reach it)."""
    python = python or stub_python()
    run = subprocess.run([str(python), "-I", "-c", _PROBE, *modules], capture_output=True, text=True, timeout=120,
                         env={k: v for k, v in os.environ.items() if not k.startswith("PYTHON")})
    if run.returncode != 0:
        raise NavdeployError(f"{python} could not be started to check the Python-backend stub's packages: "
                             f"{run.stderr.strip()[-500:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def check_stub_numpy(numpy_version: str, where: str) -> None:
    """Raise a :class:`NavdeployError` with the reason and the fix when ``numpy_version`` (found in ``where``) is
    2 or later: the bundled stub reads numpy 1.x's structures."""
    if int(numpy_version.split(".")[0]) >= 2:
        raise NavdeployError(
            f"numpy {numpy_version} is installed {where}, but the Python-backend stub of the tritonserver in "
            "nvidia-pytriton is built for numpy 1.x (with numpy 2 inputs arrive wrong and responses come back "
            "empty). Serve from an environment with numpy<2: python -m pip install 'navdeploy[triton]' (it pins "
            "numpy<2), or 'numpy<2' beside it; nav.optimize, load_optimized and export-repo work with either numpy.")


def check_stub_environment(modules: Sequence[str] = ("numpy",), python: Optional[Path] = None) -> None:
    """Raise a :class:`NavdeployError` naming the interpreter and the fix when the stub's Python (isolated, as the
    stub runs it) cannot import one of ``modules`` or has numpy 2."""
    python = python or stub_python()
    found = stub_packages(modules, python)
    missing = [name for name in modules if found.get(name) is None]
    if missing:
        raise NavdeployError(
            f"the Python-backend stub runs {python} (isolated: PYTHONPATH and the user site do not reach it), which "
            f"cannot import {', '.join(missing)}. Install them into that environment (python -m pip install "
            "'navdeploy[triton]' there), or serve from an environment that has them.")
    if found.get("numpy"):
        check_stub_numpy(found["numpy"], f"for {python} (the interpreter the stub runs, isolated: PYTHONPATH "
                                         "does not reach it)")


def bundled_tritonserver() -> Path:
    """The ``tritonserver`` binary inside the nvidia-pytriton wheel."""
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise NavdeployError(f"{binary} does not exist: this nvidia-pytriton wheel ships no tritonserver.")
    return binary


def _stub_dir(root: Path) -> Path:
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "tritonserver" / "python_backend_stubs" / version
    if not (stub / "triton_python_backend_stub").is_file():
        raise NavdeployError(f"nvidia-pytriton ships no Python-backend stub for Python {version} ({stub}).")
    return stub


def prepare_backend_directory(target: Path) -> Path:
    """Fill ``target/python`` with the bundled Python backend and this interpreter's stub; returns ``target``."""
    root = _pytriton_root()
    python = target / "python"
    python.mkdir(parents=True, exist_ok=True)
    backend = root / "tritonserver" / "backends" / "python"
    stubs = root / "tritonserver" / "python_backend_stubs"
    for src in (backend / "libtriton_python.so", stubs / "libtriton_python.so"):
        if src.is_file():
            shutil.copy2(src, python / "libtriton_python.so")
            break
    for src in (backend / "triton_python_backend_utils.py", stubs / "triton_python_backend_utils.py"):
        if src.is_file():
            shutil.copy2(src, python / "triton_python_backend_utils.py")
            break
    shutil.copy2(_stub_dir(root) / "triton_python_backend_stub", python / "triton_python_backend_stub")
    return target


def stub_environment(env: MutableMapping[str, str], extra_libs: Sequence[str] = ()) -> None:
    """Make ``env`` fit for a Python-backend stub: this Python's LIBDIR (then ``extra_libs``) first on
    ``LD_LIBRARY_PATH`` — else a pyenv/conda Python's stub loads the distro's libpython — and this Python's
    ``bin`` first on ``PATH``. Used on the bundled server's own env dict here, and by
    :func:`stub_environment_while` for PyTriton."""
    libs = [p for p in [sysconfig.get_config_var("LIBDIR") or "", *extra_libs] if p and Path(p).is_dir()]
    existing = [p for p in env.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p not in libs]
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libs + existing)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, *[p for p in env.get("PATH", "").split(os.pathsep) if p != bindir]])


STUB_VARIABLES = ("PATH", "LD_LIBRARY_PATH")


@contextlib.contextmanager
def stub_environment_while(extra_libs: Optional[Sequence[str]] = None) -> Iterator[None]:
    """``os.environ`` as :func:`stub_environment` makes it, only while the block runs: for a library that copies
    ``os.environ`` when it starts its server (PyTriton). ``extra_libs`` (default: :func:`bundled_library_dirs`, the
    wheel's own libraries, which PyTriton's copy of ``tritonserver`` cannot find by itself when ``pytriton`` is not
    in a site-packages folder) go on ``LD_LIBRARY_PATH`` after this Python's ``LIBDIR``. ``PATH`` and
    ``LD_LIBRARY_PATH`` get their previous values (or stay unset) when the block ends, also on error, so the user's
    process keeps its own."""
    saved = {k: os.environ.get(k) for k in STUB_VARIABLES}
    env = {k: v for k, v in saved.items() if v is not None}
    stub_environment(env, bundled_library_dirs() if extra_libs is None else extra_libs)
    os.environ.update(env)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def server_environment(base: Optional[dict] = None) -> dict:
    """The environment the bundled server and its Python stubs need."""
    env = dict(os.environ if base is None else base)
    # The stub finds a venv through PATH (it runs that python3, isolated), never through PYTHONPATH.
    stub_environment(env, bundled_library_dirs())
    return env


def free_ports(count: int = 1, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that are free on ``host`` right now (all bound at once, so none repeats)."""
    with contextlib.ExitStack() as stack:
        ports = []
        for _ in range(count):
            s = stack.enter_context(contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)))
            s.bind((host, 0))
            ports.append(s.getsockname()[1])
        return ports


def non_python_models(repository: Path) -> list[str]:
    """Models of a repository the bundled server cannot load (any backend but python; ensembles are fine)."""
    found = []
    for folder in sorted(p for p in Path(repository).iterdir() if p.is_dir() and not p.name.startswith(".")):
        try:
            cfg = parse_config((folder / "config.pbtxt").read_text())
        except Exception:  # noqa: BLE001 - any unreadable or malformed config is validate-repo's to report
            continue
        if cfg.platform != "ensemble" and cfg.backend != "python":
            found.append(f"{folder.name} ({cfg.backend or cfg.platform})")
    return found


class TritonServer:
    """A ``tritonserver`` process serving one repository on 127.0.0.1; a context manager.

    Args:
        repository: the model repository folder.
        http_port, grpc_port: ports to bind (free ports when None); metrics are off unless ``metrics_port`` is given.
        startup_timeout_s: how long :meth:`start` waits for ``/v2/health/ready``.
        exit_timeout_s: Triton's ``--exit-timeout-secs``; :meth:`stop` kills the server after that much more.
        tritonserver: a full Triton binary to use instead of the bundled one (with ``backend_directory``).
        backend_directory: that binary's backend folder; a prepared copy of the bundled Python backend when None.
        log_verbose: Triton's ``--log-verbose`` level. The log is in :attr:`log_path`.
    """

    def __init__(self, repository: str | Path, http_port: Optional[int] = None, grpc_port: Optional[int] = None,
                 metrics_port: Optional[int] = None, host: str = "127.0.0.1", startup_timeout_s: float = 120.0,
                 exit_timeout_s: int = 5, tritonserver: Optional[str | Path] = None,
                 backend_directory: Optional[str | Path] = None, log_verbose: int = 0,
                 extra_args: Sequence[str] = ()):
        self.repository = Path(repository).resolve()
        self.host = host
        self.http_port = http_port
        self.grpc_port = grpc_port
        self.metrics_port = metrics_port
        self.startup_timeout_s = startup_timeout_s
        self.exit_timeout_s = exit_timeout_s
        self.tritonserver = Path(tritonserver) if tritonserver else None
        self.backend_directory = Path(backend_directory) if backend_directory else None
        self.log_verbose = log_verbose
        self.extra_args = list(extra_args)
        self.process: Optional[subprocess.Popen] = None
        self._tmp: Optional[Path] = None
        self.log_path: Optional[Path] = None

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def logs(self) -> str:
        """The server's log so far."""
        if self.log_path is None or not self.log_path.exists():
            return getattr(self, "_saved_log", "")
        return self.log_path.read_text(errors="replace")

    def command(self, binary: Path, backends: Path) -> list[str]:
        cmd = [str(binary), f"--model-repository={self.repository}", f"--backend-directory={backends}",
               f"--http-address={self.host}", f"--http-port={self.http_port}",
               f"--grpc-address={self.host}", f"--grpc-port={self.grpc_port}",
               f"--exit-timeout-secs={self.exit_timeout_s}", f"--log-verbose={self.log_verbose}",
               "--strict-readiness=true"]
        if self.metrics_port:
            cmd += ["--allow-metrics=true", f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}"]
        else:
            cmd += ["--allow-metrics=false"]
        return cmd + self.extra_args

    def start(self) -> "TritonServer":
        """Start the server and wait until every model is ready; raises with the server's log otherwise."""
        if self.process is not None:
            raise NavdeployError("this TritonServer is already started")
        if not self.repository.is_dir():
            raise NavdeployError(f"model repository {self.repository} does not exist")
        if self.tritonserver is None:
            check_stub_environment()
            blocked = non_python_models(self.repository)
            if blocked:
                raise NavdeployError(
                    "the tritonserver bundled in nvidia-pytriton has only the Python backend and cannot load "
                    f"{', '.join(blocked)}. Export with backend='python' (navdeploy export-repo --backend python), "
                    "or pass tritonserver= / --tritonserver with a full Triton and its backend directory.")
        binary = self.tritonserver or bundled_tritonserver()
        self._tmp = Path(tempfile.mkdtemp(prefix="navdeploy-triton-"))
        backends = self.backend_directory or prepare_backend_directory(self._tmp / "backends")
        self.log_path = self._tmp / "tritonserver.log"
        spare = iter(p for p in free_ports(3, self.host) if p not in (self.http_port, self.grpc_port))
        self.http_port = self.http_port or next(spare)
        self.grpc_port = self.grpc_port or next(spare)
        env = server_environment() if self.tritonserver is None else dict(os.environ)
        with open(self.log_path, "wb") as log:
            # Its own session: Ctrl-C in a terminal reaches us, and we stop the server (and its stubs) ourselves.
            self.process = subprocess.Popen(self.command(binary, backends), stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=env, cwd=str(self._tmp),
                                            start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise NavdeployError(f"tritonserver exited with code {code} before it was ready. Its log:\n"
                                     f"{self.logs()[-6000:]}")
            try:
                with urllib.request.urlopen(url, timeout=1) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.1)
        raise NavdeployError(f"tritonserver was not ready within {self.startup_timeout_s:g} s. Its log:\n"
                             f"{self.logs()[-6000:]}")

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        if self.process is None:
            raise NavdeployError("the server was not started")
        return self.process.wait()

    def stop(self) -> Optional[int]:
        """Stop the server: SIGINT (Triton unloads models and exits), then SIGKILL of its process group after
        ``exit_timeout_s`` + 10 s. Idempotent. Returns the exit code."""
        process, self.process = self.process, None
        code = None
        if process is not None:
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGINT)
                try:
                    process.wait(timeout=self.exit_timeout_s + 10)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)
            code = process.returncode
            # Stubs left behind by a killed server share its process group (its own session).
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        if self._tmp is not None:
            keep = self.log_path
            if keep is not None and keep.exists():
                self._saved_log = keep.read_text(errors="replace")
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        return code

    def __enter__(self) -> "TritonServer":
        return self.start() if self.process is None else self

    def __exit__(self, *exc) -> None:
        self.stop()


def serve_repository(path: str | Path, **kwargs) -> TritonServer:
    """Start a :class:`TritonServer` on ``path`` and return it once ready (call ``stop()`` or use ``with``)."""
    return TritonServer(path, **kwargs).start()
