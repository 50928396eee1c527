"""After selection the artifact folders nothing will load are removed (``navdeploy/workspace/prune.py``): the
winner's stays, and the one a Python-backend Triton model falls back to; every candidate's record stays, so a
re-run builds nothing again; a run that selects a pruned candidate builds its artifact again; nothing navdeploy
did not write is touched; ``keep_artifacts`` keeps everything. (The rest of the suite keeps every artifact:
``tests/conftest.py`` sets NAVDEPLOY_KEEP_ARTIFACTS=1, as its tests choose and bind losing candidates by hand.)"""

from __future__ import annotations

import gc

import pytest
import torch

import navdeploy as nav
from navdeploy.config import keep_artifacts
from navdeploy.triton.validate import errors, validate_repository
from navdeploy.workspace.manifest import read_manifest, remove_unnamed_builds, write_manifest
from navdeploy.workspace.prune import PRUNED, artifacts_in_use

NAME = "prune_net"
RUNNERS = ("TorchCPU", "TorchScriptCPU", "TorchExportCPU", "OnnxCPU")  # three formats model.py can load


def _config(workspace, **kw) -> nav.OptimizeConfig:
    cfg = dict(workspace=workspace, runners=RUNNERS, batch_sizes=(1, 2), max_batch_size=2, profile_time_s=0.05,
               use_multiprocessing=False, pipeline_repeats=0, keep_artifacts=False)
    cfg.update(kw)
    return nav.OptimizeConfig(**cfg)


def _module() -> nav.Module:
    torch.manual_seed(0)
    return nav.Module(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval(),
                      name=NAME)


DATA = [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))]


def _folders(graph_dir) -> set[str]:
    return {p.name for p in graph_dir.iterdir() if p.is_dir()}


def _build_folders(graph_dir, entry, keys) -> set[str]:
    """The folder names of the builds ``entry`` names for the format keys ``keys``."""
    return {entry.artifact_folder(graph_dir, key).name for key in keys}


@pytest.fixture(autouse=True)
def _collected():
    """Each test's nav.Module is gone before the next one takes its name."""
    yield
    gc.collect()


@pytest.fixture()
def pruned(tmp_path):
    """(workspace, module, graph folder, manifest) after a default (pruning) optimize."""
    module = _module()
    nav.optimize(module, DATA, _config(tmp_path))
    folder = tmp_path / NAME
    manifest = read_manifest(folder)
    (key,) = manifest.graphs
    return tmp_path, module, folder / key, manifest


def test_only_the_artifacts_in_use_stay_and_every_record_stays(pruned):
    workspace, module, graph_dir, manifest = pruned
    entry = manifest.graphs[graph_dir.name]
    keep = artifacts_in_use(entry, manifest.precision)
    assert 1 <= len(keep) <= 2  # the winner's, or the fallback of a winner without one, or both
    assert _folders(graph_dir) == _build_folders(graph_dir, entry, keep)
    states = {name: state.status for name, state in entry.formats.items()}
    assert set(states) == {"torchscript", "torch-exportedprogram", "onnx"}
    assert {name for name, status in states.items() if status == PRUNED} == set(states) - keep
    assert all(entry.formats[name].checksum for name in states)  # what was built stays on record
    assert {c.name for c in entry.candidates} == set(RUNNERS) and all(c.verified for c in entry.candidates)
    assert module.is_optimized or entry.selected == "TorchCPU"


def test_a_rerun_reuses_the_records_of_pruned_candidates(pruned):
    workspace, module, graph_dir, manifest = pruned
    before = _folders(graph_dir)
    status = nav.optimize(module, DATA, _config(workspace))
    graph = status.modules[NAME].graphs[0]
    assert all(c.cached for c in graph.candidates), [(c.name, c.cached) for c in graph.candidates]
    assert graph.selected == manifest.graphs[graph_dir.name].selected
    assert _folders(graph_dir) == before


def test_a_run_that_selects_a_pruned_candidate_builds_it_again(pruned):
    workspace, module, graph_dir, manifest = pruned
    entry = manifest.graphs[graph_dir.name]
    gone = next(c for c in entry.candidates if entry.formats.get(c.artifact_dir(manifest.precision)) is not None
                and entry.formats[c.artifact_dir(manifest.precision)].status == PRUNED)
    # Only eager and the pruned runner now: whichever wins, the pruned artifact is in use (as the winner's or as
    # the Python-backend fallback of an eager winner).
    status = nav.optimize(module, DATA, _config(workspace, runners=("TorchCPU", gone.runner)))
    rebuilt = status.modules[NAME].graphs[0].candidate(gone.runner)
    assert rebuilt.verified and not rebuilt.cached  # ok, or screened out on a tiny module
    after = read_manifest(workspace / NAME).graphs[graph_dir.name]
    assert _build_folders(graph_dir, after, [gone.artifact_dir(manifest.precision)]) <= _folders(graph_dir)
    assert after.formats[gone.artifact_dir(manifest.precision)].status == "ok"
    if after.selected == gone.runner:
        assert module.is_optimized


def test_a_pruned_workspace_exports_a_repository_that_validates(pruned, tmp_path):
    workspace, _, _, _ = pruned
    for backend in ("python", "auto"):
        repo = nav.export_model_repository(tmp_path / f"repo_{backend}", backend=backend, workspace=workspace)
        assert errors(validate_repository(repo)) == []


def test_prune_touches_only_what_navdeploy_wrote(pruned, tmp_path):
    """A user's file and folder in the graph folder stay; a format folder that is a symbolic link is not followed."""
    workspace, _, graph_dir, manifest = pruned
    entry = manifest.graphs[graph_dir.name]
    name = next(n for n, s in entry.formats.items() if s.status == PRUNED)
    user = tmp_path / "users_folder"
    user.mkdir()
    (user / "keep.txt").write_text("mine")
    (graph_dir / name).symlink_to(user, target_is_directory=True)
    (graph_dir / "notes").mkdir()
    (graph_dir / "notes" / "a.txt").write_text("mine")
    (graph_dir / "notes.txt").write_text("mine")
    remove_unnamed_builds(graph_dir.parent, manifest, None)
    assert (user / "keep.txt").read_text() == "mine" and (graph_dir / name).is_symlink()
    assert (graph_dir / "notes" / "a.txt").exists() and (graph_dir / "notes.txt").exists()


def test_folders_left_by_a_killed_prune_go_next_time(pruned):
    """The manifest says pruned but the folder is still there (killed between the manifest write and the delete)."""
    workspace, _, graph_dir, manifest = pruned
    entry = manifest.graphs[graph_dir.name]
    name = next(n for n, s in entry.formats.items() if s.status == PRUNED)
    (graph_dir / name).mkdir()
    (graph_dir / name / "model.bin").write_bytes(b"x" * 1000)
    write_manifest(graph_dir.parent, manifest)
    kept = _folders(graph_dir) - {name}
    remove_unnamed_builds(graph_dir.parent, manifest, None)
    assert not (graph_dir / name).exists() and _folders(graph_dir) == kept


def test_keep_artifacts_keeps_every_folder(tmp_path, monkeypatch):
    monkeypatch.delenv("NAVDEPLOY_KEEP_ARTIFACTS", raising=False)
    module = _module()
    nav.optimize(module, DATA, _config(tmp_path, keep_artifacts=True))
    manifest = read_manifest(tmp_path / NAME)
    (key, entry), = manifest.graphs.items()
    assert _folders(tmp_path / NAME / key) == _build_folders(tmp_path / NAME / key, entry, entry.formats)
    assert set(entry.formats) == {"torchscript", "torch-exportedprogram", "onnx"}
    assert {s.status for s in entry.formats.values()} == {"ok"}


def test_keep_artifacts_reads_the_environment_unless_the_config_says(monkeypatch):
    monkeypatch.delenv("NAVDEPLOY_KEEP_ARTIFACTS", raising=False)
    assert keep_artifacts(nav.OptimizeConfig()) is False
    monkeypatch.setenv("NAVDEPLOY_KEEP_ARTIFACTS", "1")
    assert keep_artifacts(nav.OptimizeConfig()) is True
    assert keep_artifacts(nav.OptimizeConfig(keep_artifacts=False)) is False
    with pytest.raises(nav.ConfigError, match="keep_artifacts"):
        nav.OptimizeConfig(keep_artifacts="yes")


def test_the_inductor_cache_goes_when_no_selected_runner_loads_from_it(tmp_path, monkeypatch):
    from navdeploy.inplace.binding import loads_from_inductor_cache
    from navdeploy.workspace.inductor import cache_dir

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)  # the workspace's own cache, not a user's
    runners = ("TorchCPU", "TorchCompileCPU", "OnnxCPU")
    module = _module()
    nav.optimize(module, DATA, _config(tmp_path, runners=runners, keep_artifacts=True))
    folder = tmp_path / NAME
    cache = cache_dir(folder)
    assert cache.is_dir() and read_manifest(folder).inductor_cache  # torch.compile compiled into it
    nav.optimize(module, DATA, _config(tmp_path, runners=runners))  # everything cached; now pruning
    manifest = read_manifest(folder)
    assert all(c.cached for e in manifest.graphs.values() for c in e.candidates if c.status != "skipped")
    # Kept exactly when a selected runner (torch.compile here) loads from it; an ONNX or eager winner drops it.
    assert cache.is_dir() == loads_from_inductor_cache(manifest) == (manifest.inductor_cache is not None), \
        [e.selected for e in manifest.graphs.values()]
    del module
    gc.collect()
    again = _module()
    assert nav.load_optimized(tmp_path)[NAME]
    x = torch.randn(2, 4)
    with torch.no_grad():
        torch.testing.assert_close(again(x), again.__wrapped__(x))
