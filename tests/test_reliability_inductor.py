"""The inductor cache torch.compile and AOTInductor winners load from: a read-only workspace loads them, a reload
writes nothing into the workspace, and code in a modified cache never runs (the manifest holds the cache's
checksum). Every optimize and reload is a fresh process, as a user's would be. The read-only workspace is a real
read-only bind mount (root only: chmod does not stop root's writes); elsewhere the reload runs on the writable
workspace, which it must leave as it was."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from typing import Optional

import pytest

from navdeploy.workspace.inductor import (
    cache_checksum,
    cache_dir,
    checksum_to_record,
    discard_unvouched,
    files_list,
    private_copy,
)
from navdeploy.workspace.manifest import read_manifest, write_manifest

NAME = "rel_inductor"
RUNNERS = ("TorchCompileCPU", "AOTInductorCPU")

SCRIPT = textwrap.dedent('''
    import json, sys, warnings
    import torch
    from torch import nn
    import navdeploy as nav


    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.linear = nn.Linear(4, 4)

        def forward(self, x):
            return self.linear(x).relu() * 2


    mode, workspace, name = sys.argv[1], sys.argv[2], sys.argv[3]
    module = nav.Module(Net().eval(), name=name)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if mode == "optimize":  # both winners built, with the inductor cache navdeploy keeps in the module's folder
            config = nav.OptimizeConfig(workspace=workspace, runners=("TorchCPU", "TorchCompileCPU", "AOTInductorCPU"),
                                        batch_sizes=(1, 2), max_batch_size=2, profile_time_s=0.05,
                                        use_multiprocessing=False, pipeline_repeats=0, thorough=True)
            with torch.no_grad():
                nav.optimize(module, [(1, torch.randn(1, 4)), (2, torch.randn(2, 4))], config)
            loaded = module.nav_state.bound
        else:
            loaded = nav.load_optimized(workspace)[name]
    x = torch.randn(2, 4)
    with torch.no_grad():
        diff = (module(x) - module.__wrapped__(x)).abs().max().item()
    print("RESULT", json.dumps({"loaded": loaded, "optimized": module.is_optimized, "diff": diff,
                                "warnings": [str(w.message) for w in caught if "navdeploy" in str(w.message)]}))
''')


def _run(mode: str, workspace: Path, folder: Path) -> dict:
    """The script in a fresh process, with no TORCHINDUCTOR_CACHE_DIR of the user's."""
    script = folder / "inductor_script.py"
    script.write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    done = subprocess.run([sys.executable, str(script), mode, str(workspace), NAME], env=env, capture_output=True,
                          text=True, timeout=500)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert done.returncode == 0 and line, done.stderr[-3000:]
    return json.loads(line[len("RESULT "):])


@pytest.fixture(scope="module")
def optimized(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("inductor_ws")
    _run("optimize", workspace, tmp_path_factory.mktemp("script"))
    manifest = read_manifest(workspace / NAME)
    for entry in manifest.graphs.values():
        assert {c.runner for c in entry.candidates if c.ok} >= set(RUNNERS), entry.candidates
    assert manifest.inductor_cache and manifest.inductor_cache == cache_checksum(workspace / NAME)
    return workspace


def _copy_choosing(optimized: Path, target: Path, runner: str) -> Path:
    """A copy of the workspace whose manifest selects ``runner`` (as a user may choose by hand): which runner wins
    a Linear(4, 4) is timing noise."""
    shutil.copytree(optimized, target)
    folder = target / NAME
    manifest = read_manifest(folder)
    for entry in manifest.graphs.values():
        entry.selected = runner
    manifest.reverted = None
    write_manifest(folder, manifest)
    return target


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` with the hash of its bytes."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _read_only_view(folder: Path, mount: Path) -> Optional[Path]:
    """A read-only bind mount of ``folder`` at ``mount``, or None where mounting is not allowed (chmod does not
    stop root's writes, so root gets the mount; others cannot mount)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return None
    mount.mkdir()
    for command in (["mount", "--bind", str(folder), str(mount)],
                    ["mount", "-o", "remount,bind,ro", str(mount)]):
        if subprocess.run(command, capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=False)
            return None
    return mount


@pytest.mark.slow
@pytest.mark.parametrize("runner", RUNNERS)
def test_a_read_only_workspace_loads_the_winner_and_a_reload_writes_nothing(optimized, tmp_path, runner):
    workspace = _copy_choosing(optimized, tmp_path / "ws", runner)
    before = _tree(workspace)
    view = _read_only_view(workspace, tmp_path / "ro")
    try:
        if view is not None:
            with pytest.raises(OSError):
                (view / NAME / "probe").write_text("the mount must be read-only")
        else:  # no mount here: the workspace stays writable, and the reload must still write nothing into it
            warnings.warn("no read-only bind mount here (needs root): the reload runs on a writable workspace",
                          stacklevel=1)
        result = _run("load", view or workspace, tmp_path)
    finally:
        if view is not None:
            subprocess.run(["umount", "-l", str(view)], check=False)
    assert result["loaded"] and result["optimized"], result
    assert result["diff"] < 1e-5 and not result["warnings"], result
    assert _tree(workspace) == before


@pytest.mark.slow
def test_code_in_a_modified_inductor_cache_never_runs(optimized, tmp_path):
    workspace = _copy_choosing(optimized, tmp_path / "ws", "TorchCompileCPU")
    marker = tmp_path / "the_cached_code_ran"
    sources = [p for p in workspace.rglob("*.py")]
    assert sources, "torch.compile left no generated code in the workspace"
    for path in sources:  # what a corrupted or hand-edited cache could hold
        path.write_text(path.read_text() + f"\nopen({str(marker)!r}, 'w').write('ran')\n")
    result = _run("load", workspace, tmp_path)
    assert not marker.exists()
    # the winner is compiled again, from nothing, and still serves the module
    assert result["loaded"] and result["optimized"] and result["diff"] < 1e-5, result
    assert any("does not match the checksum" in w for w in result["warnings"]), result


def test_optimize_discards_a_cache_its_manifest_does_not_vouch_for(tmp_path):
    """Before nav.optimize compiles into a module's cache, a cache that does not match the recorded checksum is
    removed, so the checksum the run records never covers code navdeploy did not write."""
    module_folder = tmp_path / NAME
    code = cache_dir(module_folder) / "ab" / "generated.py"
    code.parent.mkdir(parents=True)
    code.write_text("x = 1\n")
    (cache_dir(module_folder) / "locks").mkdir()
    recorded = cache_checksum(module_folder)
    (cache_dir(module_folder) / "locks" / "k.lock").write_text("")  # a reader's lock file changes nothing
    discard_unvouched(module_folder, recorded)
    assert code.exists() and cache_checksum(module_folder) == recorded
    code.write_text("x = 1\nimport os\n")
    discard_unvouched(module_folder, recorded)
    assert not cache_dir(module_folder).exists()
    code.parent.mkdir(parents=True)
    code.write_text("x = 1\n")
    discard_unvouched(module_folder, None)  # no manifest vouches for it (a run killed before its manifest)
    assert not cache_dir(module_folder).exists()


def test_a_cache_that_no_longer_matches_is_logged_with_the_files_that_changed(tmp_path, caplog):
    """What wrote into a finished module's cache is read from the log: the files changed, new and missing since
    the checksum (a list of them is written next to the cache with it)."""
    module_folder = tmp_path / NAME
    folder = cache_dir(module_folder)
    for name in ("ab/kernel.py", "ab/kernel.so", "triton/x/kernel.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    recorded = checksum_to_record(module_folder)
    assert recorded == cache_checksum(module_folder) and files_list(module_folder).is_file()
    (folder / "ab" / "kernel.py").write_text("edited")
    (folder / "triton" / "x" / "kernel.json").unlink()
    (folder / "dynamo").mkdir()
    (folder / "dynamo" / "code_state_1.pkl").write_bytes(b"state")
    with caplog.at_level("INFO", logger="navdeploy"):
        discard_unvouched(module_folder, recorded)
    assert not folder.exists() and not files_list(module_folder).exists()
    assert ("changed: ab/kernel.py; new: dynamo/code_state_1.pkl; missing: triton/x/kernel.json"
            in caplog.text), caplog.text


def test_files_written_after_the_checksum_are_removed_and_the_rest_is_kept(tmp_path, caplog):
    """Inductor writes into a cache after the compile that filled it (an entry for a shape seen later, an
    autotuning result): those files are not vouched for, so they go, and the checked rest stays in use, in the
    workspace before an optimize and in a reload's private copy, instead of everything compiling again."""
    module_folder = tmp_path / NAME
    folder = cache_dir(module_folder)
    for name in ("ab/kernel.py", "triton/x/kernel.json"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(name)
    recorded = checksum_to_record(module_folder)
    later = folder / "cd" / "later.py"
    later.parent.mkdir()
    later.write_text("written by a compile after the checksum")
    copy = private_copy(module_folder, recorded, NAME)  # a reload: the copy loses the later file, and is used
    assert (copy / "ab" / "kernel.py").is_file() and not (copy / "cd" / "later.py").exists()
    with caplog.at_level("INFO", logger="navdeploy"):
        discard_unvouched(module_folder, recorded)
    assert not later.exists() and (folder / "ab" / "kernel.py").is_file()
    assert cache_checksum(module_folder) == recorded and "removed 1 file(s) written after its checksum" in caplog.text
    later.write_text("again")
    files_list(module_folder).unlink()  # without the list of recorded files nothing tells them apart: all goes
    discard_unvouched(module_folder, recorded)
    assert not folder.exists()


def _benchmark_decision(key: str) -> None:
    """What pad_mm does after it timed a padded matmul: store the decision in inductor's local cache."""
    from torch._inductor.codecache import LocalCache

    LocalCache().set_value("pad_mm", key, value=True)


def _decisions(folder: Path) -> set[str]:
    files = list((folder / "cache").glob("*"))
    return {k for f in files for k in json.loads(f.read_text())["cache"].get("pad_mm", {})}


def test_each_module_s_benchmark_decisions_land_in_its_own_cache(tmp_path):
    """Inductor memoizes the path of its local cache (pad_mm's decisions) on first use in a process. The binding
    process and a warm build worker compile several modules, each with its own cache: a later module's decisions
    must not land in the first module's cache after its checksum was taken (the next run then found that cache
    changed and compiled the first module again: the SD text encoder's re-run bind on the H200)."""
    from navdeploy.workspace.inductor import pointed_at, set_environment

    first, second, third = (tmp_path / name for name in ("clip", "unet", "vae"))
    with pointed_at(first):
        _benchmark_decision("clip-mm")
    recorded = _decisions(first)
    with pointed_at(second):  # the binding process, next module
        _benchmark_decision("unet-mm")
    before = dict(os.environ)
    try:  # a warm worker that built the first module takes the next module's job (what its loop calls)
        set_environment({"TORCHINDUCTOR_CACHE_DIR": str(third), "TRITON_CACHE_DIR": str(third / "triton")})
        _benchmark_decision("vae-mm")
    finally:
        set_environment({name: before.get(name) for name in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")})
    assert _decisions(first) == recorded == {"clip-mm"}
    assert _decisions(second) == {"unet-mm"} and _decisions(third) == {"vae-mm"}
