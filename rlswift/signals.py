"""Graceful stop: the first SIGTERM/SIGINT/SIGUSR1 asks the run to checkpoint and exit; a second one aborts.

Usage::

    with GracefulStop() as stop:
        for step in ...:
            train_step()
            if stop.requested:
                save_checkpoint(); break

The handler only sets a flag: the loop reaches the end of its step, checkpoints at that step boundary (so the
checkpoint holds the same state an uninterrupted run would have there) and exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import warnings
from types import FrameType
from typing import Any, Iterable

DEFAULT_SIGNALS: tuple[signal.Signals, ...] = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


def _name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


class GracefulStop:
    """Context manager that turns stop signals into a flag (``requested``, ``signum``) checked between steps.

    A second signal restores the default action for it and re-sends it, so the process dies at once. On exit the
    previous handlers are restored. Outside the main thread Python cannot install handlers: then it is a no-op
    (with a warning) and ``requested`` only changes through ``request()``.
    """

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS, stream: Any = None):
        self.signals = tuple(signal.Signals(s) for s in signals)
        self.requested = False
        self.signum: int | None = None
        self._stream = stream  # None -> sys.stderr at signal time (tests may redirect it)
        self._previous: dict[int, Any] = {}
        self.installed = False

    def request(self, signum: int | None = None) -> None:
        """Ask for a graceful stop without a signal (e.g. from a time limit)."""
        self.requested = True
        if signum is not None:
            self.signum = signum

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.requested:
            # Second signal: give up on the graceful path and die as the signal's default action says.
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.requested = True
        self.signum = signum
        stream = self._stream if self._stream is not None else sys.stderr
        try:
            print(
                f"rlswift: got {_name(signum)}, will save a checkpoint at the end of this step and exit; "
                f"send again to abort",
                file=stream,
                flush=True,
            )
        except Exception:  # a closed stderr must not turn a stop request into a crash
            pass

    def __enter__(self) -> "GracefulStop":
        if threading.current_thread() is not threading.main_thread():
            warnings.warn("GracefulStop only works in the main thread; signals are left as they are here")
            return self
        for s in self.signals:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        self.installed = True
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.installed:
            return
        for s, prev in self._previous.items():
            # getsignal returns None for handlers not set from Python; SIG_DFL is the closest we can restore.
            signal.signal(s, prev if prev is not None else signal.SIG_DFL)
        self._previous.clear()
        self.installed = False
