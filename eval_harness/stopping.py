"""Stopping a long evaluation command when told: SIGINT (Ctrl-C) or SIGTERM (``kill``, ``timeout``, a supervisor).

:func:`stop_on_signals` installs handlers for the length of a command. The first signal sets :data:`STOP`: the
sandbox's wait wakes at once (it selects on :meth:`Stop.fileno`), kills its program's whole tree and raises
:class:`Stopped`; the executor starts nothing new; generation stops between decoding steps. What finished is kept, and
the command says how to resume. A second signal while stopping restores the default handler and re-raises it, so a
user who insists gets an immediate exit.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from types import FrameType


class Stopped(Exception):
    """A stop was requested (by a signal, or by :meth:`Stop.request`); what finished before it is kept."""


class Stop:
    """A flag that threads poll and a descriptor that ``select`` can wait on, set once per command."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._read, self._write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.reason = ""

    def request(self, reason: str = "requested") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()
            with contextlib.suppress(BlockingIOError, OSError):
                os.write(self._write, b"x")  # async-signal-safe: wakes every select on fileno()

    def is_set(self) -> bool:
        return self._event.is_set()

    def wait(self, seconds: float) -> bool:
        """Sleep up to ``seconds``, woken by a stop; True when stopped."""
        return self._event.wait(seconds)

    def check(self) -> None:
        """Raise :class:`Stopped` when a stop was requested."""
        if self._event.is_set():
            raise Stopped(self.reason)

    def fileno(self) -> int:
        """Readable once a stop was requested (never drained while it stands)."""
        return self._read

    def exit_code(self) -> int:
        """What a command stopped by this signal exits with: 128 + its number (130 for SIGINT, 143 for SIGTERM)."""
        try:
            return 128 + int(signal.Signals[self.reason])
        except KeyError:
            return 1

    def clear(self) -> None:
        """Back to running (a new command in the same process, or a test)."""
        self._event.clear()
        self.reason = ""
        with contextlib.suppress(BlockingIOError, OSError):
            while os.read(self._read, 4096):
                pass


STOP = Stop()
SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stop_on_signals(stop: Stop = STOP) -> Iterator[Stop]:
    """SIGINT and SIGTERM request ``stop`` while the block runs (main thread only; elsewhere a no-op); a second
    signal exits at once with the signal's default action."""
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    stop.clear()

    def handler(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():  # asked twice: stop now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        stop.request(signal.Signals(signum).name)

    previous = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield stop
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
