"""How `lksmfs scan` words what it left out, and its progress line (lksmfs.commands.output.progress)."""

from __future__ import annotations

import io

import pytest

from lksmfs.commands.output.progress import ERASE_LINE, Progress
from lksmfs.commands.scan import print_skipped
from lksmfs.system.waiting import wait_until


def short(pid: int, ms: int) -> dict[str, object]:
    return {"pid": pid, "comm": "sh", "reason": "short_task", "cpu_ms": ms, "message": f"short task: {ms} ms"}


def test_a_few_left_out_are_listed_one_by_one(capsys: pytest.CaptureFixture[str]) -> None:
    print_skipped([short(7, 3), {"pid": None, "comm": None, "reason": "no_such_cgroup",
                                 "message": "no such cgroup directory", "cgroup": "/cg"}], nothing_scanned=True)
    assert capsys.readouterr().err == ("lksmfs scan: left out pid 7 (sh): short task: 3 ms\n"
                                       "lksmfs scan: left out cgroup /cg: no such cgroup directory\n"
                                       "lksmfs scan: nothing in scope could be scanned: see above\n")


def test_many_left_out_are_counted_by_reason(capsys: pytest.CaptureFixture[str]) -> None:
    """Every user process as scope: dozens of short tasks would bury the result."""
    denied = {"pid": 1, "comm": "init", "reason": "permission_denied", "message": "permission denied"}
    print_skipped([denied] + [short(100 + i, i) for i in range(11)], nothing_scanned=False)
    assert capsys.readouterr().err == (
        "lksmfs scan: left out 1 process (permission_denied), e.g. pid 1 (init): permission denied\n"
        "lksmfs scan: left out 11 processes (short_task), e.g. pid 100 (sh): short task: 0 ms\n"
        "lksmfs scan: --json lists every process left out\n")


def test_nothing_in_scope_at_all(capsys: pytest.CaptureFixture[str]) -> None:
    print_skipped([], nothing_scanned=True)
    assert capsys.readouterr().err == "lksmfs scan: nothing in scope could be scanned (no process in scope)\n"


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_and_erases_at_the_end() -> None:
    term = Terminal()
    calls = []

    def status() -> str:
        calls.append(1)
        return f"step {len(calls)}"

    with Progress(status, stream=term, delay_s=0.0, interval_s=0.01):
        wait_until(lambda: len(calls) >= 2, 10, what="two redraws")
    text = term.getvalue()
    assert text.startswith(ERASE_LINE + "step 1" + ERASE_LINE + "step 2")
    redraws = text.count(ERASE_LINE) - 1  # the last one erases
    assert text.endswith(ERASE_LINE) and 2 <= redraws <= len(calls)  # a status taken at the end is not drawn


def test_progress_stays_silent_off_a_terminal_and_for_quick_work() -> None:
    pipe = io.StringIO()  # isatty() is False
    with Progress(lambda: "x", stream=pipe, delay_s=0.0, interval_s=0.01) as p:
        assert not p.enabled
    assert pipe.getvalue() == ""
    term = Terminal()
    with Progress(lambda: "x", stream=term, delay_s=60.0):
        pass  # over before the first second: nothing drawn, nothing to erase
    assert term.getvalue() == ""
