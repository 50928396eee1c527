"""AOTInductor's CPU wrapper compiled in two parts, the runtime's C interface taken from the machine cache.

A CPU package's wrapper source is torch's ``aoti_runtime/interface.cpp`` (the package's C entry points, which
instantiate the model container's templates), spliced in whole, followed by the model's own code. The interface is
the same text for every model, yet g++ spent ~2.3 of the wrapper's ~4.5 s on it (the example CNN on the 2-core
machine). :func:`compile_wrapper` compiles the two apart: the interface once per machine and compile command (kept
in the machine cache, keyed by its text, the command, torch and the compiler), the model's code on its own, then
joins the two objects into the one object torch links (``g++ -r``). Where anything is not as expected (the
interface's text not found once in the source, no ``-o``, a compile or the join failing), the wrapper compiles in
one piece, as torch compiles it.

The interface's object also holds the model class's base, ``AOTInductorModelBase<AOTInductorModel>``, instantiated
once (``template class``), and the model's part declares it instantiated elsewhere (``extern template class``), so
g++ does not instantiate and optimize the base's members, ``std::regex`` among them, for every model: the example
CNN's part took 2.9 -> 1.8 s of g++. Every model's class is the same declaration in torch's ``model.h``, so the
instantiation is the same for every model; where ``model.h`` does not declare it as expected, or an interface with
it fails to compile on this machine (remembered in the machine cache), the split goes without it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import re
import shlex
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch

log = logging.getLogger("navdeploy")

_PROBE = "aoti-interface"  # the machine cache folder's name
_split_failed = False  # a split compile failed in this process: the later ones compile whole
_base_failed = False  # an interface instantiating the model class's base failed here: the later ones go without
_BASE = "torch::aot_inductor::AOTInductorModelBase<torch::aot_inductor::AOTInductorModel>"
_FAILED = ".failed"  # beside a key's object: an interface that did not compile on this machine
_PARTIAL = ".o.partial"  # an object being written; one this old was left by a process killed while compiling
_PARTIAL_STALE_S = 3600.0


@dataclass(frozen=True)
class _Split:
    """One wrapper compile, split: the command's words, where its source and object are in them, and the two parts
    of its source."""
    words: list[str]
    source_at: int
    output_at: int
    interface: str  # the source up to the interface's end: what the machine cache keeps the object of
    model: str  # the source with the interface's definitions left out (its #include lines stay)
    instantiates: bool  # the interface instantiates the model class's base, and the model's part does not


def _interface_path() -> Path:
    return Path(torch._inductor.__file__).parent / "codegen" / "aoti_runtime" / "interface.cpp"


@functools.lru_cache(maxsize=1)
def _interface() -> tuple[str, int]:
    """torch's interface source as the wrapper splices it in (stripped; empty where this torch has none), and the
    line of interface.cpp where that text starts."""
    try:
        raw = _interface_path().read_text()
    except OSError:
        return "", 1
    return raw.strip(), raw[:len(raw) - len(raw.lstrip())].count("\n") + 1


def _interface_text() -> str:
    return _interface()[0]


@functools.lru_cache(maxsize=1)
def _interface_names() -> "re.Pattern[str]":
    """What the interface defines for itself alone (its macros, types and static variables): a model part that
    names one of them (torch's minimal-arrayref interface uses its error macro) cannot compile apart from it."""
    text = _interface_text()
    names = set(re.findall(r"#define\s+(\w+)", text)) | set(re.findall(r"\b(?:struct|class)\s+(\w+)", text))
    names |= set(re.findall(r"^static\s+(?:thread_local\s+)?[\w:<>]+\s+(\w+)\s*[;={]", text, re.MULTILINE))
    return re.compile(r"\b(?:" + "|".join(sorted(map(re.escape, names))) + r")\b") if names else re.compile(r"$^")


@functools.lru_cache(maxsize=1)
def _base_declared() -> bool:
    """Whether torch's ``model.h`` declares the model class as the one instantiation of its base that every
    model's code defines the members of (torch 2.x's runtime)."""
    header = Path(torch.__file__).parent / "include" / "torch" / "csrc" / "inductor" / "aoti_runtime" / "model.h"
    try:
        text = header.read_text()
    except OSError:
        return False
    return bool(re.search(r"namespace\s+torch::aot_inductor\s*\{", text)) and bool(
        re.search(r"class\s+AOTInductorModel\s*:\s*public\s+AOTInductorModelBase<AOTInductorModel>\s*\{", text))


def _split(command: str, instantiate: bool = True) -> Optional[_Split]:
    """``command`` (a wrapper compile) split in two, or None where it cannot be (then it compiles in one piece).
    ``instantiate``: the interface instantiates the model class's base where torch declares it as expected."""
    interface = _interface_text()
    words = shlex.split(command)
    sources = [i for i, w in enumerate(words) if w.endswith(".wrapper.cpp")]
    if not interface or len(sources) != 1 or "-o" not in words[:-1] or not _joins_objects(words[0]):
        return None
    try:
        text = Path(words[sources[0]]).read_text()
    except OSError:
        return None
    start = text.find(interface)
    if start < 0 or text.find(interface, start + 1) >= 0:
        return None
    end = start + len(interface)
    if _interface_names().search(text, end):
        return None
    includes = "\n".join(line for line in interface.splitlines() if line.startswith("#include"))
    instantiates = instantiate and _base_declared()
    # #line keeps __FILE__ and __LINE__ (in the runtime's error messages) those of the source torch keeps: torch's
    # interface.cpp for the first part, the wrapper for the second.
    interface_part = (f'{text[:start]}\n#line {_interface()[1]} "{_interface_path()}"\n'
                      f"{interface}\n" + (f"template class {_BASE};\n" if instantiates else ""))
    model_part = (f"{text[:start]}{includes}\n" + (f"extern template class {_BASE};\n" if instantiates else "")
                  + f'#line {text.count(chr(10), 0, end) + 1} "{words[sources[0]]}"\n{text[end:]}')
    return _Split(words, sources[0], words.index("-o") + 1, interface_part, model_part, instantiates)


def _joins_objects(compiler: str) -> bool:
    """Whether ``compiler`` is a GCC or Clang driver, which joins objects with ``-r`` (a launcher such as ccache
    in front, or another compiler, compiles the wrapper whole)."""
    name = os.path.basename(compiler)
    return any(name == driver or name.startswith(driver + "-") or name.endswith("-" + driver)
               for driver in ("g++", "c++", "clang++", "gcc", "cc", "clang"))


@functools.lru_cache(maxsize=1)
def _cpu_identity() -> str:
    """The CPU's model and every flag it reports: the command's -march=native compiles for exactly this CPU, and
    a machine cache shared between hosts (a home folder on NFS) must not hand one CPU's object to another."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(next((line for line in lines if line.startswith(field)), "") for field in ("model name", "flags"))


def _key(split: _Split) -> str:
    """What the interface's object depends on: its text, the compile command (its own paths left out; the
    precompiled header's path, which names the headers' hash, stays in), torch's build and the CPU."""
    words = list(split.words)
    words[split.source_at] = words[split.output_at] = ""
    digest = hashlib.sha256()
    for part in (split.interface, shlex.join(words), torch.__version__, str(torch.version.git_version),
                 _cpu_identity()):
        digest.update(part.encode())
        digest.update(b"\0")
    return digest.hexdigest()[:32]


def _cache_folder() -> Optional[Path]:
    """The machine cache folder of compiled interfaces (None where it cannot be written)."""
    from navdeploy.formats.inductor_probe import cpu_key
    from navdeploy.workspace.machine_cache import probe_folder

    return probe_folder(_PROBE, {**cpu_key(), "torch_git": str(torch.version.git_version)})


class _CompileFailed(RuntimeError):
    """A compiler command that exited with an error; ``returncode`` as ``subprocess`` gives it (negative: killed)."""

    def __init__(self, message: str, returncode: int) -> None:
        super().__init__(message)
        self.returncode = returncode


class _BaseNotCompiled(RuntimeError):
    """The interface with the model class's base instantiated did not compile on this machine."""


def _run(words: list[str], cwd: str) -> None:
    """One compiler command; its output in the error where it fails."""
    done = subprocess.run(words, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise _CompileFailed(f"{shlex.join(words[:1])} exited with {done.returncode}: "
                             f"{done.stdout.decode(errors='replace')[-2000:]}", done.returncode)


def _with(split: _Split, source: str, output: str) -> list[str]:
    words = list(split.words)
    words[split.source_at], words[split.output_at] = source, output
    return words


def _interface_object(split: _Split, scratch: Path) -> Path:
    """The interface's object: from the machine cache, else compiled (into it where it can be written; written
    whole or not at all, so a compile killed halfway leaves nothing another build would take)."""
    folder = _cache_folder()
    cached = _entry(folder, split, ".o") if folder is not None else None
    if cached is not None and cached.is_file():
        return cached
    try:
        return _compile_interface(split, scratch, folder, cached)
    except _CompileFailed as exc:
        if not split.instantiates or exc.returncode < 0:  # killed (out of memory, a signal): not the source's fault
            raise
        if folder is not None:  # later builds on this machine split without the base's instantiation
            with contextlib.suppress(OSError):
                _entry(folder, split, _FAILED).touch()
        raise _BaseNotCompiled(str(exc)) from exc


def _entry(folder: Path, split: _Split, suffix: str) -> Path:
    """The machine cache's file for ``split``'s interface: its object (``.o``), or the mark that it failed to
    compile here (``_FAILED``)."""
    return folder / f"{_key(split)}{suffix}"


def _base_failed_here(split: _Split) -> bool:
    """Whether an interface that instantiates the model class's base failed to compile on this machine before."""
    folder = _cache_folder()
    return folder is not None and _entry(folder, split, _FAILED).is_file()


def _sweep_partials(folder: Path) -> None:
    """Remove the partial objects in ``folder`` (this module's own) that a compile killed halfway left: none is
    ever read, and one younger than ``_PARTIAL_STALE_S`` may be another process's compile in flight."""
    now = time.time()
    for partial in folder.glob(f"*{_PARTIAL}"):
        with contextlib.suppress(OSError):
            if now - partial.stat().st_mtime > _PARTIAL_STALE_S:
                partial.unlink()


def _compile_interface(split: _Split, scratch: Path, folder: Optional[Path], cached: Optional[Path]) -> Path:
    """The interface compiled into ``cached`` (the machine cache), or into ``scratch`` where it is None or cannot
    be written now."""
    source = scratch / "interface.cpp"
    source.write_text(split.interface)
    if folder is not None:
        _sweep_partials(folder)
    try:
        fd, partial = tempfile.mkstemp(suffix=_PARTIAL, dir=str(folder if cached is not None else scratch))
    except OSError:  # a cache that cannot be written now: compiled for this build only
        cached = None
        fd, partial = tempfile.mkstemp(suffix=_PARTIAL, dir=str(scratch))
    os.close(fd)
    try:
        _run(_with(split, str(source), partial), str(scratch))
        if cached is None:
            return Path(partial)
        os.chmod(partial, 0o644)  # as the compiler's own output would be (mkstemp makes it the owner's alone)
        os.replace(partial, cached)
        return cached
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def _compile_split(split: _Split) -> None:
    """The model's code compiled here, the interface's object (from the cache, or compiled in a thread meanwhile),
    then both joined into the object torch's command writes."""
    output = Path(split.words[split.output_at])
    with tempfile.TemporaryDirectory(prefix=".navdeploy-wrapper-", dir=str(output.parent)) as scratch_dir:
        scratch = Path(scratch_dir)
        interface: dict[str, Any] = {}

        def compile_interface() -> None:
            try:
                interface["object"] = _interface_object(split, scratch)
            except BaseException as exc:  # noqa: BLE001 - raised below, where the join needs the object
                interface["error"] = exc

        thread = threading.Thread(target=compile_interface, name="navdeploy-aoti-interface", daemon=True)
        thread.start()
        model_source, model_object = scratch / "model.cpp", scratch / "model.o"
        model_error: Optional[Exception] = None
        try:
            model_source.write_text(split.model)
            _run(_with(split, str(model_source), str(model_object)), scratch_dir)
        except Exception as exc:  # noqa: BLE001 - raised below, after the interface's own error if that is the base's
            model_error = exc
        finally:
            thread.join()
        if isinstance(interface.get("error"), _BaseNotCompiled):  # the cause, whatever the model's part did
            raise interface["error"]
        if model_error is not None:
            raise model_error
        if "error" in interface:
            raise interface["error"]
        try:
            _run([split.words[0], "-r", "-nostdlib", "-o", str(output), str(interface["object"]), str(model_object)],
                 scratch_dir)
        except RuntimeError:
            # A cached object the join rejects (a damaged disk) is dropped, so the next build compiles it again.
            if interface["object"].parent != scratch:
                with contextlib.suppress(OSError):
                    interface["object"].unlink()
            raise


def compile_wrapper(builder: Any, original: Callable[[Any], None]) -> None:
    """Compile the wrapper object ``builder`` stands for in two parts (see the module's docstring); where it
    cannot be split, or the split compile fails, ``original(builder)`` compiles it as torch does."""
    global _split_failed, _base_failed
    try:
        command = builder.get_command_line()
        split = None if _split_failed else _split(command, instantiate=not _base_failed)
        if split is not None and split.instantiates and _base_failed_here(split):
            split = _split(command, instantiate=False)
    except Exception:  # noqa: BLE001 - an unknown builder compiles as torch does
        split = None
    if split is None:
        return original(builder)
    try:
        _compile_split(split)
    except _BaseNotCompiled as exc:
        _base_failed = True
        log.info("AOTInductor's wrapper compiles whole this once, and later ones split without instantiating the "
                 "model class's base (that interface did not compile: %s)", str(exc)[:500])
        original(builder)
    except Exception as exc:  # noqa: BLE001 - torch's own compile says what is wrong, if anything is
        # Once is enough: where it failed (a driver that cannot join objects, a full disk), it would fail again and
        # cost every later build of this process its compiles twice.
        _split_failed = True
        log.info("AOTInductor's wrapper compiles in one piece from now on in this process (the split compile "
                 "failed: %s: %s)", type(exc).__name__, str(exc)[:500])
        original(builder)
