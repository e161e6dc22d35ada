"""The read-ahead helper on its own: what is taken, what is dropped, what is raised."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from lksmfs.sources.base import PAGE_SIZE, ProcessGone, TaskId
from lksmfs.sources.readahead import ReadAhead

A, B = TaskId(1, 1), TaskId(2, 2)


class Reads:
    """A fake read: page v of task t is filled with the byte (t.pid * 16 + v) & 0xFF."""

    def __init__(self) -> None:
        self.calls: list[tuple[TaskId, list[int], str]] = []
        self.fail: set[TaskId] = set()

    def __call__(self, task: TaskId, vpns: np.ndarray, out: memoryview) -> tuple[memoryview, np.ndarray]:
        self.calls.append((task, vpns.tolist(), threading.current_thread().name))
        if task in self.fail:
            raise ProcessGone(str(task))
        for k, v in enumerate(vpns.tolist()):
            out[k * PAGE_SIZE : (k + 1) * PAGE_SIZE] = bytes([(task.pid * 16 + v) & 0xFF]) * PAGE_SIZE
        return out, np.zeros(0, dtype=np.uint64)


def pages(mv: memoryview) -> list[int]:
    return [mv[k * PAGE_SIZE] for k in range(len(mv) // PAGE_SIZE)]


def test_the_same_pages_are_taken_from_the_helper_thread() -> None:
    reads = Reads()
    ra = ReadAhead(reads, name="ra-test")
    try:
        ra.submit(A, np.array([3, 4], dtype=np.uint64))
        got = ra.take(A, np.array([3, 4], dtype=np.uint64))
        assert got is not None and pages(got[0]) == [19, 20]
        assert reads.calls == [(A, [3, 4], "ra-test")]
        assert ra.take(A, np.array([3, 4], dtype=np.uint64)) is None  # taken once
    finally:
        ra.close()


def test_other_pages_or_another_task_are_not_served_and_the_read_ahead_is_dropped() -> None:
    reads = Reads()
    ra = ReadAhead(reads)
    try:
        ra.submit(A, np.array([1], dtype=np.uint64))
        assert ra.take(B, np.array([1], dtype=np.uint64)) is None
        assert ra.take(A, np.array([1], dtype=np.uint64)) is None  # dropped by the miss
        ra.submit(A, np.array([1, 2], dtype=np.uint64))
        assert ra.take(A, np.array([1], dtype=np.uint64)) is None
    finally:
        ra.close()


def test_buffers_alternate_so_a_taken_chunk_survives_the_next_read_ahead() -> None:
    ra = ReadAhead(Reads())
    try:
        ra.submit(A, np.array([1, 2], dtype=np.uint64))
        first = ra.take(A, np.array([1, 2], dtype=np.uint64))
        ra.submit(B, np.array([5, 6], dtype=np.uint64))
        second = ra.take(B, np.array([5, 6], dtype=np.uint64))
        assert first is not None and second is not None
        assert pages(first[0]) == [17, 18] and pages(second[0]) == [37, 38]
    finally:
        ra.close()


def test_a_failed_read_ahead_raises_in_the_reader_that_takes_it() -> None:
    reads = Reads()
    reads.fail.add(A)
    ra = ReadAhead(reads)
    try:
        ra.submit(A, np.array([1], dtype=np.uint64))
        with pytest.raises(ProcessGone):
            ra.take(A, np.array([1], dtype=np.uint64))
    finally:
        ra.close()
