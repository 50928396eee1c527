"""The ``navdeploy`` CLI: every command listed, ``optimize`` (script and module:function), ``serve``'s errors.

``optimize`` runs in a subprocess (``python -m navdeploy.cli``) so the modules it wraps never join this process's
registry; no real server is started here (serving is tested in test_serving.py / test_triton_serve.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from typer.testing import CliRunner

from navdeploy.cli import app

COMMANDS = ("optimize", "status", "export-repo", "validate-repo", "serve", "serve-repo", "clean")

_SCRIPT = textwrap.dedent("""
    import torch
    import navdeploy as nav


    def main():
        torch.manual_seed(0)
        linear = nav.Module(torch.nn.Linear(4, 2), name={name!r})
        config = nav.OptimizeConfig(target_formats=(nav.Format.ONNX,), batch_sizes=(1,), profile_time_s=0.05)
        nav.optimize(linear, [(1, torch.randn(1, 4))], config)
        print("OPTIMIZED", {name!r}, flush=True)


    if __name__ == "__main__":
        main()
""")


def _env(workspace: Path) -> dict[str, str]:
    env = dict(os.environ, NAVDEPLOY_WORKSPACE=str(workspace), COLUMNS="250", NO_COLOR="1", TERM="dumb")
    env.pop("NAVDEPLOY_CONSOLE_OUTPUT", None)
    return env


def _navdeploy(*args: str, workspace: Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "navdeploy.cli", *args], cwd=cwd, env=_env(workspace),
                          capture_output=True, text=True, timeout=timeout)


def _unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def _one_line_error(result: subprocess.CompletedProcess) -> str:
    out = (result.stdout + result.stderr).strip()
    assert "Traceback" not in out, out
    assert len(out.splitlines()) == 1, out
    return out


def test_help_lists_every_command():
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, result.output
    for command in COMMANDS:
        assert f" {command} " in result.output, f"{command!r} missing from --help:\n{result.output}"
    for command in COMMANDS:  # each command has help text with an example
        sub = CliRunner().invoke(app, [command, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
        assert sub.exit_code == 0, sub.output
        assert "Example" in sub.output and f"navdeploy {command}" in sub.output, sub.output


@pytest.mark.slow
def test_optimize_script_then_status(tmp_path):
    name = _unique("cli_script_linear")
    script = tmp_path / "optimize_linear.py"
    script.write_text(_SCRIPT.format(name=name))
    workspace = tmp_path / "workspace"
    result = _navdeploy("optimize", str(script), "-w", str(workspace), workspace=tmp_path / "unused", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"OPTIMIZED {name}" in result.stdout
    assert (workspace / name).is_dir()  # -w wins over $NAVDEPLOY_WORKSPACE
    assert not (tmp_path / "unused").exists()

    status = _navdeploy("status", "-w", str(workspace), workspace=tmp_path / "unused", cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    # Which runner wins a 0.01 ms Linear is timing noise, and so is whether the pipeline check then finds the
    # pipeline faster: status must show the runner the manifest selected, and "runs eager" exactly when it records
    # that the check put the module back to eager.
    manifest = json.loads((workspace / name / "manifest.json").read_text())
    (entry,) = manifest["graphs"].values()
    assert entry["selected"] in ("TorchCPU", "OnnxCPU")
    assert name in status.stdout and entry["selected"] in status.stdout, status.stdout
    assert ("runs eager" in status.stdout) == bool(manifest.get("reverted")), (manifest.get("reverted"), status.stdout)

    # A module the pipeline check put back to eager: status says it runs eagerly, and why.
    from navdeploy.optimize.never_slower import mark_reverted

    mark_reverted(workspace / name, "not faster than eager beyond noise (eager 1.00 ms, optimized 1.20 ms)")
    status = _navdeploy("status", "-w", str(workspace), workspace=tmp_path / "unused", cwd=tmp_path)
    assert status.returncode == 0, status.stdout + status.stderr
    assert f"{entry['selected']} (runs eager *)" in status.stdout, status.stdout
    assert f"* {name} runs eagerly in your pipeline" in status.stdout and "optimized 1.20 ms" in status.stdout


@pytest.mark.slow
def test_optimize_module_function_spec(tmp_path):
    name = _unique("cli_spec_linear")
    module = _unique("cli_spec_mod")
    (tmp_path / f"{module}.py").write_text(_SCRIPT.format(name=name))
    result = _navdeploy("optimize", f"{module}:main", "--console", "logs", workspace=tmp_path, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"OPTIMIZED {name}" in result.stdout
    status = _navdeploy("status", workspace=tmp_path, cwd=tmp_path)
    assert status.returncode == 0 and name in status.stdout, status.stdout + status.stderr


def test_optimize_missing_script(tmp_path):
    result = _navdeploy("optimize", str(tmp_path / "no_such_script.py"), workspace=tmp_path, cwd=tmp_path)
    assert result.returncode != 0
    out = _one_line_error(result)
    assert "no_such_script.py" in out and "does not exist" in out


def test_optimize_missing_function(tmp_path):
    module = _unique("cli_nofunc_mod")
    (tmp_path / f"{module}.py").write_text("def main():\n    pass\n")
    result = _navdeploy("optimize", f"{module}:missing_function", workspace=tmp_path, cwd=tmp_path)
    assert result.returncode != 0
    out = _one_line_error(result)
    assert "missing_function" in out and module in out

    script = tmp_path / f"{module}.py"
    result = _navdeploy("optimize", f"{script}:missing_function", workspace=tmp_path, cwd=tmp_path)
    assert result.returncode != 0
    assert "missing_function" in _one_line_error(result)


def test_optimize_import_errors(tmp_path):
    missing = _unique("cli_no_such_module")
    result = _navdeploy("optimize", f"{missing}:main", workspace=tmp_path, cwd=tmp_path)
    assert result.returncode != 0
    assert missing in _one_line_error(result)

    broken = tmp_path / f"{_unique('cli_broken')}.py"
    broken.write_text(f"import {missing}\n")
    for target in (str(broken), f"{broken}:main"):
        result = _navdeploy("optimize", target, workspace=tmp_path, cwd=tmp_path)
        assert result.returncode != 0
        out = _one_line_error(result)
        assert "ModuleNotFoundError" in out and missing in out


def test_optimize_bad_console(tmp_path):
    script = tmp_path / "noop.py"
    script.write_text("print('RAN')\n")
    result = _navdeploy("optimize", str(script), "--console", "loud", workspace=tmp_path, cwd=tmp_path)
    assert result.returncode != 0 and "RAN" not in result.stdout
    assert "simple, detailed or logs" in _one_line_error(result)


@pytest.mark.parametrize("spec, expected", [
    ("no_colon_here", "module:function"),
    (f"{_unique('cli_serve_missing')}:pipeline", "cannot import module"),
])
def test_serve_bad_spec(tmp_path, spec, expected):
    result = CliRunner().invoke(app, ["serve", spec, "-w", str(tmp_path)], env={"COLUMNS": "250", "NO_COLOR": "1"})
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert expected in result.output and "Traceback" not in result.output, result.output


def test_serve_missing_function_and_bad_sample(tmp_path):
    module = tmp_path / f"{_unique('cli_serve_mod')}.py"
    module.write_text("def echo(x):\n    return x\n")
    env = {"COLUMNS": "250", "NO_COLOR": "1"}
    result = CliRunner().invoke(app, ["serve", f"{module}:nothing"], env=env)
    assert result.exit_code == 1 and "nothing" in result.output, result.output
    result = CliRunner().invoke(app, ["serve", f"{module}:echo", "--sample", "{not json"], env=env)
    assert result.exit_code == 1 and "--sample" in result.output, result.output


def test_optimize_passes_workspace_and_console_in_process_not_through_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("NAVDEPLOY_WORKSPACE", str(tmp_path / "user"))
    monkeypatch.delenv("NAVDEPLOY_CONSOLE_OUTPUT", raising=False)
    script = tmp_path / "show_defaults.py"
    script.write_text(textwrap.dedent("""
        import os
        from navdeploy.config import console_output, default_workspace

        print("ENV", os.environ.get("NAVDEPLOY_WORKSPACE"), os.environ.get("NAVDEPLOY_CONSOLE_OUTPUT"))
        print("SEEN", default_workspace(), console_output())
    """))
    before = dict(os.environ)
    result = CliRunner().invoke(app, ["optimize", str(script), "-w", str(tmp_path / "cli"), "--console", "logs"])
    assert result.exit_code == 0, result.output
    assert f"ENV {tmp_path / 'user'} None" in result.output  # the script sees the user's own settings
    assert f"SEEN {(tmp_path / 'cli').resolve()} logs" in result.output  # and navdeploy the command's
    assert dict(os.environ) == before
    from navdeploy.config import console_output, default_workspace

    assert default_workspace() == tmp_path / "user" and console_output() == "simple"  # nothing left behind
