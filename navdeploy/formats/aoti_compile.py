"""AOTInductor's C++ steps on CPU: the wrapper compiled beside the kernels.

torch compiles a CPU package's sources one after the other: the wrapper (AOTInductor's runtime and the code that
calls the kernels, ~3.6 s of g++ at -Og on the example CNN), then the kernels (~0.7 s at -O3), then it links them.
The two compiles do not depend on each other; :func:`wrapper_beside_kernels` starts the wrapper's in a thread and
lets the next compile of this thread (the kernels') run meanwhile, which then waits for the wrapper before it
returns, so the link finds both objects. Where no core is free the two compiles share one, as they would one
after the other. The wrapper itself compiles in two parts where it can, its model-independent interface taken from
the machine cache (:mod:`navdeploy.formats.aoti_interface`).

It wraps torch's private ``torch._inductor.cpp_builder.CppBuilder.build`` while the block runs, for the calling
thread only (another thread's builds, the user's own compiles included, are untouched). A torch without it builds
as torch does.
"""

from __future__ import annotations

import contextlib
import threading
from concurrent.futures import Future
from typing import Any, Callable, Iterator, Optional

from navdeploy.formats.aoti_interface import compile_wrapper as compile_wrapper_in_parts

_WRAPPER_OBJECT = "wrapper.o"  # the wrapper's object file; its sources are <key>.wrapper.cpp
_patch_lock = threading.Lock()
_owners: dict[int, list[Future]] = {}  # per thread in a block: the wrapper compiles it started and not yet joined
_compiling: dict[int, Callable[[], None]] = {}  # per thread in a block: told once, at its first compile
_original: Optional[Callable[[Any], None]] = None


def _builder_class() -> Optional[type]:
    try:
        from torch._inductor.cpp_builder import CppBuilder
    except ImportError:
        return None
    return CppBuilder if callable(getattr(CppBuilder, "build", None)) and \
        callable(getattr(CppBuilder, "get_target_file_path", None)) else None


def _target(builder: Any) -> str:
    try:
        return str(builder.get_target_file_path())
    except Exception:  # noqa: BLE001 - an unknown builder builds as torch does
        return ""


def _build(builder: Any) -> None:
    assert _original is not None  # set before this function is ever installed
    pending = _owners.get(threading.get_ident())
    if pending is None:  # not a thread in a block
        return _original(builder)
    told = _compiling.pop(threading.get_ident(), None)
    if told is not None:
        with contextlib.suppress(Exception):  # news for another process: never this build's failure
            told()
    if _target(builder).endswith(_WRAPPER_OBJECT):
        future: Future = Future()

        def compile_wrapper() -> None:
            try:
                compile_wrapper_in_parts(builder, _original)
            except BaseException as exc:  # noqa: BLE001 - raised where it is joined
                future.set_exception(exc)
            else:
                future.set_result(None)

        threading.Thread(target=compile_wrapper, name="navdeploy-aoti-wrapper", daemon=True).start()
        pending.append(future)
        return None
    try:
        _original(builder)
    except BaseException:
        _join(pending, raise_failure=False)  # this compile's own error is the one to report
        raise
    _join(pending)


def _join(pending: list[Future], raise_failure: bool = True) -> None:
    """Wait for the wrapper compiles in ``pending``; the first failure is raised once all have ended."""
    failure: Optional[BaseException] = None
    while pending:
        exc = pending.pop(0).exception()
        failure = failure or exc
    if failure is not None and raise_failure:
        raise failure


@contextlib.contextmanager
def wrapper_beside_kernels(compiling: Callable[[], None] = lambda: None) -> Iterator[None]:
    """Within the block, this thread's AOTInductor builds compile their wrapper beside their kernels.
    ``compiling`` is called at the block's first compile: from there on only compiler processes run."""
    global _original
    cls = _builder_class()
    if cls is None:
        yield
        return
    me = threading.get_ident()
    if me in _owners:  # nested in a block of this thread: that block joins
        yield
        return
    with _patch_lock:
        if not _owners:
            _original = cls.build
            cls.build = _build
        _owners[me] = []
        _compiling[me] = compiling
    try:
        yield
        _join(_owners[me])  # a wrapper no later compile of the block waited for
    finally:
        _join(_owners[me], raise_failure=False)  # the block's own error, if any, is the one to report
        with _patch_lock:
            del _owners[me]
            _compiling.pop(me, None)
            if not _owners:  # _original stays set: a call that took the wrapper just before still reaches torch's
                cls.build = _original
