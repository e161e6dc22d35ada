"""A dead engine thread (issue 18): the daemon says so loudly and exits 1.

The daemon runs as in production - its threads, its SIGQUIT watcher, its run() - with
the FUSE loop replaced by a wait for the stop the dead thread causes (the real loop ends
on the SIGTERM the daemon sends itself; a live test cannot make an engine thread die on
purpose).  The crawler's crawl() raises: run() returns 1, the log's last word is
CRITICAL and names the thread and the error, stderr says the same.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

import pytest
from memfake import FakeSource

from lksmfs.config import Config
from lksmfs.daemon import service as daemon_mod

fuse_mod = pytest.importorskip("lksmfs.sysfs.fuse", exc_type=OSError)  # Daemon needs mfusepy/libfuse


def test_a_dead_engine_thread_is_said_and_the_exit_status_is_1(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    cfg = Config()
    cfg.freezer.enabled = False
    d = daemon_mod.Daemon(cfg, str(tmp_path / "ksm"), source=FakeSource())
    signals: list[int] = []

    def fake_kill(pid: int, sig: int) -> None:
        signals.append(sig)  # the SIGTERM that would end libfuse's loop

    def fake_mount(ops: object, mountpoint: str) -> None:
        assert d._stop.wait(30), "the dead thread did not stop the daemon"

    def crawl(now: float) -> float | None:
        raise RuntimeError("boom in crawl")

    monkeypatch.setattr(daemon_mod.os, "kill", fake_kill)
    monkeypatch.setattr(fuse_mod, "mount", fake_mount)
    monkeypatch.setattr(d.ksm, "crawl", crawl)
    with caplog.at_level(logging.INFO, logger="lksmfs.daemon"):
        assert d.run() == 1
    assert signals == [signal.SIGTERM]
    assert d.error_thread == "crawler" and isinstance(d.error, RuntimeError)
    last = caplog.records[-1]
    assert last.levelno == logging.CRITICAL
    assert last.getMessage() == (f"the crawler thread died (RuntimeError: boom in crawl): unmounted "
                                 f"{tmp_path / 'ksm'}, exiting with status 1")
    assert any(r.levelno == logging.CRITICAL and r.exc_info for r in caplog.records)  # the traceback, once
    assert capsys.readouterr().err == (f"lksmfs mount: the crawler thread died (RuntimeError: boom in crawl); "
                                       f"unmounted {tmp_path / 'ksm'}\n")


def test_scan_lines_come_in_a_burst_then_at_a_pace() -> None:
    """Ten scans are said at once; then one every 10 s, which says how many went unsaid
    (mainline's ksmd at sleep_millisecs=0 wraps a pass every few ms)."""
    r = daemon_mod.ScanReports(burst=10, every_s=10.0)
    assert [r.take(0.0) for _ in range(10)] == [0] * 10
    assert [r.take(0.001 * i) for i in range(1, 6)] == [None] * 5  # 5 ms: no token yet
    assert r.take(9.9) is None  # 0.99 of a token
    assert r.take(10.0) == 6  # a whole token: said, with the six before it
    assert r.take(10.5) is None
    assert r.take(1000.0) == 1  # a long quiet: the bucket is full again (not over)
    assert [r.take(1000.0) for _ in range(10)] == [0] * 9 + [None]
