"""A workload app's mainline KSM opt-in (`ksm: none|prctl|[areas]`): validated with the
file and key, and realised by the simulated source as the mappings' VM_MERGEABLE - what
the `ksm` policy scans."""

from __future__ import annotations

from typing import Any

import pytest

from lksmfs.engine.ksm import Ksm
from lksmfs.sysfs.fuse import ksm_stat_text
from lksmfs.workload.schema import WorkloadError, parse_workload
from lksmfs.workload.simulated import SimulatedSource

LIBS = [{"name": "libx.so", "data_pages": 3, "bss_pages": 2, "share": 1.0, "bss_share": 1.0}]


def workload(**app: Any) -> dict[str, Any]:
    base = {"name": "a", "count": 2, "libraries": ["libx.so"], "heap": {"pages": 4, "share": 1.0},
            "stack": {"pages": 2, "share": 1.0}, "anon": [{"name": "gpu", "pages": 5, "share": 1.0}]}
    return {"seed": 3, "libraries": LIBS, "apps": [{**base, **app}]}


@pytest.mark.parametrize(("value", "message"), [
    ("always", "w.yaml: apps[0].ksm: expected none, prctl or a list of areas to madvise (heap, stack, data, "
               "bss, gpu), got 'always'"),
    ([], "w.yaml: apps[0].ksm: expected none, prctl or a list"),
    (["heap", "gpu2"], "w.yaml: apps[0].ksm[1]: unknown area 'gpu2' (allowed: heap, stack, data, bss, gpu)"),
    (["bss", "bss"], "w.yaml: apps[0].ksm[1]: area 'bss' listed twice"),
])
def test_bad_opt_ins_name_file_and_key(value: object, message: str) -> None:
    with pytest.raises(WorkloadError) as ei:
        parse_workload(workload(ksm=value), "w.yaml")
    assert str(ei.value) == message or str(ei.value).startswith(message)


def mainline_pages(ksm: object) -> tuple[int, int]:
    """(pages the ksm policy tracks, pages it saves) after two passes: 2 instances of
    heap 4, stack 2, gpu 5, .data 3, .bss 2 - all shared - so a madvised area of n pages
    per instance gives 2n items and n sharing."""
    c = mainline_engine(ksm).counters()
    return c["rmap_items"], c["pages_sharing"]


def mainline_engine(ksm: object) -> Ksm:
    """The ksm policy after two passes over the workload's two instances."""
    engine = Ksm(SimulatedSource(parse_workload(workload(ksm=ksm), "w.yaml")), policy="ksm")
    engine.tunables.smart_scan = 0
    engine.full_scan()
    engine.full_scan()
    return engine


@pytest.mark.parametrize(("ksm", "pages"), [
    ("none", 0),
    ("prctl", 4 + 2 + 5 + 3 + 2),
    (["heap"], 4),
    (["gpu", "stack"], 5 + 2),
    (["data", "bss"], 3 + 2),
])
def test_only_what_the_app_opted_in_is_scanned(ksm: object, pages: int) -> None:
    assert mainline_pages(ksm) == (2 * pages, pages)


def test_the_opt_in_round_trips_and_lksm_ignores_it() -> None:
    w = parse_workload(workload(ksm=["heap", "gpu"]), "w.yaml")
    assert w.apps[0].ksm == ("heap", "gpu")
    assert parse_workload(w.to_dict(), "again").apps[0].ksm == ("heap", "gpu")
    assert parse_workload(workload(), "w.yaml").apps[0].ksm == "none"
    # LKSM's ksm_join takes every app: 2 x 16 pages, all of them shared
    engine = Ksm(SimulatedSource(parse_workload(workload(ksm="none"), "w.yaml")), filter_enabled=False)
    engine.full_scan()
    engine.full_scan()
    assert engine.counters()["pages_sharing"] == 16


@pytest.mark.parametrize(("ksm", "pages", "merge_any"), [("prctl", 16, "yes"), (["heap", "gpu"], 9, "no")])
def test_per_process_ksm_stat_of_simulated_processes(ksm: object, pages: int, merge_any: str) -> None:
    """Each instance's ksm_stat under the ksm policy, as the kernel's six lines: its
    opted-in pages all have an rmap_item and all merge (the two instances are alike), so
    profit = pages * 4096 - pages * 64; merge_any says prctl, mergeable a VM_MERGEABLE
    mapping."""
    rows = mainline_engine(ksm).per_process()
    assert len(rows) == 2
    for row in rows:
        assert ksm_stat_text(row) == (
            f"ksm_rmap_items {pages}\nksm_zero_pages 0\nksm_merging_pages {pages}\n"
            f"ksm_process_profit {pages * 4096 - pages * 64}\nksm_merge_any: {merge_any}\nksm_mergeable: yes\n")
