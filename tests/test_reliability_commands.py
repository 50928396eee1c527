"""The commands never destroy what navdeploy did not write, and never print a traceback for a bad workspace.

``clean`` acts only on a navdeploy workspace (the marker optimize writes, or module folders with valid manifests)
and only on module folders in it; ``export-repo`` replaces only a repository navdeploy wrote (marker
``.navdeploy-repository``) unless ``--force``, and never a regular file; every command reads manifests through the
validated reader, so a hand-edited manifest is one line naming the file. The commands run in-process
(``CliRunner``); one small optimized workspace is built once and copied."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch
from typer.testing import CliRunner

import navdeploy as nav
from navdeploy.cli import app
from navdeploy.triton.emit import REPOSITORY_MARKER
from navdeploy.workspace.identity import has_marker, is_workspace
from navdeploy.workspace.layout import WORKSPACE_MARKER

NAME = "rel_cmd"
ENV = {"COLUMNS": "250", "NO_COLOR": "1"}


@pytest.fixture(scope="module")
def original(tmp_path_factory, isolated_env):
    """One optimized workspace (TorchScript, in-process: a few seconds); the tests work on copies."""
    with isolated_env("rel_cmd") as ws:
        torch.manual_seed(0)
        module = nav.Module(torch.nn.Linear(4, 2).eval(), name=NAME)
        config = nav.OptimizeConfig(workspace=ws, target_formats=(nav.Format.TORCHSCRIPT,), batch_sizes=(1,),
                                    profile_time_s=0.05, use_multiprocessing=False, pipeline_repeats=0)
        nav.optimize(module, [(1, torch.randn(1, 4))], config)
        del module
    return ws


@pytest.fixture
def ws(original, tmp_path) -> Path:
    copy = tmp_path / "ws"
    shutil.copytree(original, copy)
    return copy


def cli(*args: str):
    result = CliRunner().invoke(app, list(args), env=ENV)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output, result.output
    return result


def one_line_error(result) -> str:
    assert result.exit_code != 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    return lines[0]


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- the workspace marker -------------------------------------------------------------------------------------


def test_optimize_marks_its_workspace(original):
    assert has_marker(original)
    data = json.loads((original / WORKSPACE_MARKER).read_text())
    assert data["navdeploy_workspace"] == 1 and data["navdeploy"] == nav.__version__


def test_a_workspace_written_before_the_marker_is_still_one(ws):
    (ws / WORKSPACE_MARKER).unlink()
    assert is_workspace(ws)  # its module folder has a valid manifest
    (ws / NAME / "manifest.json").write_text("{}")
    assert not is_workspace(ws)


# -- clean ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", ".", "/", "ABSOLUTE", "../sibling", f"{NAME}/..", f"{NAME}/child", ""])
def test_clean_refuses_anything_but_a_module_name(ws, tmp_path, name):
    sibling = tmp_path / "sibling"
    sibling.mkdir()
    (sibling / "keep.txt").write_text("mine")
    name = str(sibling) if name == "ABSOLUTE" else name
    before_ws, before_sibling = files(ws), files(sibling)
    result = cli("clean", name, "--yes", "-w", str(ws))
    assert "not a module name" in one_line_error(result) or "no module" in result.output
    assert files(ws) == before_ws and files(sibling) == before_sibling


def test_clean_refuses_a_folder_that_is_not_a_module_folder(ws):
    (ws / "photos").mkdir()
    (ws / "photos" / "cat.jpg").write_text("meow")
    line = one_line_error(cli("clean", "photos", "--yes", "-w", str(ws)))
    assert "no module 'photos'" in line and NAME in line  # and it lists what is there
    assert (ws / "photos" / "cat.jpg").exists()


def test_clean_refuses_a_folder_that_is_not_a_workspace(tmp_path):
    foreign = tmp_path / "project"
    (foreign / "src").mkdir(parents=True)
    (foreign / "src" / "main.py").write_text("print()")
    for args in (("clean", "--yes", "-w", str(foreign)), ("clean", "src", "--yes", "-w", str(foreign))):
        line = one_line_error(cli(*args))
        assert "is not a navdeploy workspace" in line and str(foreign) in line
    assert (foreign / "src" / "main.py").exists()


def test_clean_one_module(ws):
    result = cli("clean", NAME, "--yes", "-w", str(ws))
    assert result.exit_code == 0, result.output
    assert not (ws / NAME).exists() and (ws / "reports").exists() and has_marker(ws)


def test_clean_all_deletes_only_module_folders_and_navdeploys_own(ws):
    (ws / "notes.txt").write_text("mine")
    (ws / "data").mkdir()
    (ws / "data" / "x.bin").write_text("mine")
    (ws / "inductor_cache").mkdir(exist_ok=True)
    result = cli("clean", "--yes", "-w", str(ws))
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in ws.iterdir()) == [WORKSPACE_MARKER, "data", "notes.txt"]
    assert (ws / "data" / "x.bin").read_text() == "mine"
    again = cli("clean", "--yes", "-w", str(ws))  # still a workspace: nothing left to clean, not an error
    assert again.exit_code == 0 and "nothing to clean" in again.output


def test_clean_asks_first(ws):
    result = CliRunner().invoke(app, ["clean", NAME, "-w", str(ws)], input="n\n", env=ENV)
    assert result.exit_code == 1 and (ws / NAME).is_dir()


# -- export-repo ----------------------------------------------------------------------------------------------


def test_export_writes_a_marker_and_replaces_its_own_repository(ws, tmp_path):
    repo = tmp_path / "repo"
    assert cli("export-repo", str(repo), "-w", str(ws)).exit_code == 0
    assert (repo / REPOSITORY_MARKER).is_file() and (repo / NAME / "config.pbtxt").is_file()
    (repo / NAME / "stale.txt").write_text("from the last export")
    result = cli("export-repo", str(repo), "-w", str(ws))  # its own repository: no --force needed
    assert result.exit_code == 0, result.output
    assert not (repo / NAME / "stale.txt").exists()


def test_export_refuses_a_folder_it_did_not_write(ws, tmp_path):
    target = tmp_path / "project"
    target.mkdir()
    (target / "important.txt").write_text("mine")
    line = one_line_error(cli("export-repo", str(target), "-w", str(ws)))
    assert str(target) in line and "--force" in line
    assert files(target) == ["important.txt"]
    with pytest.raises(nav.NavdeployError, match="did not write"):
        nav.export_model_repository(target, workspace=ws)
    assert files(target) == ["important.txt"]
    assert cli("export-repo", str(target), "-w", str(ws), "--force").exit_code == 0
    assert (target / REPOSITORY_MARKER).is_file() and not (target / "important.txt").exists()


def test_export_into_an_empty_folder_needs_no_force(ws, tmp_path):
    (tmp_path / "empty").mkdir()
    assert cli("export-repo", str(tmp_path / "empty"), "-w", str(ws)).exit_code == 0


@pytest.mark.parametrize("force", [False, True])
def test_export_never_replaces_a_file(ws, tmp_path, force):
    target = tmp_path / "model_repository"
    target.write_text("a file")
    line = one_line_error(cli("export-repo", str(target), "-w", str(ws), *(["--force"] if force else [])))
    assert "is a file" in line
    assert target.read_text() == "a file"


def test_export_with_a_missing_templates_folder_is_an_error(ws, tmp_path):
    line = one_line_error(cli("export-repo", str(tmp_path / "repo"), "-w", str(ws), "--templates",
                              str(tmp_path / "nonexistent")))
    assert "nonexistent" in line and "templates" in line
    assert not (tmp_path / "repo").exists()
    mistaken = tmp_path / "my_templates"  # a folder, but not one of templates (a typo of the folder above it)
    (mistaken / "nested").mkdir(parents=True)
    (mistaken / "nested" / "config.pbtxt.j2").write_text("")
    line = one_line_error(cli("export-repo", str(tmp_path / "repo"), "-w", str(ws), "--templates", str(mistaken)))
    assert "holds none of config.pbtxt.j2" in line and str(mistaken) in line
    assert not (tmp_path / "repo").exists()


# -- manifests through the validated reader -------------------------------------------------------------------


def _first_candidate(data: dict) -> dict:
    return next(iter(data["graphs"].values()))["candidates"][0]


def _first_profile(data: dict) -> dict:
    """The first point of a full profile: the winner has one; eager only where its screen kept it in the lead."""
    candidates = next(iter(data["graphs"].values()))["candidates"]
    return next(c["profile"][0] for c in candidates if c["profile"])


EDITS = {
    "p50 a string": lambda d: _first_profile(d).update(p50_ms="fast"),
    "updated a number": lambda d: next(iter(d["graphs"].values())).update(updated=5),
    "tolerances a string": lambda d: d.update(tolerances="tight"),
    "profile batch size a string": lambda d: _first_profile(d).update(batch_size="one"),
    "selected names no candidate": lambda d: next(iter(d["graphs"].values())).update(selected="Nope"),
    "graph key a path": lambda d: d["graphs"].update({"../x": next(iter(d["graphs"].values()))}),
    "candidate format a path": lambda d: _first_candidate(d).update(format="../../etc"),
    "retries negative": lambda d: _first_candidate(d).update(retries=-1),
}


@pytest.mark.parametrize("edit", list(EDITS))
def test_status_and_export_on_a_hand_edited_manifest_name_the_file(ws, tmp_path, edit):
    path = ws / NAME / "manifest.json"
    data = json.loads(path.read_text())
    EDITS[edit](data)
    path.write_text(json.dumps(data))
    status = cli("status", "-w", str(ws))
    assert status.exit_code == 1
    assert str(path) in status.output and "not a valid navdeploy manifest" in status.output, status.output
    line = one_line_error(cli("export-repo", str(tmp_path / "repo"), "-w", str(ws)))
    assert str(path) in line and "not a valid navdeploy manifest" in line
    assert not (tmp_path / "repo").exists()
    report = cli("report", "-w", str(ws))
    assert report.exit_code == 1 and str(path) in report.output


def test_export_of_a_manifest_that_is_a_folder_names_it(ws, tmp_path):
    path = ws / NAME / "manifest.json"
    path.unlink()
    path.mkdir()  # what a careless copy or a tool can leave
    line = one_line_error(cli("export-repo", str(tmp_path / "repo"), "-w", str(ws)))
    assert str(path) in line and "re-run nav.optimize" in line, line
    assert not (tmp_path / "repo").exists()


# -- a workspace that is also the user's project folder (``-w .``) --------------------------------------------


def test_a_users_latest_html_in_reports_is_never_replaced(ws, tmp_path):
    """A project folder used as the workspace may have a reports/ of its own: its latest.html and latest.json are
    not navdeploy's, so neither an optimize nor `navdeploy report` replaces them."""
    from navdeploy.report.html import write_run_report

    mine = {"latest.html": "<html>Q3 numbers</html>", "latest.json": '{"quarter": 3}'}
    for name, text in mine.items():
        (ws / "reports" / name).write_text(text)
    line = one_line_error(cli("report", "-w", str(ws)))
    assert "is not a navdeploy report" in line and "--output" in line
    torch.manual_seed(0)
    module = nav.Module(torch.nn.Linear(4, 2).eval(), name=NAME)
    config = nav.OptimizeConfig(workspace=ws, target_formats=(nav.Format.TORCHSCRIPT,), batch_sizes=(1,),
                                profile_time_s=0.05, use_multiprocessing=False, pipeline_repeats=0)
    status = nav.optimize(module, [(1, torch.randn(1, 4))], config)  # writes its report (cached: quick)
    written = write_run_report(status)
    assert written.name.startswith("report-") and written.is_file()
    del module
    gc.collect()  # the next test names its module alike
    assert {name: (ws / "reports" / name).read_text() for name in mine} == mine
    cli("clean", "--yes", "-w", str(ws))
    assert {name: (ws / "reports" / name).read_text() for name in mine} == mine  # clean leaves them too
    assert not written.exists()  # navdeploy's own report goes


def _users_files(ws: Path) -> dict[str, str]:
    """Folders of the user's own beside the modules, named like navdeploy's: what a project used as the workspace
    holds (a web app's manifest.json, a log named navdeploy.log, the user's reports/)."""
    mine = {"webapp/manifest.json": '{"name": "my app", "icons": []}', "docs/navdeploy.log": "notes",
            "reports/q3.txt": "my report"}
    for rel, text in mine.items():
        (ws / rel).parent.mkdir(parents=True, exist_ok=True)
        (ws / rel).write_text(text)
    return mine


def test_clean_all_in_a_project_folder_deletes_only_what_navdeploy_wrote(ws):
    mine = _users_files(ws)
    result = cli("clean", "--yes", "-w", str(ws))
    assert result.exit_code == 0, result.output
    assert {rel: (ws / rel).read_text() for rel in mine} == mine
    assert not (ws / NAME).exists() and sorted(p.name for p in (ws / "reports").iterdir()) == ["q3.txt"]


@pytest.mark.parametrize("name", ["webapp", "docs"])
def test_clean_refuses_a_users_folder_that_looks_like_a_module(ws, name):
    mine = _users_files(ws)
    assert f"no module {name!r}" in one_line_error(cli("clean", name, "--yes", "-w", str(ws)))
    assert {rel: (ws / rel).read_text() for rel in mine} == mine


def test_status_report_and_export_ignore_a_users_manifest_json(ws, tmp_path):
    _users_files(ws)
    status = cli("status", "-w", str(ws))
    assert status.exit_code == 0 and "webapp" not in status.output, status.output  # never `navdeploy clean webapp`
    report = cli("report", "-w", str(ws), "-o", str(tmp_path / "r.html"))
    assert report.exit_code == 0 and "webapp" not in report.output, report.output
    export = cli("export-repo", str(tmp_path / "repo"), "-w", str(ws))
    assert export.exit_code == 0, export.output


def test_optimize_never_writes_into_a_folder_it_did_not_create(tmp_path):
    ws = tmp_path / "project"
    (ws / NAME).mkdir(parents=True)
    mine = {"__init__.py": "def net(): pass\n", ".notes.tmp": "draft", "manifest.json": '{"name": "my app"}'}
    for rel, text in mine.items():
        (ws / NAME / rel).write_text(text)
    module = nav.Module(torch.nn.Linear(4, 2).eval(), name=NAME)
    config = nav.OptimizeConfig(workspace=ws, target_formats=(nav.Format.TORCHSCRIPT,), batch_sizes=(1,),
                                profile_time_s=0.05, use_multiprocessing=False, pipeline_repeats=0)
    with pytest.raises(nav.WorkspaceError, match="navdeploy did not create") as info:
        nav.optimize(module, [(1, torch.randn(1, 4))], config)
    assert str(ws / NAME) in str(info.value) and "name=" in str(info.value)
    assert {p.name: p.read_text() for p in (ws / NAME).iterdir()} == mine


# -- what the operating system refuses: one line naming the path and the fix ------------------------------------


@contextlib.contextmanager
def _mounted(folder: Path, *options: list[str]) -> Iterator[Path]:
    """``folder`` mounted by each of ``options`` in turn (a tmpfs, a read-only bind mount) for the block; the test
    is skipped where mounting is not allowed (root only: chmod does not stop root's writes)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting needs root")
    folder.mkdir(exist_ok=True)
    for command in options:
        done = subprocess.run([*command, str(folder)], capture_output=True)
        if done.returncode:
            subprocess.run(["umount", "-l", str(folder)], check=False)
            pytest.skip(f"cannot mount here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _read_only(folder: Path):
    return _mounted(folder, ["mount", "--bind", str(folder)], ["mount", "-o", "remount,bind,ro"])


def test_clean_and_report_in_a_read_only_workspace(ws, tmp_path):
    before = files(ws)
    with _read_only(ws):
        line = one_line_error(cli("clean", NAME, "--yes", "-w", str(ws)))
        assert str(ws / NAME) in line and "read-only" in line
        line = one_line_error(cli("report", "-w", str(ws)))
        assert str(ws / "reports") in line and "read-only" in line and "--output" in line
        assert cli("report", "-w", str(ws), "-o", str(tmp_path / "r.html")).exit_code == 0
    assert files(ws) == before


def test_export_to_a_read_only_folder_or_a_full_disk(ws, tmp_path):
    with _read_only(tmp_path / "ro"):
        line = one_line_error(cli("export-repo", str(tmp_path / "ro" / "repo"), "-w", str(ws)))
        assert str(tmp_path / "ro" / "repo") in line and "read-only" in line
    with _mounted(tmp_path / "disk", ["mount", "-t", "tmpfs", "-o", "size=4k", "tmpfs"]) as disk:
        line = one_line_error(cli("export-repo", str(disk / "repo"), "-w", str(ws)))
        assert str(disk / "repo") in line and "disk is full" in line and "free" in line
        assert list(disk.iterdir()) == []  # nothing half-written stays


# -- bad arguments ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("args, needle", [
    (("report", "-o", "/"), "--output"),
    (("export-repo", "REPO", "--instances", "0"), "--instances"),
    (("export-repo", "REPO", "--instances", "-3"), "--instances"),
    (("validate-repo", "MISSING"), "does not exist"),
    (("clean", "--yes", "-w", "FILE"), "is a file, not a workspace folder"),
    (("report", "-w", "FILE"), "is a file, not a workspace folder"),
])
def test_bad_arguments_are_one_line(ws, tmp_path, args, needle):
    (tmp_path / "file").write_text("not a workspace")
    args = [str(tmp_path / "repo") if a == "REPO" else str(tmp_path / "missing") if a == "MISSING" else
            str(tmp_path / "file") if a == "FILE" else a for a in args]
    given = "-w" in args or args[0] == "validate-repo"
    line = one_line_error(cli(*args, *([] if given else ["-w", str(ws)])))
    assert needle in line
    assert not (tmp_path / "repo").exists()
