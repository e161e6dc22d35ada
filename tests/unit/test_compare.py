"""`lksmfs compare`: the fast path is the engine (same state, item for item), the
figures follow the time model by hand, the output is deterministic, and a fresh copy of
the repository runs it on both shipped workloads."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lksmfs.commands.compare import POLICIES, Player, compare
from lksmfs.workload.schema import load_workload, parse_workload
from testkit.engine import engine_state, state_diff
from testkit.tree import tracked_tree

REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "config" / "workloads" / "small.yaml"
TV = REPO / "config" / "workloads" / "tizen-tv.yaml"

# Two instances of one app: 74 heap pages equal in both (74 KSM pages, 74 sharing
# mappings), one unique stack page each: 150 pages, all mergeable under prctl.
TWINS = {
    "seed": 1,
    "apps": [{"name": "twin", "count": 2, "heap": {"pages": 74, "share": 1.0}, "stack": {"pages": 1}}],
}


# Four instances whose 8 heap pages are equal in all four: under max_page_sharing 2 each
# content is a chain of 2 full dups.  Two instances exit in round 3, which leaves every
# chain with one dup; a third app is spawned then, so that mainline's next pass is not
# quiet as a whole (its pages are new) and the fast path takes the quiet slots one by one.
QUADS = {
    "seed": 1,
    "apps": [{"name": "quad", "count": 4, "heap": {"pages": 8, "share": 1.0}, "stack": {"pages": 1}},
             {"name": "noisy", "heap": {"pages": 4}, "stack": {"pages": 1}, "volatile": 0.5}],
    "timeline": [{"round": 3, "exit": "quad/2"}, {"round": 3, "exit": "quad/3"}, {"round": 3, "spawn": "noisy"}],
}


def _play(workload_path: Path | None, name: str, hours: float, minutes: float, fast: bool,
          workload: dict[str, object] | None = None, mps: int | None = None) -> Player:
    if workload is not None:
        wl = parse_workload(workload, "inline")
    else:
        wl = load_workload(str(workload_path)) if workload_path else parse_workload(TWINS, "twins")
    p = Player(wl, POLICIES[name], hours=hours, round_minutes=minutes, fast=fast)
    if mps is not None:
        p.table.store("max_page_sharing", f"{mps}\n".encode())
    p.run()
    return p


@pytest.mark.parametrize("name", list(POLICIES))
@pytest.mark.parametrize(("path", "hours", "minutes"), [(SMALL, 0.008, 0.04), (TV, 0.03, 0.15)],
                         ids=["small", "tizen-tv"])
def test_the_fast_path_is_the_engine(path: Path, hours: float, minutes: float, name: str) -> None:
    """Every event of the timeline, rounds a few seconds long: the same samples and the
    same engine state to the last rmap item as the engine scanning every page."""
    slow = _play(path, name, hours, minutes, fast=False)
    fast = _play(path, name, hours, minutes, fast=True)
    assert fast.samples == slow.samples
    assert state_diff(engine_state(fast.ksm), engine_state(slow.ksm)) is None
    assert fast.scanner.fast_slots > 0  # it did take the fast way
    if POLICIES[name].engine == "ksm" and path == SMALL:
        assert fast.scanner.jumps  # and ran whole passes at once


@pytest.mark.parametrize("name", [n for n, spec in POLICIES.items() if spec.engine == "ksm"])
def test_the_fast_path_collapses_chains_as_the_engine_does(name: str) -> None:
    """QUADS under mainline: when two instances exit, each of the 8 chains keeps one
    full dup, and the next page that walks the stable tree (a stack page waiting in the
    unstable tree, scanned by a quiet slot or a whole quiet pass) collapses them all
    (stable_node_dup(), 6.11+): 8 KSM pages of 2 mappings, no chain.  The fast path
    must do it where the engine's scanner does: same samples, same state."""
    slow = _play(None, name, 0.01, 0.05, fast=False, workload=QUADS, mps=2)
    fast = _play(None, name, 0.01, 0.05, fast=True, workload=QUADS, mps=2)
    assert fast.samples == slow.samples
    assert state_diff(engine_state(fast.ksm), engine_state(slow.ksm)) is None
    assert fast.scanner.fast_slots > 0
    c = slow.ksm.counters()
    assert (c["stable_node_chains"], c["stable_node_dups"], c["pages_shared"], c["pages_sharing"]) == (0, 0, 8, 8)


def test_mainline_time_model_by_hand() -> None:
    """pages_to_scan 100, sleep 20 ms, 150 pages: a pass is two batches (100, then 50
    and the wrap), the next one starts a sleep later: a pass every 40 ms, 1500 passes
    of 150 pages in the first minute.  The heap pages merge in pass 2 (pass 1 takes
    checksums): 74 sharing from 40 ms on."""
    p = _play(None, "ksm", 1 / 60, 5.0, fast=True)
    assert p.samples == [{"t_s": 0, "pages_scanned": 0, "pages_sharing": 0},
                         {"t_s": 60, "pages_scanned": 1500 * 150, "pages_sharing": 74}]
    c = p.ksm.counters()
    assert (c["full_scans"], c["pages_shared"], c["pages_unshared"], c["pages_volatile"]) == (1500, 74, 2, 0)


def test_lksm_time_model_by_hand() -> None:
    """LKSM one-shot: the three initial full scans (t = 0, 1 s, 2 s) of 150 pages, then
    nothing until resourced's first request (round 1, at 5 min)."""
    p = _play(None, "lksm", 1 / 60, 5.0, fast=True)
    assert p.samples[-1] == {"t_s": 60, "pages_scanned": 3 * 150, "pages_sharing": 74}
    assert p.ksm.counters()["full_scans"] == 3


def test_smart_scan_counts_skipped_pages_not_scanned() -> None:
    """The two unique stack pages fail to merge: from their 5th visit smart_scan skips
    them 1 pass in 2, then 2 in 3, 4 in 5, then 8 in 9; ksmd's passes get shorter
    (148 pages: still two batches), so pages_scanned only loses the skipped pages."""
    smart = _play(None, "ksm-smart", 1 / 60, 5.0, fast=True).ksm.counters()
    plain = _play(None, "ksm", 1 / 60, 5.0, fast=True).ksm.counters()
    assert smart["full_scans"] == plain["full_scans"] == 1500  # pass length unchanged
    # visits 1..1500 of each page: scanned at v = 1, 2, 3, 4, 6, 9 and 14 + 9k, else skipped
    scanned_visits = 6 + len(range(14, 1501, 9))
    assert smart["pages_skipped"] == 2 * (1500 - scanned_visits)
    assert smart["pages_scanned"] == plain["pages_scanned"] - smart["pages_skipped"]
    assert smart["pages_sharing"] == plain["pages_sharing"] == 74


def _compare(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(cwd))
    return subprocess.run([sys.executable, "-m", "lksmfs.cli", "compare", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def test_two_runs_print_the_same_json() -> None:
    args = (str(TV), "--hours", "0.05", "--policies", "lksm-periodic,ksm-smart", "--json")
    first, second = _compare(REPO, *args), _compare(REPO, *args, "--jobs", "1")
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout  # one process per policy or one for all: the same
    assert "wall" in first.stderr and "wall" not in first.stdout


@pytest.mark.parametrize("workload", ["small.yaml", "tizen-tv.yaml"])
def test_a_fresh_copy_compares_the_shipped_workloads(tmp_path: Path, workload: str) -> None:
    src = tracked_tree(REPO, tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    probe = subprocess.run([sys.executable, "-c", "import lksmfs; print(lksmfs.__file__)"], cwd=src,
                           env=dict(os.environ, PYTHONPATH=str(src)), capture_output=True, text=True, check=True)
    assert probe.stdout.startswith(str(src))  # the copy, not this checkout
    hours = 0.2
    r = _compare(src, f"config/workloads/{workload}", "--hours", str(hours), "--json",
                 "--csv", str(out / "s.csv"), "--plot", str(out / "p.png"))
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    assert data["workload"] == f"config/workloads/{workload}" and data["hours"] == hours
    assert [p["name"] for p in data["policies"]] == list(POLICIES)
    minutes = round(hours * 60)
    for p in data["policies"]:
        assert set(p) == {"name", "pages_scanned", "pages_sharing_end", "pages_sharing_mean", "samples"}
        samples = p["samples"]
        assert [s["t_s"] for s in samples] == [60 * m for m in range(minutes + 1)]  # one a minute
        assert set(samples[0]) == {"t_s", "pages_scanned", "pages_sharing"}
        scanned = [s["pages_scanned"] for s in samples]
        assert scanned == sorted(scanned) and scanned[-1] == p["pages_scanned"] > 0
        assert samples[-1]["pages_sharing"] == p["pages_sharing_end"] > 0
    by = {p["name"]: p for p in data["policies"]}
    assert by["lksm"]["pages_scanned"] < by["ksm"]["pages_scanned"]
    with open(out / "s.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["policy", "t_s", "pages_scanned", "pages_sharing"]
    assert len(rows) == 1 + len(POLICIES) * (minutes + 1)
    assert (out / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize(("args", "message"), [
    (("--policies", "ksm,uksm"), "--policies: unknown uksm"),
    (("--policies", "ksm,ksm"), "listed twice"),
    (("--hours", "0"), "--hours and --round-minutes must be positive"),
    (("--jobs", "0"), "--jobs must be at least 1"),
])
def test_bad_arguments(args: tuple[str, ...], message: str) -> None:
    r = _compare(REPO, str(SMALL), *args)
    assert r.returncode == 2 and message in r.stderr


def test_a_bad_workload_names_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("apps: [{name: a, heap: {pages: 4}, ksm: always}]\n")
    r = _compare(REPO, str(bad))
    assert r.returncode == 2
    assert f"{bad}: apps[0].ksm: expected none, prctl or a list of areas" in r.stderr


def test_idle_tv_shows_where_each_policy_shines() -> None:
    """tv-idle.yaml: static memory, mostly pages that never merge.  ksmd's scanning is
    rate-bound - 100 pages every 20 ms, 5,000 a second, 18,000,000 in an hour, less the
    part batch before each pass's sleep - with or without smart_scan, so smart_scan
    cannot lower pages_scanned over time; what it lowers is the cost of a pass: from a
    page's 5th failing visit it is skipped 1 in 2, ..., then 8 visits in 9, so on memory
    that never merges over half of a pass's pages are skipped (LTP ksm07) and passes come
    more than 3 times as often.  LKSM scans only when resourced asks (the timeline's
    one_shot requests, else a full scan per round): a few percent of ksmd's pages.  All
    three end with the same saving."""
    runs = {r.name: r for r in compare(str(REPO / "config" / "workloads" / "tv-idle.yaml"), hours=1,
                                       round_minutes=10, policies=("lksm", "ksm", "ksm-smart"), jobs=1).runs}
    ksm, smart, lksm = runs["ksm"], runs["ksm-smart"], runs["lksm"]
    assert 0.95 * 18_000_000 < ksm.pages_scanned <= 18_000_000
    assert abs(smart.pages_scanned - ksm.pages_scanned) < 0.01 * ksm.pages_scanned
    assert ksm.counters["pages_skipped"] == 0
    assert smart.counters["pages_skipped"] > smart.pages_scanned  # over half of the visits
    assert smart.counters["full_scans"] > 3 * ksm.counters["full_scans"]
    assert lksm.pages_scanned < 0.05 * ksm.pages_scanned
    assert lksm.pages_sharing_end == ksm.pages_sharing_end == smart.pages_sharing_end > 0
