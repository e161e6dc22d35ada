"""Waiting on a condition with a deadline: the one polling helper of the live tests."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_until(pred: Callable[[], object], timeout: float = 5.0, interval: float = 0.01) -> bool:
    """Poll `pred` until it is truthy or `timeout` passes; returns its last truthiness."""
    deadline = time.monotonic() + timeout
    while True:
        if pred():
            return True
        if time.monotonic() >= deadline:
            return bool(pred())
        time.sleep(interval)
