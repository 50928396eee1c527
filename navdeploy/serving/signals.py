"""SIGINT/SIGTERM while serving: a blocking server stops on them, a background one too, and the previous
handlers come back when it stops."""

from __future__ import annotations

import logging
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # annotations only: the runtime import goes the other way
    from navdeploy.serving.handle import ServerHandle




log = logging.getLogger("navdeploy")


SIGNALS = (signal.SIGINT, signal.SIGTERM)


def in_main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def wait_for_stop(handle: ServerHandle, ready: Optional[str] = None) -> None:
    """Serve until SIGINT/SIGTERM (handled here, then the previous handlers are back) or the server dies.
    ``ready`` is printed once the handlers are in place: a supervisor that signals as soon as it reads it
    must not kill the process with the default handler."""
    # A flag, not a threading.Event: the handler runs in the main thread between bytecodes, possibly inside
    # Event.wait holding the Event's lock, and Event.set would then wait for that lock for ever (with an Event, a
    # SIGTERM hangs a blocking server about 1 time in 5).
    stop: list[int] = []
    previous = {}
    if in_main_thread():
        for sig in SIGNALS:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, lambda signum, frame: stop.append(signum))
    if ready:
        print(ready, flush=True)
    try:
        while not stop and handle.running:
            time.sleep(0.2)
    except KeyboardInterrupt:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        handle.stop()


class TermHandler:
    """SIGTERM in the background: stop the server (until it is stopped), then do what the previous handler did."""

    def __init__(self, handle: ServerHandle, previous: Any):
        self.handle: Optional[ServerHandle] = handle
        self.previous = previous

    def __call__(self, signum: int, frame: Any) -> None:
        handle = self.handle
        if handle is not None:
            handle.stop()
        if callable(self.previous):
            self.previous(signum, frame)
        elif self.previous != signal.SIG_IGN:
            raise SystemExit(128 + signum)


def install_background_handlers(handle: ServerHandle, previous: dict) -> None:
    """In the background: SIGINT behaves as before (KeyboardInterrupt; PyTriton's atexit stops the server);
    SIGTERM stops the server, then does what the previous handler did. ``handle.stop()`` puts the previous
    SIGTERM handler back."""
    signal.signal(signal.SIGINT, previous.get(signal.SIGINT) or signal.default_int_handler)
    handle._on_term = TermHandler(handle, previous.get(signal.SIGTERM))
    signal.signal(signal.SIGTERM, handle._on_term)
