"""AttributeTable rules, without FUSE: what each *_store of mm/lksm.c accepts and refuses.

The engine is a recording stand-in (only the rule is under test).  Expected values come
from the kernel's rules: kstrtoul/kstrtoint/kstrtobool (5.4 lib/kstrtox.c) in base 10,
then each store's own range check.
"""

from __future__ import annotations

import errno
import threading
from contextlib import AbstractContextManager
from typing import Any

import pytest

from lksmfs.engine.params import Tunables
from lksmfs.sysfs.attrs import MAX_WRITE, RO, RW, AttributeTable

COUNTERS = (
    "pages_shared pages_sharing pages_unshared pages_volatile full_scans stable_node_chains "
    "stable_node_dups scanning_process nr_regions pages_scanned general_profit ksm_zero_pages "
    "rmap_items"
).split()

WRITABLE = {
    "sleep_millisecs",
    "pages_to_scan",
    "run",
    "merge_across_nodes",
    "max_page_sharing",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
    "full_scan_interval",
    "one_shot_scanning",
    "scan_boost",
}


class RecordingKsm:
    """Records every engine call a store makes; counters are distinct known numbers."""

    def __init__(self, *, filter_enabled: bool = True, stable: bool = False, policy: str = "lksm") -> None:
        self.filter_enabled = filter_enabled
        self.policy = policy
        self.tunables = Tunables()
        self.stable = stable
        self.calls: list[tuple[str, Any]] = []
        self.values = {name: 1000 + i for i, name in enumerate(COUNTERS)}

    def counters(self) -> dict[str, int]:
        return dict(self.values)

    def region_share(self) -> dict[str, int]:
        return {"heap": 11, "stack": 0, "file_data": 7, "file_bss": 3, "conflicted": 1}

    def set_tunable(self, name: str, value: int) -> None:
        self.calls.append((name, value))
        setattr(self.tunables, name, value)

    def set_run(self, flags: int) -> None:
        self.calls.append(("run", flags))
        self.tunables.run = flags

    def request_one_shot(self, mode: int) -> bool:
        self.calls.append(("one_shot", mode))
        if self.tunables.one_shot_scanning:
            return False
        self.tunables.one_shot_scanning = mode
        return True

    def has_stable_nodes(self) -> bool:
        return self.stable


def table(**kw: Any) -> tuple[AttributeTable, RecordingKsm]:
    ksm = RecordingKsm(**kw)
    return AttributeTable(ksm), ksm


def refused(t: AttributeTable, name: str, data: bytes) -> int:
    with pytest.raises(OSError) as ei:
        t.store(name, data)
    assert ei.value.errno is not None
    return ei.value.errno


# -- the table --


def test_names_modes_and_filter_files() -> None:
    t, _ = table()
    names = t.names()
    assert set(names) >= WRITABLE | {"pages_shared", "full_scans", "nr_regions", "region_share"}
    for name in names:
        assert t.mode(name) == (RW if name in WRITABLE else RO), name
        assert t.writable(name) == (name in WRITABLE)
    off, _ = table(filter_enabled=False)
    assert "nr_regions" not in off.names() and "region_share" not in off.names()
    assert set(t.names()) - set(off.names()) == {"nr_regions", "region_share"}


def test_unknown_name_is_enoent() -> None:
    t, _ = table()
    with pytest.raises(OSError) as ei:
        t.show("nope")
    assert ei.value.errno == errno.ENOENT


def test_counter_and_tunable_shows() -> None:
    t, ksm = table()
    assert t.show("pages_sharing") == b"%d\n" % ksm.values["pages_sharing"]
    assert t.show("general_profit") == b"%d\n" % ksm.values["general_profit"]
    assert t.show("pages_to_scan") == b"100\n"
    assert t.show("sleep_millisecs") == b"20\n"
    assert t.show("max_page_sharing") == b"256\n"
    assert t.show("region_share") == b"heap:11 stack:0 file_data:7 file_bss:3 conflicted:1\n"


@pytest.mark.parametrize(("run", "shown"), [(0, b"0\n"), (1, b"1\n"), (2, b"2\n"), (9, b"8\n")])
def test_run_shows_oneshot_as_8(run: int, shown: bytes) -> None:
    t, ksm = table()
    ksm.tunables.run = run  # one-shot is stored as merge|oneshot
    assert t.show("run") == shown


def test_read_only_store_is_eacces_and_no_call() -> None:
    t, ksm = table()
    assert refused(t, "pages_sharing", b"1\n") == errno.EACCES
    assert ksm.calls == []


def test_oversized_write_stores_its_first_page() -> None:
    """kernfs_fop_write_iter() cuts a longer write to PAGE_SIZE (measured on 6.18:
    write(pages_to_scan, "102\\n" + 5000 NULs) returns 4096 and stores 102)."""
    t, ksm = table()
    exactly = b"1" + b"\0" * (MAX_WRITE - 1)  # a page is allowed; the NUL ends the string
    assert t.store("pages_to_scan", exactly) == MAX_WRITE
    assert ksm.calls == [("pages_to_scan", 1)]
    ksm.calls.clear()
    assert t.store("pages_to_scan", b"102\n" + b"\0" * 5000) == MAX_WRITE
    # the page ends inside the digits: 4093 zeros then "106" parse, "junk" is never seen
    assert t.store("pages_to_scan", b"0" * (MAX_WRITE - 3) + b"106" + b"junk") == MAX_WRITE
    assert ksm.calls == [("pages_to_scan", 102), ("pages_to_scan", 106)]
    ksm.calls.clear()
    # what is in the first page still has to parse: digits then spaces are EINVAL
    assert refused(t, "pages_to_scan", b"101" + b" " * 5000) == errno.EINVAL
    assert ksm.calls == [] and ksm.tunables.pages_to_scan == 106


def test_empty_write_stores_nothing() -> None:
    t, ksm = table()
    assert t.store("run", b"") == 0
    assert ksm.calls == []


# -- unsigned tunables (kstrtoul, <= UINT_MAX) --


@pytest.mark.parametrize(
    ("data", "value"),
    [(b"0", 0), (b"5\n", 5), (b"+7", 7), (b"4294967295", 2**32 - 1), (b"12\0junk", 12)],
)
def test_uint_store_accepts(data: bytes, value: int) -> None:
    t, ksm = table()
    assert t.store("pages_to_scan", data) == len(data)
    assert ksm.calls == [("pages_to_scan", value)]


@pytest.mark.parametrize(
    "data",
    [b"4294967296", b"99999999999999999999999", b"-1", b" 5", b"5 ", b"5\n\n", b"0x10", b"abc",
     b"\n", b"+", b"\0"],
)
def test_uint_store_refuses_with_einval(data: bytes) -> None:
    t, ksm = table()
    for name in ("pages_to_scan", "sleep_millisecs", "full_scan_interval",
                 "stable_node_chains_prune_millisecs"):
        assert refused(t, name, data) == errno.EINVAL, (name, data)
    assert ksm.calls == []


# -- run --


@pytest.mark.parametrize("flags", [0, 1, 2, 3, 4, 8])
def test_run_accepts_up_to_8(flags: int) -> None:
    t, ksm = table()
    t.store("run", b"%d\n" % flags)
    assert ksm.calls == [("run", flags)]


@pytest.mark.parametrize("data", [b"9", b"16", b"-1", b"1.0", b"one", b"18446744073709551616"])
def test_run_refuses(data: bytes) -> None:
    t, ksm = table()
    assert refused(t, "run", data) == errno.EINVAL
    assert ksm.calls == [] and ksm.tunables.run == 0


# -- one_shot_scanning --


def test_one_shot_accepts_1_and_2_when_idle() -> None:
    t, ksm = table()
    t.store("one_shot_scanning", b"2\n")
    assert ksm.calls == [("one_shot", 2)]
    assert t.show("one_shot_scanning") == b"2\n"


@pytest.mark.parametrize("data", [b"0", b"3", b"7", b"-1", b"-2", b"x", b"1 ", b"2147483648"])
def test_one_shot_refuses_other_values(data: bytes) -> None:
    t, ksm = table()
    assert refused(t, "one_shot_scanning", data) == errno.EINVAL
    assert ksm.calls == []


def test_one_shot_while_pending_is_einval() -> None:
    t, ksm = table()
    t.store("one_shot_scanning", b"1")
    assert refused(t, "one_shot_scanning", b"2") == errno.EINVAL  # "ksm is still scanning"
    assert ksm.tunables.one_shot_scanning == 1


# -- scan_boost (kstrtoint, 100..10000) --


@pytest.mark.parametrize(("data", "ok"), [
    (b"100", True), (b"10000\n", True), (b"+250", True), (b"99", False), (b"10001", False),
    (b"-100", False), (b"0", False), (b"", None),
])
def test_scan_boost_range(data: bytes, ok: bool | None) -> None:
    t, ksm = table()
    if ok is None:
        assert t.store("scan_boost", data) == 0 and ksm.calls == []
    elif ok:
        t.store("scan_boost", data)
        assert ksm.calls == [("scan_boost", int(data))]
    else:
        assert refused(t, "scan_boost", data) == errno.EINVAL
        assert ksm.calls == []


# -- max_page_sharing (kstrtoint errors pass through, < 2 EINVAL, EBUSY with stable nodes) --


def test_max_page_sharing_rules() -> None:
    t, ksm = table()
    assert refused(t, "max_page_sharing", b"1") == errno.EINVAL
    assert refused(t, "max_page_sharing", b"-5") == errno.EINVAL
    assert refused(t, "max_page_sharing", b"2147483648") == errno.ERANGE  # kstrtoint overflow
    assert refused(t, "max_page_sharing", b"abc") == errno.EINVAL
    t.store("max_page_sharing", b"2\n")
    assert ksm.calls == [("max_page_sharing", 2)]


def test_max_page_sharing_busy_only_when_changing() -> None:
    t, ksm = table(stable=True)
    assert refused(t, "max_page_sharing", b"300") == errno.EBUSY
    t.store("max_page_sharing", b"256")  # same value: accepted, nothing to do
    assert ksm.calls == []


# -- merge_across_nodes / use_zero_pages --


def test_merge_across_nodes_rules() -> None:
    t, ksm = table()
    assert refused(t, "merge_across_nodes", b"2") == errno.EINVAL
    assert refused(t, "merge_across_nodes", b"99999999999999999999") == errno.ERANGE
    t.store("merge_across_nodes", b"0")
    assert ksm.calls == [("merge_across_nodes", 0)]
    busy, bk = table(stable=True)
    assert refused(busy, "merge_across_nodes", b"0") == errno.EBUSY
    busy.store("merge_across_nodes", b"1")  # unchanged: no EBUSY
    assert bk.calls == []


@pytest.mark.parametrize(("data", "value"), [
    (b"1", 1), (b"y", 1), (b"Yes", 1), (b"on", 1), (b"ON\n", 1), (b"1junk", 1),
    (b"0", 0), (b"n", 0), (b"No", 0), (b"off", 0), (b"oF", 0),
])
def test_use_zero_pages_kstrtobool(data: bytes, value: int) -> None:
    t, ksm = table()
    t.store("use_zero_pages", data)
    assert ksm.calls == [("use_zero_pages", value)]


@pytest.mark.parametrize("data", [b"o", b"ox", b"2", b"t", b"true", b" 1", b"\0", b"-1"])
def test_use_zero_pages_refuses(data: bytes) -> None:
    t, ksm = table()
    assert refused(t, "use_zero_pages", data) == errno.EINVAL
    assert ksm.calls == []


# -- lock and wake-up --


class CountingLock(AbstractContextManager[object]):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.entered = 0

    def __enter__(self) -> object:
        self.lock.acquire()
        self.entered += 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.lock.release()


def test_store_takes_lock_and_wakes_only_on_success() -> None:
    ksm = RecordingKsm()
    lock = CountingLock()
    woken: list[str] = []
    t = AttributeTable(ksm, lock=lock, on_store=woken.append)
    t.store("sleep_millisecs", b"0\n")
    assert lock.entered == 1 and woken == ["sleep_millisecs"]
    with pytest.raises(OSError):
        t.store("sleep_millisecs", b"x")
    assert woken == ["sleep_millisecs"]
    assert not lock.lock.locked()  # released on the error path too
    assert lock.entered == 2  # a refused store holds the lock while checking too
    t.show("pages_sharing")
    t.show("run")
    assert lock.entered == 2  # shows never take the lock


def test_minus_plus_is_not_a_number() -> None:
    """kstrtoll hands the text after '-' to _kstrtoull, which takes no '+'."""
    t, ksm = table()
    assert refused(t, "max_page_sharing", b"-+99999999999") == errno.EINVAL  # not ERANGE
    assert ksm.calls == []
