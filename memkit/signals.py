"""SIGTERM and SIGHUP (what ``timeout``, job schedulers, ``kill`` and a closed terminal send) stop a command the way
Ctrl-C does: an exception unwinds the work, so every output that was not finished is deleted on the way out."""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

SIGNALS = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None)) if s is not None)


class Terminated(BaseException):
    """The process was asked to stop by ``signum``. A BaseException, as KeyboardInterrupt is: ``except Exception``
    in the work does not swallow it, while ``finally`` and cleanup that re-raises still run."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """The shell's code for a process ended by the signal: 128 + its number (143 for SIGTERM, 129 for SIGHUP)."""
        return 128 + self.signum


def _raise(signum, frame):
    for s in SIGNALS:  # a second signal while the first one's cleanup runs must not cut that cleanup short
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


@contextmanager
def stop_on_signals() -> Iterator[None]:
    """Within the block (in the main thread), SIGTERM and SIGHUP raise :class:`Terminated`; the previous handlers
    come back after it. Elsewhere (another thread) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise) for s in SIGNALS}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


__all__ = ["Terminated", "stop_on_signals", "SIGNALS"]
