"""The environment the bundled tritonserver and PyTriton's copy of it run in, checked against the installed
nvidia-pytriton wheel's real layout: its libraries (libcudart, libtritonserver) live in ``nvidia_pytriton.libs``
beside the package and its binaries find them through an RPATH relative to their own place, which a copy loses.

On the GPU machine nvidia-pytriton is installed with ``pip install --target`` and found through ``PYTHONPATH``:
PyTriton then takes itself for a source checkout, puts ``pytriton/tritonserver/external_libs`` (absent from the
wheel) on ``LD_LIBRARY_PATH``, and its copy of tritonserver cannot load ``libcudart-*.so.12``. The last test
rebuilds that layout here and serves through it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from navdeploy.errors import NavdeployError
from navdeploy.triton.server import (
    TritonServer,
    bundled_library_dirs,
    check_stub_environment,
    check_stub_numpy,
    stub_environment_while,
    stub_packages,
    stub_python,
)

pytest.importorskip("pytriton")

REPO = Path(__file__).resolve().parent.parent


def _pytriton_root() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent


def _copy_like_pytriton(target: Path) -> Path:
    """tritonserver copied as PyTriton 0.7.0 prepares it in its workspace (``Triton._prepare_triton_inference_server``):
    the wheel's ``tritonserver`` folder without the stubs, then this Python's stub into ``backends/python``."""
    src = _pytriton_root() / "tritonserver"
    shutil.copytree(src, target, ignore=shutil.ignore_patterns("python_backend_stubs", "triton_python_backend_stub"))
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    shutil.copy(src / "python_backend_stubs" / version / "triton_python_backend_stub",
                target / "backends" / "python" / "triton_python_backend_stub")
    return target


def _missing_libraries(binary: Path, env: dict) -> list[str]:
    """The shared libraries the dynamic loader cannot find for ``binary`` in ``env`` (``ldd``'s "not found")."""
    out = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if "not found" in line]


def test_the_wheels_libraries_are_found():
    """``bundled_library_dirs`` names the folder that holds the wheel's libcudart and libtritonserver."""
    dirs = [Path(d) for d in bundled_library_dirs()]
    assert dirs, "no library folder of nvidia-pytriton found"
    names = [p.name for d in dirs for p in d.iterdir()]
    assert any(n.startswith("libcudart-") for n in names), names
    assert any(n.startswith("libtritonserver") for n in names), names


@pytest.mark.skipif(shutil.which("ldd") is None, reason="needs ldd")
def test_a_copied_tritonserver_loads_its_libraries_in_the_stub_environment(tmp_path, monkeypatch):
    """A copy of tritonserver, its Python backend and this Python's stub outside the wheel's folders: without the
    wheel's library folder on LD_LIBRARY_PATH the loader cannot find libcudart (what failed on the GPU machine);
    with the environment navdeploy gives PyTriton's server every library is found."""
    copy = _copy_like_pytriton(tmp_path / "workspace" / "tritonserver")
    binaries = [copy / "bin" / "tritonserver", copy / "backends" / "python" / "libtriton_python.so",
                copy / "backends" / "python" / "triton_python_backend_stub"]
    monkeypatch.delenv("LD_LIBRARY_PATH", raising=False)
    bare = dict(os.environ)
    assert any(lib.startswith("libcudart-") for lib in _missing_libraries(binaries[0], bare))
    with stub_environment_while():
        env = dict(os.environ)
    assert "LD_LIBRARY_PATH" not in os.environ  # the process's own environment is back
    for binary in binaries:
        assert _missing_libraries(binary, env) == [], binary


def test_numpy_2_is_refused_for_the_bundled_stub_with_the_fix():
    with pytest.raises(NavdeployError, match=r"numpy 2\.1\.0 is installed here.*numpy<2.*navdeploy\[triton\]"):
        check_stub_numpy("2.1.0", "here")
    check_stub_numpy("1.26.4", "here")


_PROBE_MODEL = """
import sys
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        seen = np.array([sys.executable.encode(), str(sys.flags.isolated).encode()], dtype=object)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("seen", seen)]) for _ in requests]
"""

_PROBE_CONFIG = """
name: "probe"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ 1 ] } ]
output [ { name: "seen" data_type: TYPE_STRING dims: [ 2 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""


def test_stub_python_is_the_interpreter_the_stub_runs_isolated(tmp_path):
    """What the navdeploy checks ask (``stub_python()``, isolated) is what the bundled stub runs: a model
    reports its ``sys.executable`` and ``sys.flags.isolated`` from inside the stub."""
    import numpy as np
    from tritonclient.http import InferenceServerClient, InferInput

    (tmp_path / "repo" / "probe" / "1").mkdir(parents=True)
    (tmp_path / "repo" / "probe" / "config.pbtxt").write_text(_PROBE_CONFIG)
    (tmp_path / "repo" / "probe" / "1" / "model.py").write_text(_PROBE_MODEL)
    with TritonServer(tmp_path / "repo", exit_timeout_s=2) as server:
        client = InferenceServerClient(server.http_url)
        try:
            x = InferInput("x", [1], "FP32")
            x.set_data_from_numpy(np.zeros(1, np.float32))
            executable, isolated = client.infer("probe", [x]).as_numpy("seen").tolist()
        finally:
            client.close()
    assert Path(executable.decode()) == stub_python() and isolated.decode() == "1"


def _venv_with(tmp_path: Path, packages: dict[str, str]) -> tuple[Path, Path]:
    """A real venv (no pip) whose site-packages hold stand-in packages ``name -> __version__``: (its python3, its
    site-packages)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    (site,) = venv.glob("lib/python3.*/site-packages")
    for name, version in packages.items():
        (site / name).mkdir()
        (site / name / "__init__.py").write_text(f"__version__ = {version!r}\n")
    return venv / "bin" / "python3", site


def test_the_stub_check_asks_the_isolated_interpreter_not_pythonpath(tmp_path, monkeypatch):
    """numpy 2 in the stub's environment is refused even with a numpy 1 first on PYTHONPATH (the stub ignores it,
    as on the GPU machine, where numpy 1.26 sat on PYTHONPATH beside a venv holding numpy 2); a missing module is
    named; numpy 1 there passes."""
    python, site = _venv_with(tmp_path, {"numpy": "2.1.0"})
    shadow = tmp_path / "pythonpath" / "numpy"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("__version__ = '1.26.4'\n")
    monkeypatch.setenv("PYTHONPATH", str(shadow.parent))
    assert stub_packages(["numpy", "zmq"], python) == {"numpy": "2.1.0", "zmq": None}
    with pytest.raises(NavdeployError, match=r"numpy 2\.1\.0 is installed for .*isolated"):
        check_stub_environment(("numpy",), python)
    with pytest.raises(NavdeployError, match=r"cannot import zmq"):
        check_stub_environment(("numpy", "zmq"), python)
    (site / "numpy" / "__init__.py").write_text("__version__ = '1.26.4'\n")
    check_stub_environment(("numpy",), python)


_SERVE = textwrap.dedent("""
    import numpy as np, pytriton, sys
    from pathlib import Path
    from tritonclient.http import InferInput
    import navdeploy as nav
    from navdeploy.serving import Tensor

    assert Path(pytriton.__file__).parent.parent == Path(sys.argv[1]), pytriton.__file__  # the --target copy
    handle = nav.serve(lambda x: {"y": x * 2}, inputs=[Tensor("x", np.float32, (2,))],
                       outputs=[Tensor("y", np.float32, (2,))], name="double", max_batch_size=0, blocking=False,
                       load_optimized=False, exit_timeout_secs=2)
    try:
        x = InferInput("x", [2], "FP32")
        x.set_data_from_numpy(np.array([1.5, -2.0], np.float32))
        print("y =", handle.client().infer("double", [x]).as_numpy("y").tolist())
    finally:
        handle.stop()
""")


def test_serve_with_pytriton_installed_outside_site_packages(tmp_path):
    """nvidia-pytriton in a ``pip install --target`` folder on PYTHONPATH (as on the GPU machine): nav.serve starts
    PyTriton's copy of tritonserver, which finds the wheel's libraries, and answers a request."""
    root = _pytriton_root()
    libs = root.parent / "nvidia_pytriton.libs"
    if not libs.is_dir():
        pytest.skip(f"{libs} is not there: nvidia-pytriton is not installed from its wheel")
    site = tmp_path / "site"
    site.mkdir()
    shutil.copytree(root, site / "pytriton", ignore=shutil.ignore_patterns("__pycache__"))
    (site / "nvidia_pytriton.libs").symlink_to(libs, target_is_directory=True)  # 115 MB: linked, not copied
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))
    env.pop("LD_LIBRARY_PATH", None)
    run = subprocess.run([sys.executable, "-c", _SERVE, str(site)], env=env, capture_output=True, text=True,
                         timeout=180, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    assert "y = [3.0, -4.0]" in run.stdout
