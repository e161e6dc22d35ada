"""SigquitWatcher in this process: the signal reaches on_quit through the wakeup pipe,
whichever thread the kernel delivers it to, and stop() ends the watcher."""

from __future__ import annotations

import os
import signal
import threading

import pytest

from lksmfs.daemon.sigquit import SigquitWatcher


@pytest.fixture
def restore_sigquit() -> object:
    old = signal.getsignal(signal.SIGQUIT)
    if old == signal.SIG_IGN:
        # a background job of a non-interactive shell (CI, nohup) inherits SIGQUIT
        # ignored: the test starts from the default disposition a terminal gives
        signal.signal(signal.SIGQUIT, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGQUIT, old)


@pytest.mark.usefixtures("restore_sigquit")
def test_sigquit_calls_on_quit_once_per_signal() -> None:
    quits = threading.Semaphore(0)
    w = SigquitWatcher(quits.release)
    assert w.start() is True
    try:
        os.kill(os.getpid(), signal.SIGQUIT)
        assert quits.acquire(timeout=10)
        os.kill(os.getpid(), signal.SIGQUIT)  # and again: the watcher keeps watching
        assert quits.acquire(timeout=10)
    finally:
        w.stop()
    assert not any(t.name == "sigquit" for t in threading.enumerate())
    os.kill(os.getpid(), signal.SIGQUIT)  # after stop: the do-nothing handler, no core dump
    assert not quits.acquire(timeout=0.2)


@pytest.mark.usefixtures("restore_sigquit")
def test_an_inherited_ignore_is_respected() -> None:
    signal.signal(signal.SIGQUIT, signal.SIG_IGN)
    w = SigquitWatcher(lambda: None)
    assert w.start() is False
    w.stop()
    assert signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN
