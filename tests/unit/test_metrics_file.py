"""The textfile side of --metrics-textfile: atomic replacement, what a snapshot holds,
and the publisher's life (nothing before start, a clean file after, removed at stop)."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from lksmfs.config import ConfigError
from lksmfs.daemon.metrics_file import MetricsPublisher, take_snapshot, write_atomically
from lksmfs.engine.params import Tunables
from lksmfs.sysfs.attrs import AttributeTable


class StandIn:
    """The engine surface a snapshot reads; numbers distinct so a mix-up shows."""

    def __init__(self, filter_enabled: bool = True) -> None:
        self.filter_enabled = filter_enabled
        self.policy = "lksm"
        self.tunables = Tunables()
        self.last_scan: dict[str, float | int] = {"mode": 2, "slots_scanned": 3}
        self.sharing = 63

    def counters(self) -> dict[str, int]:
        names = ("pages_shared pages_unshared pages_volatile full_scans stable_node_chains "
                 "stable_node_dups scanning_process nr_regions pages_scanned general_profit "
                 "ksm_zero_pages").split()
        return {"pages_sharing": self.sharing, **{n: 100 + i for i, n in enumerate(names)}}

    def region_share(self) -> dict[str, int]:
        return {"heap": 5, "stack": 0, "file_data": 2, "file_bss": 1, "conflicted": 0}

    def per_process(self) -> list[dict[str, Any]]:
        return [{"pid": 11, "start_time": 1, "comm": "c", "merging_pages": 63}]

    def set_tunable(self, name: str, value: int) -> None:
        setattr(self.tunables, name, value)


def test_write_atomically_replaces_the_file_readably(tmp_path: Path) -> None:
    target = tmp_path / "lksm.prom"
    target.write_text("old\n")
    with open(target) as reader:  # a scrape in progress keeps the whole old file
        write_atomically(str(target), "new\n")
        assert reader.read() == "old\n"
    assert target.read_text() == "new\n"
    assert target.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path) == ["lksm.prom"]  # no temp file left


def test_snapshot_is_what_the_files_show() -> None:
    ksm = StandIn()
    table = AttributeTable(ksm)  # type: ignore[arg-type]
    snap = take_snapshot(table)
    assert set(snap.attributes) == set(table.names()) - {"region_share"}
    for name, value in snap.attributes.items():
        assert table.show(name) == f"{value}\n".encode(), name
    assert snap.region_share == ksm.region_share()
    assert snap.processes[0]["merging_pages"] == 63 and snap.last_scan["slots_scanned"] == 3
    assert take_snapshot(AttributeTable(StandIn(filter_enabled=False))).region_share is None  # type: ignore[arg-type]


def _wait_for(pred: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_publisher_thread_life(tmp_path: Path) -> None:
    ksm = StandIn()
    target = tmp_path / "lksm.prom"
    engine_lock = threading.Lock()
    pub = MetricsPublisher(str(target), AttributeTable(ksm), engine_lock)  # type: ignore[arg-type]
    pub.publish()
    assert not target.exists()  # not before start(): the mount is not serving yet
    pub.start()
    assert _wait_for(lambda: target.exists() and "lksm_pages_sharing 63\n" in target.read_text())
    # publish() never waits for the engine lock: callable by a thread holding it
    with engine_lock:
        ksm.sharing = 70
        pub.publish()
        writes = pub.writes
    assert _wait_for(lambda: "lksm_pages_sharing 70\n" in target.read_text())
    assert pub.writes == writes + 1
    assert [t.name for t in threading.enumerate()].count("metrics") == 1
    pub.stop()
    assert not target.exists()
    assert "metrics" not in [t.name for t in threading.enumerate()]
    pub.publish()
    assert not target.exists()


def test_write_errors_are_logged_once_until_it_recovers(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    ksm = StandIn()
    target = tmp_path / "sub" / "lksm.prom"
    pub = MetricsPublisher(str(target), AttributeTable(ksm), threading.Lock())  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="lksmfs.daemon.metrics_file"):
        pub.write_now()
        pub.write_now()
        target.parent.mkdir()
        pub.write_now()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [f"metrics textfile {target}: cannot write: No such file or directory"]
    assert any(r.getMessage().endswith("written again") for r in caplog.records)
    assert "lksm_pages_sharing 63\n" in target.read_text() and pub.writes == 1


def test_no_path_does_nothing(tmp_path: Path) -> None:
    pub = MetricsPublisher(None, AttributeTable(StandIn()), threading.Lock())  # type: ignore[arg-type]
    pub.start()
    pub.publish()
    pub.stop()
    assert os.listdir(tmp_path) == []


def test_file_inside_the_mountpoint_is_refused(tmp_path: Path) -> None:
    mp = tmp_path / "ksm"
    with pytest.raises(ConfigError, match="inside the mountpoint"):
        MetricsPublisher(str(mp / "x.prom"), AttributeTable(StandIn()), threading.Lock(), str(mp))  # type: ignore[arg-type]
    MetricsPublisher(str(tmp_path / "ksm2.prom"), AttributeTable(StandIn()), threading.Lock(), str(mp))  # type: ignore[arg-type]
