"""The Prometheus textfile rendering (lksmfs.daemon.metrics): names, types, escaping, the bound
on per-process series.  Expected text is written out by hand from the format's rules."""

from __future__ import annotations

from typing import Any

from lksmfs.daemon.metrics import MAX_PROCESSES, Snapshot, escape_help, escape_label, render, top_processes


def row(pid: int, merging: int, comm: str = "app", start_time: int = 1) -> dict[str, Any]:
    return {"pid": pid, "start_time": start_time, "comm": comm, "merging_pages": merging}


def test_families_types_and_values() -> None:
    snap = Snapshot(
        attributes={"pages_sharing": 63, "full_scans": 3, "pages_scanned": 640, "nr_regions": 4,
                    "general_profit": -128, "run": 8},
        region_share={"heap": 60, "stack": 0, "file_data": 3, "file_bss": 0, "conflicted": 0},
        processes=[row(42, 63, "child")],
        last_scan={"mode": 2, "slots_scanned": 1, "pages_scanned": 64, "merged": 0, "broken": 0, "wall_s": 0.25},
    )
    lines = render(snap).splitlines()
    # one family per attribute, in the table's order, each HELP then TYPE then the sample
    i = lines.index("# TYPE lksm_pages_sharing gauge")
    assert lines[i - 1] == "# HELP lksm_pages_sharing Pages merged into KSM pages (the pages saved)."
    assert lines[i + 1] == "lksm_pages_sharing 63"
    for name, value in (("full_scans", 3), ("pages_scanned", 640), ("nr_regions", 4)):
        assert f"# TYPE lksm_{name} counter" in lines and f"lksm_{name} {value}" in lines
    assert "# TYPE lksm_general_profit gauge" in lines and "lksm_general_profit -128" in lines
    assert "lksm_run 8" in lines
    assert [ln for ln in lines if ln.startswith("lksm_region_share")] == [
        'lksm_region_share{region="heap"} 60', 'lksm_region_share{region="stack"} 0',
        'lksm_region_share{region="file_data"} 3', 'lksm_region_share{region="file_bss"} 0',
        'lksm_region_share{region="conflicted"} 0']
    assert 'lksm_process_merging_pages{pid="42",comm="child"} 63' in lines
    assert "lksm_last_scan_processes 1" in lines and "lksm_last_scan_duration_seconds 0.25" in lines
    assert "lksm_last_scan_mode 2" in lines
    # every sample line belongs to a family declared just before it
    declared = {ln.split()[2] for ln in lines if ln.startswith("# TYPE ")}
    assert all(ln.split("{")[0].split()[0] in declared for ln in lines if not ln.startswith("#"))
    assert render(snap).endswith("\n")


def test_no_filter_no_region_share_and_no_scan_yet() -> None:
    text = render(Snapshot(attributes={"run": 0}))
    assert "lksm_region_share" not in text and "lksm_last_scan" not in text
    # the process family is declared even when empty (a valid, stable file)
    assert "# TYPE lksm_process_merging_pages gauge\n" in text


def test_label_escaping() -> None:
    assert escape_label('a"b\\c\nd') == 'a\\"b\\\\c\\nd'
    assert escape_label("caf\udcc3") == "caf\ufffd"  # a non-UTF-8 byte from os.fsdecode
    assert escape_help("x\\y\nz") == "x\\\\y\\nz"
    text = render(Snapshot(attributes={}, processes=[row(7, 1, 'we"ird\\\nname')]))
    assert 'lksm_process_merging_pages{pid="7",comm="we\\"ird\\\\\\nname"} 1\n' in text


def test_top_50_by_merging_pages_ties_to_the_lower_pid() -> None:
    rows = [row(pid, merging=pid % 7) for pid in range(1, 121)]  # 120 processes
    top = top_processes(rows)
    assert len(top) == MAX_PROCESSES == 50
    # 17 pids have 6 (6, 13, ..., 118), 17 have 5, then the 16 lowest pids that have 4
    assert [int(r["pid"]) for r in top[:17]] == list(range(6, 120, 7))
    assert [r["merging_pages"] for r in top] == [6] * 17 + [5] * 17 + [4] * 16
    assert [int(r["pid"]) for r in top[34:]] == list(range(4, 4 + 7 * 16, 7))
    text = render(Snapshot(attributes={}, processes=rows))
    assert text.count("lksm_process_merging_pages{") == 50


def test_a_reused_pid_is_shown_once_with_its_newest_slot() -> None:
    """Two series with the same labels would make the file invalid; proc/PID shows the newest."""
    top = top_processes([row(9, 100, "old", start_time=5), row(9, 1, "new", start_time=8)])
    assert [(r["comm"], r["merging_pages"]) for r in top] == [("new", 1)]
