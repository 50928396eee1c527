"""AOTInductor's CPU wrapper compiled beside its kernels (``formats/aoti_compile.py``), with torch's real builds."""

from __future__ import annotations

import subprocess
import threading
import time

import pytest
import torch

from navdeploy.formats.aoti_compile import wrapper_beside_kernels
from navdeploy.formats.inductor_probe import warm_cpu_isa

cpp_builder = pytest.importorskip("torch._inductor.cpp_builder")


@pytest.fixture
def build(tmp_path, monkeypatch) -> tuple[torch.export.ExportedProgram, list[tuple[str, float, float]]]:
    """A small ExportedProgram to build in a fresh inductor cache (the ISA probe warm), and what every compiler
    command torch runs then builds (wrapper.o, kernel.o, .so or its target), with its start and end."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))
    warm_cpu_isa()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
    with torch.no_grad():
        program = torch.export.export(model, (torch.randn(2, 8),))
    seen: list[tuple[str, float, float]] = []
    run = subprocess.run

    def timed(cmd, *args, **kwargs):
        start = time.monotonic()
        try:
            return run(cmd, *args, **kwargs)
        finally:
            words = cmd.split() if isinstance(cmd, str) else [str(a) for a in cmd]
            target = words[words.index("-o") + 1] if "-o" in words else ""
            what = next((w for w in ("wrapper.o", "kernel.o", ".so") if target.endswith(w)), target)
            seen.append((what, start, time.monotonic()))

    monkeypatch.setattr(subprocess, "run", timed)
    return program, seen


def test_the_wrapper_compiles_beside_the_kernels_and_the_package_runs(build, tmp_path):
    program, seen = build
    original = cpp_builder.CppBuilder.build
    told: list[tuple[float, int]] = []  # when the block said only compilers run from now on, and how many had run
    with wrapper_beside_kernels(lambda: told.append((time.monotonic(), len(seen)))):
        assert cpp_builder.CppBuilder.build is not original
        path = torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"))
    assert cpp_builder.CppBuilder.build is original  # torch's own again once the block ends
    assert len(told) == 1 and told[0][1] == 0 and told[0][0] <= min(start for _, start, _ in seen), (told, seen)
    spans = {what: (start, end) for what, start, end in seen}
    wrapper, kernel, link = spans["wrapper.o"], spans["kernel.o"], spans[".so"]
    assert kernel[0] < wrapper[1], seen  # the kernels started before the wrapper's compile ended
    assert link[0] >= max(wrapper[1], kernel[1]), seen  # and the link waited for both
    x = torch.randn(2, 8)
    out = torch._inductor.aoti_load_package(path)(x)
    torch.testing.assert_close(out[0] if isinstance(out, (list, tuple)) else out, program.module()(x))


def test_a_wrapper_that_fails_to_compile_fails_the_build(build, tmp_path):
    program, seen = build
    original = cpp_builder.CppBuilder.build
    with pytest.raises(Exception, match=r"(?s)CppCompileError.*wrapper\.cpp"):  # torch wraps it in InductorError
        with wrapper_beside_kernels():
            torch._inductor.aoti_compile_and_package(  # an -O level g++ rejects: only the wrapper's compile fails
                program, package_path=str(tmp_path / "m.pt2"),
                inductor_configs={"aot_inductor.compile_wrapper_opt_level": "Onot-a-level"})
    assert cpp_builder.CppBuilder.build is original
    assert "kernel.o" in {what for what, _, _ in seen} and ".so" not in {what for what, _, _ in seen}, seen


def test_other_threads_build_as_torch_does_while_a_block_runs(build, tmp_path):
    program, seen = build
    inside, outside = threading.Event(), threading.Event()

    told: list[str] = []

    def hold_a_block() -> None:
        with wrapper_beside_kernels(lambda: told.append("compiling")):
            inside.set()
            outside.wait(timeout=300)

    holder = threading.Thread(target=hold_a_block)
    holder.start()
    try:
        inside.wait(timeout=60)
        torch._inductor.aoti_compile_and_package(program, package_path=str(tmp_path / "m.pt2"))
    finally:
        outside.set()
        holder.join()
    spans = {what: (start, end) for what, start, end in seen}
    assert spans["kernel.o"][0] >= spans["wrapper.o"][1], seen  # one after the other, as torch runs them
    assert told == []  # the block's news is about its own thread's compiles
