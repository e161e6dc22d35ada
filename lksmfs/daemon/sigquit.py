"""SIGQUIT (Ctrl-\\ in a terminal) stops the daemon cleanly, as SIGTERM does.

Its default action dumps core and leaves a dead FUSE mount behind ("Transport endpoint
is not connected" for every client until the next start clears it), and libfuse only
handles SIGTERM, SIGINT and SIGHUP.  A Python handler alone cannot help: the main
thread sits in libfuse's C loop and would run it only after the loop ends.  Blocking
the signal and sigwait()ing for it cannot either: threads that libraries started at
import time (numpy's BLAS pool) keep it unblocked and would take it.  So the handler is
Python's C-level one, which writes the signal number to a wakeup pipe from whichever
thread the kernel picked; a thread reading the pipe calls `on_quit` (the daemon then
stops through SIGTERM, the path every other stop takes).

Like libfuse with SIGINT, an inherited SIG_IGN is respected: a background job of a
non-interactive shell ignores Ctrl-\\ by design.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable

from lksmfs.system.threads import start_thread

log = logging.getLogger(__name__)


class SigquitWatcher:
    """start() and stop() from the main thread (signal.set_wakeup_fd's rule)."""

    def __init__(self, on_quit: Callable[[], None]) -> None:
        self._on_quit = on_quit
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None
        self._old_wakeup_fd = -1

    def start(self) -> bool:
        """Install the handler; False (nothing done) when SIGQUIT is ignored."""
        if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
            log.debug("SIGQUIT is ignored (inherited): leaving it so")
            return False
        r, w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(w, False)  # set_wakeup_fd's requirement: a handler never blocks
        self._pipe = (r, w)
        signal.signal(signal.SIGQUIT, lambda signum, frame: None)  # the pipe does the work
        self._old_wakeup_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._thread = start_thread("sigquit", self._wait, r)
        return True

    def _wait(self, r: int) -> None:
        while True:
            data = os.read(r, 64)  # one byte per signal caught (any signal with a handler)
            if self._stopping.is_set() or not data:
                return
            if signal.SIGQUIT in data:
                log.info("SIGQUIT: stopping as for SIGTERM")
                try:
                    self._on_quit()
                except Exception:  # the watcher must outlive a failed stop request
                    log.exception("SIGQUIT: stop request failed")

    def stop(self) -> None:
        """End the thread and hand the wakeup fd back.  The do-nothing handler stays: a
        SIGQUIT during the rest of the shutdown must not dump core half-way."""
        if self._pipe is None:
            return
        r, w = self._pipe
        self._stopping.set()
        signal.set_wakeup_fd(self._old_wakeup_fd)
        os.write(w, b"\0")
        if self._thread is not None:
            self._thread.join(5)
        os.close(w)
        os.close(r)
        self._pipe = None
