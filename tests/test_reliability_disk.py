"""A full disk, a read-only file system or a permission problem where optimize writes is a WorkspaceError that
names the path, the free space and the fix; nothing half-written stays behind.

The full disk is real: a 64 KiB tmpfs (mounting needs root; skipped otherwise) and ``/dev/full``, whose writes
fail with ENOSPC."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest
import torch

import navdeploy as nav
from navdeploy.capture.graph import Sample
from navdeploy.workspace import atomic
from navdeploy.workspace.atomic import write_error, write_json_atomic
from navdeploy.workspace.samples import save_samples


@contextlib.contextmanager
def tiny_disk(folder: Path, size: str = "64k") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``folder`` for the block; skips the test where mounting is not allowed."""
    folder.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _dev_full_fdopen(fd, *args, **kwargs):
    """``os.fdopen`` that writes to /dev/full instead: every flush fails with a real ENOSPC."""
    os.close(fd)
    return open("/dev/full", *args, **kwargs)


def test_the_error_of_a_full_disk_names_the_path_the_free_space_and_the_fix(tmp_path):
    with pytest.raises(OSError) as raised:
        with open("/dev/full", "w") as f:
            f.write("x" * 10)
    assert raised.value.errno == errno.ENOSPC
    error = write_error(raised.value, tmp_path / "m" / "manifest.json")
    assert isinstance(error, nav.WorkspaceError)
    text = str(error)
    assert str(tmp_path / "m" / "manifest.json") in text and "disk is full" in text and " free on " in text
    assert "OptimizeConfig(workspace=...)" in text


@pytest.mark.parametrize("code, needle", [(errno.EROFS, "read-only"), (errno.EACCES, "permission denied"),
                                          (errno.EPERM, "permission denied"), (errno.EIO, "check the folder")])
def test_other_write_errors_name_the_path_and_the_fix(tmp_path, code, needle):
    text = str(write_error(OSError(code, os.strerror(code)), tmp_path / "x"))
    assert str(tmp_path / "x") in text and needle in text and "NAVDEPLOY_WORKSPACE" in text


def test_json_written_to_a_full_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "manifest.json"
    path.write_text('{"old": true}')
    monkeypatch.setattr(atomic.os, "fdopen", _dev_full_fdopen)
    with pytest.raises(nav.WorkspaceError, match="disk is full"):
        write_json_atomic(path, {"new": "x" * 100_000})
    assert path.read_text() == '{"old": true}'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json"]


class _Graph:
    samples = [Sample([torch.randn(64, 64)], [torch.randn(64, 64)]) for _ in range(8)]  # 256 KiB of tensors


def test_samples_on_a_full_tmpfs(tmp_path):
    with tiny_disk(tmp_path / "disk") as disk:
        with pytest.raises(nav.WorkspaceError) as info:
            save_samples(_Graph(), disk / "graph")
        text = str(info.value)
        assert str(disk / "graph" / "samples.pt") in text and "disk is full" in text and "KiB free" in text
        assert list((disk / "graph").iterdir()) == []  # no half-written temporary left


def test_optimize_into_a_full_workspace_is_one_clear_error(tmp_path):
    with tiny_disk(tmp_path / "disk") as disk:
        module = nav.Module(torch.nn.Linear(64, 64).eval(), name="rel_disk_full")
        config = nav.OptimizeConfig(workspace=disk, target_formats=(nav.Format.TORCHSCRIPT,), batch_sizes=(1,),
                                    profile_time_s=0.05, use_multiprocessing=False, pipeline_repeats=0,
                                    sample_count=8)
        data = [(64, torch.randn(64, 64)) for _ in range(8)]
        with pytest.raises(nav.WorkspaceError) as info:
            nav.optimize(module, data, config)
        assert "disk is full" in str(info.value) and str(disk) in str(info.value)
        leftovers = [p for p in disk.rglob("*") if p.name.endswith(".tmp") or ".tmp-" in p.name]
        assert leftovers == []
        assert not (disk / "rel_disk_full" / "manifest.json").exists()
        x = torch.randn(2, 64)
        torch.testing.assert_close(module(x), module.__wrapped__(x))  # still usable, eagerly
