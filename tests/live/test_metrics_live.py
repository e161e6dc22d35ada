"""Monitoring through the real node_exporter (Debian's prometheus-node-exporter):

- `--metrics-textfile` served by its textfile collector: every lksm_* value equals what
  `cat` shows in the mount, label values escaped as the format wants, updated after a
  store, gone after a clean stop;
- its `ksmd` collector reading the mount placed at DIR/kernel/mm/ksm (`--path.sysfs=DIR`).

node_exporter listens on a free port of 127.0.0.1 and is always stopped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from lksmfs.system.waiting import wait_until
from testkit.exporter import node_exporter, node_exporter_binary, samples, scrape, value
from testkit.memproc import MemProcess, filled
from testkit.mount import Mounts, read_attr, sh

pytestmark = pytest.mark.live

@pytest.fixture
def odd_child() -> Iterator[MemProcess]:
    """16 identical pages of its own byte value, and a comm that needs escaping."""
    with filled(16, 0xC3, comm='lk"s\\m') as c:
        yield c


def test_textfile_served_by_node_exporter_equals_the_mount(
    mounts: Mounts, child: MemProcess, odd_child: MemProcess
) -> None:
    node_exporter_binary()
    textdir = mounts.root / "textfile"
    textdir.mkdir()
    prom = textdir / "lksm.prom"
    d = mounts.start("--pid", str(child.pid), "--pid", str(odd_child.pid), "--set", "pages_to_scan=5000",
                     "--set", "run=8", "--metrics-textfile", str(prom))
    mp = d.mountpoint
    with node_exporter(mounts.root / "ne.log", "--collector.textfile",
                       f"--collector.textfile.directory={textdir}") as url:
        # one-shot mode: 3 initial full scans, then nothing moves until asked
        try:
            wait_until(lambda: value(samples(scrape(url)), "lksm_full_scans") == 3, 60)
        except TimeoutError as e:
            raise AssertionError(f"{e}\n{d.log()}") from None
        text = scrape(url)
        got = samples(text)
        assert value(got, "node_textfile_scrape_error") == 0
        numeric = [n for n in os.listdir(mp) if n not in ("hint", "proc", "region_share")]
        assert len(numeric) == 22
        for name in numeric:
            assert value(got, f"lksm_{name}") == int(read_attr(mp, name)), name
        assert "# TYPE lksm_full_scans counter" in text and "# TYPE lksm_pages_sharing gauge" in text
        for part in read_attr(mp, "region_share").split():
            region, count = part.split(":")
            assert value(got, "lksm_region_share", region=region) == int(count), region
        # per process: the proc/PID files' value; the odd comm's label comes back intact
        for pid, comm in ((child.pid, Path(f"/proc/{child.pid}/comm").read_text().strip()),
                          (odd_child.pid, 'lk"s\\m')):
            merging = int(read_attr(mp / "proc" / str(pid), "merging_pages"))
            assert value(got, "lksm_process_merging_pages", pid=str(pid), comm=comm) == merging
        # by hand: the child's 64 identical pages and the odd child's 16 are all merged
        assert int(read_attr(mp / "proc" / str(child.pid), "merging_pages")) >= 64
        assert int(read_attr(mp / "proc" / str(odd_child.pid), "merging_pages")) >= 16
        assert 'comm="lk\\"s\\\\m"' in prom.read_text()
        # an accepted store rewrites the file; a refused one changes nothing
        assert sh("echo 777 > pages_to_scan", cwd=mp).returncode == 0
        wait_until(lambda: value(samples(scrape(url)), "lksm_pages_to_scan") == 777, 20)
        assert sh("echo 5 > scan_boost", cwd=mp).returncode == 1
        assert value(samples(scrape(url)), "lksm_scan_boost") == 100
        # a partial scan with no one to scan: the crawler puts the request back to 0
        # ~100 ms later, with no scan and no store; the file follows it too
        assert sh("echo 1 > one_shot_scanning", cwd=mp).returncode == 0
        wait_until(lambda: read_attr(mp, "one_shot_scanning") == "0\n", 20)
        wait_until(lambda: value(samples(scrape(url)), "lksm_one_shot_scanning") == 0, 20)
        assert value(samples(scrape(url)), "lksm_full_scans") == 3
        assert os.listdir(textdir) == ["lksm.prom"]  # no temp file left behind
        assert prom.stat().st_mode & 0o777 == 0o644
        assert d.terminate() == 0
        assert not prom.exists()  # a stopped daemon has no figures
        assert value(samples(scrape(url)), "lksm_full_scans") is None
    assert "metrics: writing" in d.log() and "cannot write" not in d.log()


def test_node_exporter_ksmd_collector_reads_the_mount(mounts: Mounts, child: MemProcess) -> None:
    node_exporter_binary()
    sysroot = mounts.root / "sys"
    (sysroot / "kernel" / "mm").mkdir(parents=True)
    d = mounts.start("--pid", str(child.pid), "--set", "pages_to_scan=5000", "--set", "run=8",
                     name="sys/kernel/mm/ksm")
    mp = d.mountpoint
    wait_until(lambda: int(read_attr(mp, "full_scans")) >= 3, 60)
    with node_exporter(mounts.root / "ne.log", "--collector.ksmd", f"--path.sysfs={sysroot}") as url:
        got = samples(scrape(url))
    assert value(got, "node_scrape_collector_success", collector="ksmd") == 1
    assert value(got, "node_ksmd_full_scans_total") == int(read_attr(mp, "full_scans")) >= 3
    assert value(got, "node_ksmd_pages_sharing") == int(read_attr(mp, "pages_sharing")) >= 63
    for name in ("pages_shared", "pages_unshared", "pages_volatile", "pages_to_scan", "merge_across_nodes"):
        assert value(got, f"node_ksmd_{name}") == int(read_attr(mp, name)), name
    assert value(got, "node_ksmd_run") == 8
    assert value(got, "node_ksmd_sleep_seconds") == int(read_attr(mp, "sleep_millisecs")) / 1000
