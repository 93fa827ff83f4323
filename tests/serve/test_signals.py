"""serve.signals: what a SIGTERM starts runs on a thread of its own, never inside the handler.

The handler runs on the main thread wherever it was interrupted, possibly holding the lock of
the Event it is waiting on; a handler that set that Event (or took any lock) could wait on its
own thread forever. These tests send real signals to this process (pytest runs tests on the main
thread) and put the handlers back afterwards.
"""
from __future__ import annotations

import os
import signal
import threading

import pytest

from serve.signals import Signals


@pytest.fixture
def signals():
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield Signals().install()
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_signals_are_counted_and_waited_for(signals):
    assert not signals.wait(1, timeout=0.05)
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.wait(1, timeout=30)  # generous: only a lost signal fails it
    os.kill(os.getpid(), signal.SIGINT)
    assert signals.wait(2, timeout=30) and signals.count == 2


def test_the_action_of_a_second_signal_runs_off_the_main_thread(signals):
    ran = threading.Event()
    where = []

    def action() -> None:
        where.append(threading.current_thread())
        ran.set()

    signals.on(2, action)
    os.kill(os.getpid(), signal.SIGTERM)
    assert signals.wait(1, timeout=30)
    assert not ran.wait(0.2)  # one signal is not two
    os.kill(os.getpid(), signal.SIGTERM)
    assert ran.wait(30)
    assert where and where[0] is not threading.main_thread()
