"""Capability probes for the Inductor runners, cached per machine (``navdeploy/workspace/machine_cache.py``).

**CPU ISA.** The first Inductor compile of a process runs ``torch._inductor.cpu_vec_isa.pick_vec_isa()``: per ISA
the CPU has (AVX2, AVX-512, ...) it compiles a test program against torch's headers (~3 s each) and loads it in a
child Python, to be sure kernels built for that ISA load with this torch. The compiled programs land in the
inductor cache, which navdeploy points into the workspace, so every new workspace paid ~7 s for them.
:func:`warm_cpu_isa` runs the same probe with the inductor cache pointed, for the probe only, at a machine cache
folder keyed by torch version, compiler and CPU flags: the programs are compiled once per machine, side by side
(9-11 s instead of 13-15 s on the 2-core machine, where Inductor compiles them one after another). The first probe
with a key loads each in a child (the check it exists for) and records the answer (``isa.json``); once it says every
ISA loaded, later processes take those loads as recorded instead of starting a child Python per ISA (1-2 s of every
worker's first build on the 2-core machine). The result is then Inductor's for the rest of the process. Workers do
not take it as ``torch._inductor.config.cpp.vec_isa_ok`` (that saved ~0.9 s of a cold optimize): that setting is
part of torch.compile's cache keys, and the user's process, where the winner is bound, leaves it unset, so every
bind of a TorchCompileCPU winner missed the cache and compiled again (21.8 s against 2.7 s in
``tests/test_compile_runners.py``).

**AOTInductor on CUDA.** :func:`aoti_cuda_problem` answers whether an AOTInductor package loads and runs on this
GPU at all: a tiny package (one Linear) is built and run in a child process, once per torch / CUDA / driver /
GPU, and the answer kept. torch 2.11's loader dies with SIGSEGV on the H200 after each module's ~85 s build; with
the probe that costs seconds once and the runner is skipped with the reason.
"""

from __future__ import annotations

import contextlib
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

from navdeploy.workspace.inductor import variable_for_block
from navdeploy.workspace.machine_cache import probe_folder, read_result, write_result

log = logging.getLogger("navdeploy")

_isa_warmed = False
_isa_lock = threading.Lock()  # a second caller (the bind, while optimize warms it beside builds) waits for the first
_aoti_problems: dict[str, Optional[str]] = {}
_aoti_lock = threading.Lock()  # one probe at a time: a second caller waits for the first one's answer
AOTI_PROBE_TIMEOUT_S = 600.0
AOTI_RESULT = "aoti.json"
ISA_RESULT = "isa.json"


def _compiler() -> str:
    try:
        from torch._inductor.cpp_builder import get_compiler_version_info, get_cpp_compiler

        return get_compiler_version_info(get_cpp_compiler())
    except Exception as exc:  # noqa: BLE001 - no compiler: the key says so, and Inductor will fail on its own
        return f"unknown ({type(exc).__name__})"


def cpu_key() -> dict[str, Any]:
    """What Inductor's CPU ISA probe depends on: torch, the C++ compiler, the CPU and its vector extensions."""
    try:
        from torch._inductor.cpu_vec_isa import x86_isa_checker

        flags = x86_isa_checker()
    except Exception:  # noqa: BLE001 - another architecture or torch: the capability string still tells CPUs apart
        flags = []
    return {"torch": torch.__version__, "machine": platform.machine(), "compiler": _compiler(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "isa_flags": flags,
            "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY")}


@contextlib.contextmanager
def _inductor_cache_at(folder: Path):
    """TORCHINDUCTOR_CACHE_DIR at ``folder`` for the block (Inductor reads it on every lookup), then as it was."""
    with variable_for_block("TORCHINDUCTOR_CACHE_DIR", str(folder)):
        yield


def warm_cpu_isa() -> None:
    """Run Inductor's CPU ISA probe in this process, its compiled test programs kept in the machine cache; once
    per process, before the first Inductor compile. Without a writable machine cache it does nothing (Inductor
    probes on its first compile, in the inductor cache, as usual)."""
    global _isa_warmed
    with _isa_lock:
        if _isa_warmed:
            return
        _isa_warmed = True
        _warm_cpu_isa()


def _warm_cpu_isa() -> None:
    try:
        from torch._inductor import cpu_vec_isa
    except ImportError:
        return
    folder = probe_folder("inductor-cpu-isa", cpu_key())
    if folder is None:
        return
    start = time.perf_counter()
    recorded = _loaded_before(folder)
    try:
        with _inductor_cache_at(folder), _loads_taken_from(cpu_vec_isa, recorded):
            _check_side_by_side(cpu_vec_isa)
            isa = cpu_vec_isa.pick_vec_isa()
            loaded = [str(i) for i in cpu_vec_isa.valid_vec_isa_list()]  # cached by the probe above
    except Exception as exc:  # noqa: BLE001 - Inductor probes again on its first compile
        log.info("Inductor's CPU ISA probe failed in the machine cache (%s: %s); it runs in the inductor cache",
                 type(exc).__name__, exc)
        return
    log.info("Inductor CPU ISA: %s (probe %.1f s%s; compiled test programs kept in %s)", isa or "none",
             time.perf_counter() - start, ", their loads as recorded" if recorded else "", folder)
    has = _cpu_isas(cpu_vec_isa)
    write_result(folder, ISA_RESULT, {"cpu_isas": has, "loaded": loaded,
                                      "all_load": bool(has) and sorted(has) == sorted(loaded)})


def _loaded_before(folder: Path) -> Optional[frozenset[str]]:
    """The ISAs whose test programs an earlier probe with this key loaded in a child, when it recorded that every
    ISA of this CPU loaded (``isa.json``); None otherwise (the probe then loads them itself)."""
    result = read_result(folder, ISA_RESULT)
    if not result or result.get("all_load") is not True or not isinstance(result.get("loaded"), list):
        return None
    return frozenset(str(name) for name in result["loaded"])


@contextlib.contextmanager
def _loads_taken_from(cpu_vec_isa: Any, loaded: Optional[frozenset[str]]):
    """For the block, Inductor's check that an ISA's test program loads (a child Python per ISA, ~0.3 s each and
    ~1-2 s in all on the 2-core machine, paid by every worker before its first build) answers from ``loaded``: the
    programs were compiled by the same compiler, for the same torch and CPU flags (the machine cache's key), and an
    earlier probe loaded each of them in a child. The compile step itself still runs (it finds the programs in the
    machine cache). Nothing changes without ``loaded``, or where Inductor's class has no such step."""
    base = getattr(cpu_vec_isa, "VecISA", None)
    original = getattr(base, "_probe_load", None) if base is not None else None
    if loaded is None or original is None:
        yield
        return

    def recorded_load(self: Any, output_path: str) -> bool:
        return str(self) in loaded and os.path.isfile(output_path)

    base._probe_load = recorded_load
    try:
        yield
    finally:
        base._probe_load = original


def _isas_of_this_cpu(cpu_vec_isa: Any) -> list[Any]:
    """The vector ISAs Inductor knows that this CPU has (x86 only; elsewhere none, so nothing is taken as read)."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return []
    try:
        flags = cpu_vec_isa.x86_isa_checker()
        return [i for i in cpu_vec_isa.supported_vec_isa_list if all(f in flags for f in str(i).split())]
    except Exception:  # noqa: BLE001 - another torch: nothing taken as read
        return []


def _cpu_isas(cpu_vec_isa: Any) -> list[str]:
    return [str(i) for i in _isas_of_this_cpu(cpu_vec_isa)]


def _check_side_by_side(cpu_vec_isa: Any) -> None:
    """Inductor's check of each ISA (``bool(isa)``: compile its test program, load it), one thread per ISA: the
    compiles are child processes, and Inductor keeps each answer, so ``pick_vec_isa`` then only reads them."""
    isas = _isas_of_this_cpu(cpu_vec_isa)
    if len(isas) > 1:
        with ThreadPoolExecutor(len(isas), "navdeploy-isa") as pool:
            list(pool.map(bool, isas))


def cuda_key() -> dict[str, Any]:
    """What AOTInductor on CUDA depends on: torch, its CUDA, the driver, the GPU, the host compiler."""
    driver = None
    with contextlib.suppress(Exception):
        driver = torch._C._cuda_getDriverVersion()  # CUDA builds only
    if driver is None:
        with contextlib.suppress(OSError):
            driver = Path("/proc/driver/nvidia/version").read_text().splitlines()[0]
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "driver": driver,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "compiler": _compiler()}


# The probe's child: a one-Linear AOTInductor package built, loaded and run; "ok" on stdout when it matches eager.
_AOTI_CHILD = """
import os, sys, tempfile, torch
device, folder = sys.argv[1], sys.argv[2]
os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(folder, "inductor_cache")
try:  # the host code's ISA probe from the machine cache, as navdeploy's workers run it
    from navdeploy.formats.inductor_probe import warm_cpu_isa
    warm_cpu_isa()
except ImportError:
    pass
torch.manual_seed(0)
module = torch.nn.Linear(8, 4).to(device).eval()
x = torch.randn(2, 8, device=device)
with torch.no_grad():
    program = torch.export.export(module, (x,))
    path = torch._inductor.aoti_compile_and_package(program, package_path=os.path.join(folder, "probe.pt2"))
    # The loader extracts into $TMPDIR and cleans up only at a normal exit; a crash leaves it in the folder
    # the parent removes. Python's temp dir (torch's caches) is pinned first.
    tempfile.gettempdir()
    os.environ["TMPDIR"] = folder
    runner = torch._inductor.aoti_load_package(path)
    torch.testing.assert_close(runner(x), module(x), atol=1e-3, rtol=1e-3)
print("navdeploy-probe-ok")
"""


def run_probe_child(code: str, args: list[str], timeout_s: float) -> tuple[Optional[str], bool]:
    """Run ``code`` in a child Python (with ``args``); ``(None, True)`` when it printed ``navdeploy-probe-ok``, else
    ``(why not, definitive)``: a crash or an error is definitive (it recurs), a timeout is not."""
    try:
        done = subprocess.run([sys.executable, "-X", "faulthandler", "-c", code, *args], capture_output=True,
                              text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return f"the probe did not finish within {timeout_s:g} s", False
    except OSError as exc:
        return f"the probe could not start ({exc})", False
    if done.returncode == 0 and "navdeploy-probe-ok" in done.stdout:
        return None, True
    if done.returncode < 0:
        frames = [line.strip() for line in done.stderr.splitlines() if line.strip().startswith("File ")]
        where = f" in {frames[0]}" if frames else ""
        return f"the probe died with {signal.Signals(-done.returncode).name}{where}", True
    lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
    return f"the probe failed: {lines[-1][:300] if lines else f'exit code {done.returncode}'}", True


def aoti_problem(device: str) -> Optional[str]:
    """None when a tiny AOTInductor package builds, loads and runs correctly on ``device`` here, else why not.
    Probed once per machine key (in a child process: a crash costs the child) and kept in the machine cache;
    remembered per process too."""
    if device in _aoti_problems:
        return _aoti_problems[device]
    with _aoti_lock:
        if device not in _aoti_problems:
            _aoti_problems[device] = _probe_aoti(device)
    return _aoti_problems[device]


def _probe_aoti(device: str) -> Optional[str]:
    key = cuda_key() if device == "cuda" else cpu_key()
    folder = probe_folder(f"aoti-{device}", key)
    cached = read_result(folder, AOTI_RESULT)
    if cached is not None and "problem" in cached:
        problem = cached["problem"]
    else:
        start = time.perf_counter()
        work = Path(tempfile.mkdtemp(prefix="navdeploy-aoti-probe-"))
        try:
            why, definitive = run_probe_child(_AOTI_CHILD, [device, str(work)], AOTI_PROBE_TIMEOUT_S)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        problem = None if why is None else \
            f"a one-Linear AOTInductor package does not work here: {why} (machine probe, {folder or 'not cached'})"
        log.info("AOTInductor probe on %s: %s (%.1f s)", device, problem or "works", time.perf_counter() - start)
        if definitive:
            write_result(folder, AOTI_RESULT, {"problem": problem, "seconds": time.perf_counter() - start,
                                               "probed": time.strftime("%Y-%m-%dT%H:%M:%S")})
    return problem


def aoti_cuda_problem() -> Optional[str]:
    """``RunnerSpec.is_available`` of AOTInductorCUDA: None when AOTInductor packages work on this GPU."""
    return aoti_problem("cuda")
