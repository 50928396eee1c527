"""AOTInductor's CPU wrapper compiled in two parts, its interface from the machine cache
(``formats/aoti_interface.py``), with torch's real builds and g++."""

from __future__ import annotations

import os
import shutil
import subprocess
import time

import pytest
import torch

from navdeploy.formats import aoti_interface
from navdeploy.formats.aoti_compile import wrapper_beside_kernels
from navdeploy.formats.aoti_interface import _split
from navdeploy.formats.inductor_probe import warm_cpu_isa

pytest.importorskip("torch._inductor.cpp_builder")


def _sources_compiled(monkeypatch) -> list[str]:
    """The source file of every compiler command run from now on (``-c``), in order."""
    seen: list[str] = []
    run = subprocess.run

    def recording(cmd, *args, **kwargs):
        words = cmd.split() if isinstance(cmd, str) else [str(a) for a in cmd]
        if "-c" in words:
            seen.extend(w for w in words if w.endswith(".cpp"))
        return run(cmd, *args, **kwargs)

    monkeypatch.setattr(subprocess, "run", recording)
    return seen


def _package(model: torch.nn.Module, x: torch.Tensor, folder, monkeypatch) -> str:
    """``model`` built into an AOTInductor package in a fresh inductor cache under ``folder``, as navdeploy's
    CPU builds run (the wrapper beside the kernels)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(folder / "inductor"))
    with torch.no_grad():
        program = torch.export.export(model, (x,))
    with wrapper_beside_kernels():
        return torch._inductor.aoti_compile_and_package(program, package_path=str(folder / "m.pt2"))


def _check(path: str, model: torch.nn.Module, x: torch.Tensor) -> None:
    out = torch._inductor.aoti_load_package(path)(x)
    with torch.no_grad():
        torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, model(x))


@pytest.fixture(autouse=True)
def split_not_failed_before(monkeypatch):
    """A split compile that failed earlier in this process (another test's) stops later ones splitting."""
    monkeypatch.setattr(aoti_interface, "_split_failed", False)
    monkeypatch.setattr(aoti_interface, "_base_failed", False)


@pytest.fixture(scope="module")
def first_build(tmp_path_factory):
    """A machine cache that was empty before one package was built with it (the ISA probe warm)."""
    folder = tmp_path_factory.mktemp("aoti_interface")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(aoti_interface, "_split_failed", False)
        patch.setattr(aoti_interface, "_base_failed", False)
        patch.setenv("NAVDEPLOY_MACHINE_CACHE", str(folder / "machine"))
        warm_cpu_isa()
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
        x = torch.randn(2, 8)
        (folder / "first").mkdir()
        _check(_package(model, x, folder / "first", patch), model, x)
    return folder / "machine"


@pytest.fixture
def machine(first_build, tmp_path, monkeypatch):
    """A copy of ``first_build``'s machine cache, in use (a test may damage its copy)."""
    copy = tmp_path / "machine"
    shutil.copytree(first_build, copy)
    monkeypatch.setenv("NAVDEPLOY_MACHINE_CACHE", str(copy))
    return copy


def _other_model() -> tuple[torch.nn.Module, torch.Tensor]:
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.GELU(),
                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten()).eval()
    return model, torch.randn(2, 3, 16, 16)


def test_the_interface_compiles_once_per_machine_and_another_model_reuses_it(machine, tmp_path, monkeypatch):
    cached = list(machine.glob("aoti-interface-*/*.o"))
    assert len(cached) == 1, cached
    compiled = _sources_compiled(monkeypatch)
    model, x = _other_model()
    (tmp_path / "second").mkdir()
    path = _package(model, x, tmp_path / "second", monkeypatch)
    _check(path, model, x)
    names = [source.rsplit("/", 1)[-1] for source in compiled]
    assert "model.cpp" in names and "interface.cpp" not in names, names  # the model's part only
    assert not any(name.endswith(".wrapper.cpp") for name in names), names  # not the whole wrapper
    assert list(machine.glob("aoti-interface-*/*.o")) == cached
    assert not list(machine.glob("aoti-interface-*/*.partial")) and not list((tmp_path / "second").rglob("model.o"))


def _defined(obj, text: str) -> bool:
    """Whether the object file ``obj`` defines a function whose demangled name contains ``text``."""
    listing = subprocess.run(["nm", "-C", "--defined-only", str(obj)], capture_output=True, text=True, check=True)
    return any(text in line for line in listing.stdout.splitlines())


def _split_commands(monkeypatch, keep) -> list[tuple[list[str], str]]:
    """Every command the split runs from now on, with the text of its ``.cpp`` source ("" for the join); the
    join's object is copied to ``keep`` (torch deletes it once linked)."""
    seen: list[tuple[list[str], str]] = []
    run = aoti_interface._run

    def recording(words, cwd):
        sources = [w for w in words if w.endswith(".cpp")]
        seen.append((list(words), open(sources[0]).read() if sources else ""))
        run(words, cwd)
        if "-r" in words:
            shutil.copy(words[words.index("-o") + 1], keep)

    monkeypatch.setattr(aoti_interface, "_run", recording)
    return seen


_BASE_CTOR = "AOTInductorModelBase<torch::aot_inductor::AOTInductorModel>::AOTInductorModelBase("


def test_the_interface_holds_the_model_base_and_the_model_part_leaves_it_out(machine, tmp_path, monkeypatch):
    (cached,) = machine.glob("aoti-interface-*/*.o")
    assert _defined(cached, _BASE_CTOR)
    joined = tmp_path / "joined.o"  # the object torch links
    commands = _split_commands(monkeypatch, joined)
    model, x = _other_model()
    (tmp_path / "second").mkdir()
    _check(_package(model, x, tmp_path / "second", monkeypatch), model, x)
    (_, model_source), (join_words, _) = commands  # the interface came from the cache
    assert "extern template class" in model_source and "-r" in join_words
    assert _defined(joined, _BASE_CTOR) and _defined(joined, "AOTInductorModel::run_impl(")


def test_an_interface_whose_base_does_not_compile_is_remembered_and_later_splits_go_without(
        machine, tmp_path, monkeypatch):
    # A base that cannot be instantiated stands for a torch whose runtime does not instantiate as model.h reads.
    monkeypatch.setattr(aoti_interface, "_BASE", "torch::aot_inductor::AOTInductorModelBase<int>")
    compiled = _sources_compiled(monkeypatch)
    model, x = _other_model()
    (tmp_path / "second").mkdir()
    _check(_package(model, x, tmp_path / "second", monkeypatch), model, x)
    assert any(source.endswith(".wrapper.cpp") for source in compiled), compiled  # this build: whole
    assert len(list(machine.glob("aoti-interface-*/*.failed"))) == 1
    assert aoti_interface._base_failed and not aoti_interface._split_failed
    monkeypatch.setattr(aoti_interface, "_base_failed", False)  # as in a new process on this machine
    commands = _split_commands(monkeypatch, tmp_path / "joined.o")
    (tmp_path / "third").mkdir()
    _check(_package(model, x, tmp_path / "third", monkeypatch), model, x)
    sources = {words[words.index("-o") + 1].rsplit("/", 1)[-1]: text for words, text in commands if text}
    assert "extern template" not in next(t for n, t in sources.items() if n == "model.o")  # split, without it
    assert not any("AOTInductorModelBase<int>" in text for text in sources.values())
    assert not list(machine.glob("aoti-interface-*/*.partial"))


def test_a_compile_of_the_interface_sweeps_what_killed_compiles_left_and_nothing_else(machine, tmp_path, monkeypatch):
    (cached,) = machine.glob("aoti-interface-*/*.o")
    cached.unlink()  # this build compiles the interface again
    stale, in_flight = cached.with_name("killed.o.partial"), cached.with_name("running.o.partial")
    stale.write_bytes(b"half an object")
    in_flight.write_bytes(b"another process is writing this")
    hours_ago = time.time() - 2 * 3600
    os.utime(stale, (hours_ago, hours_ago))
    model, x = _other_model()
    (tmp_path / "second").mkdir()
    _check(_package(model, x, tmp_path / "second", monkeypatch), model, x)
    assert cached.is_file() and in_flight.is_file() and not stale.exists()
    assert (cached.parent / "key.json").is_file()


def test_a_damaged_cached_interface_builds_the_wrapper_whole_and_is_dropped(machine, tmp_path, monkeypatch):
    (cached,) = machine.glob("aoti-interface-*/*.o")
    cached.write_bytes(b"not an object file")
    compiled = _sources_compiled(monkeypatch)
    model, x = _other_model()
    (tmp_path / "second").mkdir()
    _check(_package(model, x, tmp_path / "second", monkeypatch), model, x)  # correct all the same
    assert any(source.endswith(".wrapper.cpp") for source in compiled), compiled  # torch's compile, in one piece
    assert not cached.exists()  # the next build compiles the interface again
    assert aoti_interface._split_failed  # and later builds of this process compile whole at once


def test_the_key_follows_the_command_and_not_its_paths(tmp_path):
    source = tmp_path / "x.wrapper.cpp"
    source.write_text("#include <cpu.h>\n" + aoti_interface._interface_text() + "\nint model() { return 1; }\n")
    other = tmp_path / "y.wrapper.cpp"
    other.write_text(source.read_text())

    def key(command: str) -> str:
        split = _split(command)
        assert split is not None
        return aoti_interface._key(split)

    base = key(f"g++ {source} -O1 -DX=1 -c -o {tmp_path / 'x.wrapper.o'}")
    assert key(f"g++ {other} -O1 -DX=1 -c -o {tmp_path / 'y.wrapper.o'}") == base  # another model, same interface
    assert key(f"g++ {source} -O3 -DX=1 -c -o {tmp_path / 'x.wrapper.o'}") != base
    assert key(f"g++ {source} -O1 -DX=2 -c -o {tmp_path / 'x.wrapper.o'}") != base


def test_a_model_part_that_uses_what_only_the_interface_defines_is_not_split(tmp_path):
    source = tmp_path / "x.wrapper.cpp"
    source.write_text("#include <cpu.h>\n" + aoti_interface._interface_text() +
                      "\nint run() { CONVERT_EXCEPTION_TO_ERROR_CODE({ return 0; }) }\n")
    assert _split(f"g++ {source} -O1 -c -o {tmp_path / 'x.wrapper.o'}") is None


def test_a_command_whose_source_lacks_the_interface_is_not_split(tmp_path):
    source = tmp_path / "x.wrapper.cpp"
    source.write_text("int f() { return 1; }\n")
    assert _split(f"g++ {source} -O1 -c -o {tmp_path / 'x.wrapper.o'}") is None


def test_a_wrapper_splits_only_for_a_compiler_driver_that_joins_objects(tmp_path):
    from navdeploy.formats.aoti_interface import _interface_text

    source = tmp_path / "x.wrapper.cpp"
    source.write_text("#include <cpu.h>\n" + _interface_text() + "\nint model() { return 1; }\n")
    split = _split(f"g++ {source} -O1 -c -o {tmp_path / 'x.wrapper.o'}")
    assert split is not None and split.model.endswith("int model() { return 1; }\n")
    assert _interface_text() in split.interface and _interface_text() not in split.model
    assert _split(f"ccache {source} -O1 -c -o {tmp_path / 'x.wrapper.o'}") is None  # a launcher in front
    assert _split(f"g++ {source} -O1 -c") is None  # no object named


def test_the_drivers_that_join_objects():
    from navdeploy.formats.aoti_interface import _joins_objects

    assert all(_joins_objects(c) for c in ("g++", "/usr/bin/g++-12", "x86_64-linux-gnu-g++", "clang++", "c++"))
    assert not any(_joins_objects(c) for c in ("ccache", "cl", "/usr/bin/sccache", "icpx"))
