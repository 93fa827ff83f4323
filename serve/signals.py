"""SIGTERM and SIGINT for the processes that serve: counted by the handler, acted on elsewhere.

Python runs a signal handler on the main thread between two bytecodes, wherever that thread is,
including just after an ``Event.wait`` slice took back the Event's own lock: a handler that sets
that Event then waits for a lock its own thread holds, and the process hangs. So the handler here
only adds one to a count, and the main thread (or a watcher thread) polls the count and does the
work with no lock held.
"""
from __future__ import annotations

import signal
import threading
import time
from typing import Callable

POLL_S = 0.05  # how soon a signal is acted on


class Signals:
    """SIGTERM and SIGINT received since :meth:`install`."""

    def __init__(self) -> None:
        self.count = 0

    def install(self) -> Signals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, frame: object) -> None:
        self.count += 1  # nothing more: see the module docstring

    def wait(self, count: int = 1, timeout: float | None = None) -> bool:
        """True once ``count`` signals arrived; False when ``timeout`` seconds passed first."""
        end = None if timeout is None else time.monotonic() + timeout
        while self.count < count:
            left = POLL_S if end is None else min(POLL_S, end - time.monotonic())
            if left <= 0:
                return False
            time.sleep(left)
        return True

    def on(self, count: int, action: Callable[[], None], name: str = "signal-watch") -> None:
        """Run ``action`` on a thread of its own once ``count`` signals arrived (a daemon: it never
        holds the process up)."""
        threading.Thread(target=lambda: self.wait(count) and action(), name=name, daemon=True).start()
