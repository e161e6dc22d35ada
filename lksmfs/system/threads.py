"""Threads with names that say what they do, in the log and in `ps -L`.

Python names a thread only for itself (logging's threadName); the kernel knows every
thread by its comm, which `ps -L`, `top -H` and /proc/PID/task/TID/comm show and which a
new thread inherits from the process ("lksmfs" for all of them).  A thread started here
sets both to the same short word, as the kernel's own threads are called (ksmd).
Threads libfuse creates are named by the code they first run (`name_current`).
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Callable
from typing import Any

PR_SET_NAME = 15
TASK_COMM_LEN = 16  # the kernel keeps 15 bytes and a NUL

_libc: Any = None


def _prctl_set_name(name: str) -> None:
    """prctl(PR_SET_NAME): the calling thread's comm (cut to 15 bytes); best effort."""
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL(None, use_errno=True)
        _libc.prctl(PR_SET_NAME, name.encode()[: TASK_COMM_LEN - 1], 0, 0, 0)
    except (OSError, AttributeError):  # not Linux, or no prctl: the Python name still helps
        pass


def name_current(name: str) -> None:
    """Name the calling thread: threading's name (logging) and the kernel's comm (ps -L).
    Never call it from the main thread: its comm is the process's name."""
    threading.current_thread().name = name
    _prctl_set_name(name)


def start_thread(name: str, target: Callable[..., None], *args: Any, daemon: bool = True) -> threading.Thread:
    """Start `target(*args)` in a thread called `name` everywhere (see name_current)."""

    def run() -> None:
        _prctl_set_name(name)
        target(*args)

    t = threading.Thread(target=run, name=name, daemon=daemon)
    t.start()
    return t
