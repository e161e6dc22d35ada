"""Reading the scanner's next chunk of pages while it merges the current one.

Copying pages out of /proc/PID/mem is about a third of a scan, and the system call runs
without the GIL; so while the scanner digests and merges chunk i on its thread, a helper
thread copies chunk i+1.  The engine says what it will read next and where
(`MemorySource.prefetch(task, vpns, out)`), then asks for it as usual
(`read_pages(task, vpns, out)`); the source hands over the pages read ahead when the
request is the same, and reads them itself otherwise.  The buffers are the caller's:
the engine decides how much memory reading takes.

The thread lives in the source layer, so the engine stays free of threads.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np

from lksmfs.sources.base import TaskId
from lksmfs.system.threads import start_thread

ReadFn = Callable[[TaskId, np.ndarray, memoryview], tuple[memoryview, np.ndarray]]


class ReadAhead:
    """One read at a time done ahead on a helper thread.  `read(task, vpns, out)` does
    the work and returns (the pages, vpns it had to zero-fill)."""

    def __init__(self, read: ReadFn, name: str = "readahead") -> None:
        self._read = read
        self._name = name
        self._cond = threading.Condition()
        self._todo: tuple[TaskId, np.ndarray, memoryview] | None = None
        self._pending: tuple[TaskId, np.ndarray, memoryview] | None = None  # submitted, not taken
        self._done = False
        self._result: tuple[memoryview, np.ndarray] | BaseException | None = None
        self._thread: threading.Thread | None = None
        self._closed = False

    def submit(self, task: TaskId, vpns: np.ndarray, out: memoryview) -> None:
        """Start reading `vpns` of `task` into `out` (any read ahead not taken is dropped)."""
        v = np.array(vpns, dtype=np.uint64)
        with self._cond:
            if self._closed:
                return
            self._drop_pending()
            self._todo = (task, v, out)
            self._pending = (task, v, out)
            self._done = False
            self._result = None
            if self._thread is None:
                self._thread = start_thread(self._name, self._run)
            self._cond.notify_all()
            # Hand the GIL over until the helper is inside its read: otherwise it would
            # only get it when this thread next blocks (after the whole chunk's work, or
            # a switch interval later), and the reads would not overlap anything.
            while self._todo is not None and not self._closed:
                self._cond.wait()

    def take(self, task: TaskId, vpns: np.ndarray, out: memoryview) -> tuple[memoryview, np.ndarray] | None:
        """The pages read ahead if they are exactly these, into `out` (waiting for the
        read to end), else None; a failed read ahead raises what the read raised."""
        with self._cond:
            if self._pending is None:
                return None
            ptask, pv, pout = self._pending
            if ptask != task or not _same_buffer(pout, out) or not np.array_equal(pv, vpns):
                self._drop_pending()
                return None
            while not self._done:
                self._cond.wait()
            result = self._result
            self._pending = None
            self._result = None
        if isinstance(result, BaseException):
            raise result
        assert result is not None
        return result

    def _drop_pending(self) -> None:
        """Wait for a read ahead nobody will take (its buffer may be reused at once)."""
        while self._pending is not None and not self._done:
            self._cond.wait()
        self._pending = None
        self._result = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._todo is None and not self._closed:
                    self._cond.wait()
                if self._closed:
                    return
                assert self._todo is not None
                task, v, out = self._todo
                self._todo = None
                self._cond.notify_all()  # the submitter may go on: the read starts now
            try:
                result: tuple[memoryview, np.ndarray] | BaseException = self._read(task, v, out)
            except BaseException as e:  # noqa: BLE001 - handed to the reader of these pages
                result = e
            with self._cond:
                self._result = result
                self._done = True
                self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._drop_pending()
            self._closed = True
            self._cond.notify_all()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(5.0)


def _same_buffer(a: memoryview, b: memoryview) -> bool:
    """Do two views start at the same memory (the same buffer handed out twice)?"""
    return a.obj is b.obj and len(a) >= len(b)
