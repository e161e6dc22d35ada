"""Waiting for the kernel to report a state, with a deadline: never sleep-and-hope.

The one polling helper of the project (cgroup freeze states, mounts, /proc), of the test
kit and of the demo: a condition that is not met in time raises, naming what was awaited.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def describe(pred: Callable[[], object]) -> str:
    """A readable name for a predicate: its source line for a lambda, else its name."""
    try:
        src = inspect.getsource(pred).strip()
    except (OSError, TypeError):
        return getattr(pred, "__qualname__", repr(pred))
    return " ".join(src.split())[:200]


def wait_until(
    pred: Callable[[], T],
    timeout: float = 5.0,
    interval: float = 0.01,
    *,
    what: str | None = None,
    max_interval: float | None = None,
) -> T:
    """Poll `pred` until it returns something truthy and return that; TimeoutError (an
    OSError) after `timeout` seconds, saying what was awaited (`what`, else the source of
    `pred`) and what `pred` last returned.

    The pause between polls starts at `interval` and doubles up to `max_interval`
    (default: stays at `interval`)."""
    deadline = time.monotonic() + timeout
    delay = interval
    cap = interval if max_interval is None else max_interval
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            got = pred()  # one last look: the deadline may have passed while sleeping
            if got:
                return got
            raise TimeoutError(
                f"timed out after {timeout:g} s waiting for {what or describe(pred)} (last value: {got!r})")
        time.sleep(delay)
        delay = min(delay * 2, cap)
