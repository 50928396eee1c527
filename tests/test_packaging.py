"""What the wheel holds: every package of navdeploy/ is listed in pyproject.toml, and a non-editable install
ships the templates (it renders a Triton repository and an HTML report from site-packages, outside the checkout)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _package_folders() -> set[str]:
    """Dotted names of every folder under navdeploy/ with an ``__init__.py``."""
    return {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "navdeploy").rglob("__init__.py")
            if "__pycache__" not in p.parts}


def test_every_package_is_listed_in_pyproject():
    setuptools = _pyproject()["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    missing = _package_folders() - listed
    assert not missing, f"add {sorted(missing)} to [tool.setuptools] packages in pyproject.toml: the wheel lacks them"
    # Listed names that are not folders of navdeploy/ must come from package-dir (navdeploy.templates).
    mapped = setuptools.get("package-dir", {})
    for name in listed - _package_folders():
        assert name in mapped, f"{name} is listed in pyproject.toml but navdeploy/ has no such package"
        assert (ROOT / mapped[name]).is_dir(), (name, mapped[name])
    assert sorted(p.name for p in (ROOT / mapped["navdeploy.templates"]).glob("*.j2")), "no templates to ship"


# Run by the venv's interpreter from a folder outside the checkout: optimize a tiny module, export it, and say
# where navdeploy and its templates were imported from.
_IN_VENV = textwrap.dedent("""
    import json, sys, sysconfig
    from pathlib import Path

    import torch

    import navdeploy as nav
    from navdeploy.templates_dir import templates_dir

    workspace, repository = Path(sys.argv[1]), Path(sys.argv[2])
    torch.manual_seed(0)
    linear = nav.Module(torch.nn.Linear(4, 3).eval(), name="linear")
    config = nav.OptimizeConfig(target_formats=(nav.Format.TORCHSCRIPT,), runners=("TorchScriptCPU",),
                                batch_sizes=(1, 2), max_batch_size=2, profile_time_s=0.05,
                                use_multiprocessing=False, workspace=workspace)
    nav.optimize(linear, [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))], config=config)
    nav.export_model_repository(repository, backend="python", workspace=workspace)
    print("RESULT " + json.dumps({"navdeploy": nav.__file__, "templates": str(templates_dir()),
                                  "purelib": sysconfig.get_paths()["purelib"]}))
""")


def _run(cmd: list[str], env: dict, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=str(cwd), timeout=timeout)
    assert done.returncode == 0, f"{cmd} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> tuple[Path, dict]:
    """(venv python, environment): navdeploy installed non-editable from a copy of this checkout into a fresh venv
    that sees the system's packages (torch and the other dependencies), offline."""
    tmp = tmp_path_factory.mktemp("packaging")
    # A copy: pip builds in the source folder, and build/ or egg-info must not land in the checkout.
    src = shutil.copytree(ROOT, tmp / "src", ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", "model_repository"))
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(tmp / "venv")],
                   check=True, timeout=120)
    python = tmp / "venv" / "bin" / "python"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of the checkout on sys.path
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", NAVDEPLOY_WORKSPACE=str(tmp / "default_ws"),
               TORCHINDUCTOR_CACHE_DIR=str(tmp / "inductor"))
    _run([str(python), "-c", "import setuptools"], env, tmp)  # --no-build-isolation builds with this one
    _run([str(python), "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
          str(src)], env, tmp)
    return python, env


@pytest.mark.slow
def test_installed_wheel_ships_templates(venv, tmp_path):
    python, env = venv
    workspace, repository = tmp_path / "ws", tmp_path / "model_repository"
    done = _run([str(python), "-c", _IN_VENV, str(workspace), str(repository)], env, tmp_path)
    found = json.loads(next(x for x in done.stdout.splitlines() if x.startswith("RESULT ")).removeprefix("RESULT "))
    purelib = Path(found["purelib"])
    navdeploy_file, templates = Path(found["navdeploy"]), Path(found["templates"])

    assert navdeploy_file == purelib / "navdeploy" / "__init__.py", found  # the venv's copy, not /work/...
    assert not navdeploy_file.is_relative_to(ROOT), found
    assert templates == purelib / "navdeploy" / "templates", found
    assert sorted(p.name for p in templates.glob("*.j2")) == sorted(p.name for p in (ROOT / "templates").glob("*.j2"))
    for name in ("serve.py", "linear/config.pbtxt", "linear/1/model.py"):
        assert (repository / name).is_file(), name

    report = tmp_path / "report.html"
    navdeploy = python.parent / "navdeploy"  # the console script of the wheel
    _run([str(navdeploy), "report", "-w", str(workspace), "-o", str(report)], env, tmp_path)
    assert "linear" in report.read_text()
    _run([str(navdeploy), "validate-repo", str(repository), "--target", "cpu"], env, tmp_path)


def test_a_worker_imports_none_of_the_api_and_nav_optimize_stays_the_function():
    """navdeploy's workers import ``navdeploy.candidates`` (so this package first) and need none of the API; the public
    names are imported on first use, and ``nav.optimize`` is the function even after its subpackage's modules load."""
    script = (
        "import sys, navdeploy.candidates.isolation\n"
        "loaded = sorted(m for m in ('navdeploy.api', 'navdeploy.serving', 'navdeploy.triton', 'navdeploy.report',"
        " 'navdeploy.optimize.run') if m in sys.modules)\n"
        "import navdeploy as nav, navdeploy.optimize.run, navdeploy.optimize.module\n"
        "print(loaded, callable(nav.optimize), nav.optimize.__module__, nav.Module.__name__,"
        " [name for name in nav.__all__ if not hasattr(nav, name)])\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["[]", "True", "navdeploy.api", "Module", "[]"], done.stdout
