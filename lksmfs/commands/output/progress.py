"""A one-line progress status on a terminal, for work that takes more than a second.

Small on purpose (no dependency): a thread redraws `status()` on stderr every quarter
second, from the first second on, and erases it when the work ends, so a quick command
prints nothing extra and a redirected stderr (a log, a pipe) never gets escape codes.
`status()` is called from that thread: it must only read (figures read without the
work's lock may be a moment old, which a progress line can afford).
"""

from __future__ import annotations

import shutil
import sys
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TextIO

from lksmfs.system.threads import start_thread

ERASE_LINE = "\r\x1b[K"  # carriage return + erase to the end of the line (ECMA-48 EL)


class Progress:
    """`with Progress(status): work()` - the status line while the work lasts."""

    def __init__(self, status: Callable[[], str], *, stream: TextIO | None = None,
                 delay_s: float = 1.0, interval_s: float = 0.25, enabled: bool | None = None) -> None:
        self.status = status
        self.stream = stream if stream is not None else sys.stderr
        self.delay_s = delay_s
        self.interval_s = interval_s
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False
        self._write_lock = threading.Lock()

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = start_thread("progress", self._run)
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        """Stop redrawing and erase the line (idempotent)."""
        self._done.set()
        if self._thread is not None:
            self._thread.join(2.0)
            self._thread = None
        with self._write_lock:
            if self._shown:
                self._shown = False
                self._write(ERASE_LINE)

    def _run(self) -> None:
        if self._done.wait(self.delay_s):
            return
        while not self._done.is_set():
            try:
                text = self.status()
            except Exception as e:  # noqa: BLE001 - a progress line must never end the work
                text = f"(progress unavailable: {e})"
            width = shutil.get_terminal_size((80, 24)).columns
            with self._write_lock:
                if self._done.is_set():
                    return
                self._write(ERASE_LINE + text[: max(1, width - 1)])
                self._shown = True
            self._done.wait(self.interval_s)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away: nothing to show any more
            pass
