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


def buf(npages: int) -> memoryview:
    return memoryview(bytearray(npages * PAGE_SIZE))


def vp(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.uint64)


def test_the_same_pages_are_taken_from_the_helper_thread() -> None:
    reads = Reads()
    ra = ReadAhead(reads, name="ra-test")
    try:
        out = buf(2)
        ra.submit(A, vp(3, 4), out)
        got = ra.take(A, vp(3, 4), out)
        assert got is not None and pages(got[0]) == [19, 20] and got[0].obj is out.obj
        assert reads.calls == [(A, [3, 4], "ra-test")]
        assert ra.take(A, vp(3, 4), out) is None  # taken once
    finally:
        ra.close()


def test_other_pages_or_another_task_are_not_served_and_the_read_ahead_is_dropped() -> None:
    reads = Reads()
    ra = ReadAhead(reads)
    try:
        out = buf(2)
        ra.submit(A, vp(1), out)
        assert ra.take(B, vp(1), out) is None
        assert ra.take(A, vp(1), out) is None  # dropped by the miss
        ra.submit(A, vp(1, 2), out)
        assert ra.take(A, vp(1), out) is None
        ra.submit(A, vp(1), out)
        assert ra.take(A, vp(1), buf(1)) is None  # another buffer: not these pages
    finally:
        ra.close()


def test_a_taken_chunk_survives_the_next_read_ahead_into_another_buffer() -> None:
    ra = ReadAhead(Reads())
    try:
        one, two = buf(2), buf(2)
        ra.submit(A, vp(1, 2), one)
        first = ra.take(A, vp(1, 2), one)
        ra.submit(B, vp(5, 6), two)
        second = ra.take(B, vp(5, 6), two)
        assert first is not None and second is not None
        assert pages(first[0]) == [17, 18] and pages(second[0]) == [37, 38]
    finally:
        ra.close()


def test_a_failed_read_ahead_raises_in_the_reader_that_takes_it() -> None:
    reads = Reads()
    reads.fail.add(A)
    ra = ReadAhead(reads)
    try:
        out = buf(1)
        ra.submit(A, vp(1), out)
        with pytest.raises(ProcessGone):
            ra.take(A, vp(1), out)
    finally:
        ra.close()
