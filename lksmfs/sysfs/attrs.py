"""The LKSM sysfs attribute table: name -> show/store with the kernel's validation.

This is the whole ABI of /sys/kernel/mm/ksm on an LKSM kernel (SPEC §1), without FUSE:
the FUSE adapter (lksmfs.sysfs.fuse) is a thin layer over `AttributeTable`, and the
unit tests call it directly.  Every store either applies completely or raises
`OSError(errno)` having changed nothing, as the *_store() functions of mm/lksm.c do.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from lksmfs.engine.params import (
    KSM_RUN_ONESHOT,
    LKSM_SCAN_FULL,
    LKSM_SCAN_PARTIAL,
    UINT_MAX,
)
from lksmfs.sysfs.kstrto import ParseError, kstrtobool, kstrtoint, kstrtoul

if TYPE_CHECKING:
    from lksmfs.engine.ksm import Ksm

# kernfs_fop_write_iter(): sysfs files have no atomic_write_len, so a longer write() is
# cut to its first page (PAGE_SIZE), stored, and reported as a short write of 4096 bytes
MAX_WRITE = 4096

RW = 0o644
RO = 0o444


@dataclass(frozen=True)
class Attr:
    name: str
    mode: int
    show: Callable[[], str]
    store: Callable[[bytes], None] | None = None


def _einval() -> OSError:
    return OSError(errno.EINVAL, "Invalid argument")


class AttributeTable:
    """Every attribute file, in the order ksm_attrs[] lists them.

    `lock` serialises stores against the engine threads (the kernel's ksm_thread_mutex);
    shows read the engine's published counters and never take it, so `cat` stays fast
    while the scanner is busy.  `on_store(name)` is called after every accepted store
    (the daemon wakes its threads there: the kernel's wake_up(&ksm_crawl_wait)).
    """

    def __init__(
        self,
        ksm: Ksm,
        lock: AbstractContextManager[object] | None = None,
        on_store: Callable[[str], None] | None = None,
    ) -> None:
        self.ksm = ksm
        self._lock: AbstractContextManager[object] = lock if lock is not None else contextlib.nullcontext()
        self._on_store = on_store or (lambda name: None)
        t = ksm.tunables

        def counter(key: str) -> Callable[[], str]:
            return lambda: f"{ksm.counters()[key]}\n"

        def tunable(key: str) -> Callable[[], str]:
            return lambda: f"{getattr(t, key)}\n"

        attrs = [
            Attr("sleep_millisecs", RW, tunable("sleep_millisecs"), self._uint_store("sleep_millisecs")),
            Attr("pages_to_scan", RW, tunable("pages_to_scan"), self._uint_store("pages_to_scan")),
            Attr("pages_shared", RO, counter("pages_shared")),
            Attr("pages_sharing", RO, counter("pages_sharing")),
            Attr("pages_unshared", RO, counter("pages_unshared")),
            Attr("pages_volatile", RO, counter("pages_volatile")),
            Attr("full_scans", RO, counter("full_scans")),
            Attr("run", RW, self._run_show, self._run_store),
            Attr("merge_across_nodes", RW, tunable("merge_across_nodes"), self._merge_across_nodes_store),
            Attr("max_page_sharing", RW, tunable("max_page_sharing"), self._max_page_sharing_store),
            Attr("stable_node_chains", RO, counter("stable_node_chains")),
            Attr("stable_node_dups", RO, counter("stable_node_dups")),
            Attr(
                "stable_node_chains_prune_millisecs",
                RW,
                tunable("stable_node_chains_prune_millisecs"),
                self._uint_store("stable_node_chains_prune_millisecs"),
            ),
            Attr("use_zero_pages", RW, tunable("use_zero_pages"), self._use_zero_pages_store),
            Attr("scanning_process", RO, counter("scanning_process")),
            Attr("full_scan_interval", RW, tunable("full_scan_interval"), self._uint_store("full_scan_interval")),
            Attr("one_shot_scanning", RW, tunable("one_shot_scanning"), self._one_shot_store),
            Attr("scan_boost", RW, tunable("scan_boost"), self._scan_boost_store),
            # from mainline, read-only
            Attr("pages_scanned", RO, counter("pages_scanned")),
            Attr("general_profit", RO, counter("general_profit")),
            Attr("ksm_zero_pages", RO, counter("ksm_zero_pages")),
        ]
        if ksm.filter_enabled:  # CONFIG_LKSM_FILTER
            attrs += [
                Attr("nr_regions", RO, counter("nr_regions")),
                Attr("region_share", RO, self._region_share_show),
            ]
        self._attrs = {a.name: a for a in attrs}

    # -- the table ---------------------------------------------------------------

    def names(self) -> list[str]:
        return list(self._attrs)

    def __contains__(self, name: object) -> bool:
        return name in self._attrs

    def mode(self, name: str) -> int:
        return self._get(name).mode

    def writable(self, name: str) -> bool:
        return self._get(name).store is not None

    def show(self, name: str) -> bytes:
        return self._get(name).show().encode()

    def store(self, name: str, data: bytes) -> int:
        """Apply one write() of `data`; returns the byte count consumed: all of it, or its
        first page when longer (the caller's write() then returns 4096, as on sysfs)."""
        attr = self._get(name)
        if attr.store is None:
            raise OSError(errno.EACCES, "Permission denied")
        data = data[:MAX_WRITE]
        if not data:  # sysfs_kf_write: an empty write stores nothing
            return 0
        with self._lock:
            attr.store(data)
        self._on_store(name)
        return len(data)

    def _get(self, name: str) -> Attr:
        try:
            return self._attrs[name]
        except KeyError:
            raise OSError(errno.ENOENT, "No such file or directory") from None

    # -- show/store functions, one per *_show/*_store of mm/lksm.c ----------------

    def _uint_store(self, key: str) -> Callable[[bytes], None]:
        """pages_to_scan, sleep_millisecs, full_scan_interval, *_prune_millisecs:
        kstrtoul; an error or a value above UINT_MAX is EINVAL."""

        def store(data: bytes) -> None:
            try:
                value = kstrtoul(data)
            except ParseError:
                raise _einval() from None
            if value > UINT_MAX:
                raise _einval()
            self.ksm.set_tunable(key, value)

        return store

    def _run_show(self) -> str:
        run = self.ksm.tunables.run
        return f"{KSM_RUN_ONESHOT if run & KSM_RUN_ONESHOT else run}\n"

    def _run_store(self, data: bytes) -> None:
        try:
            flags = kstrtoul(data)
        except ParseError:
            raise _einval() from None
        if flags > UINT_MAX or flags > KSM_RUN_ONESHOT:
            raise _einval()
        self.ksm.set_run(flags)

    def _merge_across_nodes_store(self, data: bytes) -> None:
        try:
            knob = kstrtoul(data)
        except ParseError as e:
            raise OSError(e.errno, errno.errorcode[e.errno]) from None
        if knob > 1:
            raise _einval()
        if knob != self.ksm.tunables.merge_across_nodes:
            if self.ksm.has_stable_nodes():
                raise OSError(errno.EBUSY, "Device or resource busy")
            self.ksm.set_tunable("merge_across_nodes", knob)

    def _max_page_sharing_store(self, data: bytes) -> None:
        try:
            knob = kstrtoint(data)
        except ParseError as e:
            raise OSError(e.errno, errno.errorcode[e.errno]) from None
        if knob < 2:
            raise _einval()
        if knob != self.ksm.tunables.max_page_sharing:
            if self.ksm.has_stable_nodes():
                raise OSError(errno.EBUSY, "Device or resource busy")
            self.ksm.set_tunable("max_page_sharing", knob)

    def _use_zero_pages_store(self, data: bytes) -> None:
        try:
            value = kstrtobool(data)
        except ParseError:
            raise _einval() from None
        self.ksm.set_tunable("use_zero_pages", int(value))

    def _one_shot_store(self, data: bytes) -> None:
        try:
            val = kstrtoint(data)
        except ParseError:
            raise _einval() from None
        if val not in (LKSM_SCAN_PARTIAL, LKSM_SCAN_FULL):
            raise _einval()
        if not self.ksm.request_one_shot(val):  # "ksm is still scanning"
            raise _einval()

    def _scan_boost_store(self, data: bytes) -> None:
        try:
            val = kstrtoint(data)
        except ParseError:
            raise _einval() from None
        if val < 100 or val > 10000:
            raise _einval()
        self.ksm.set_tunable("scan_boost", val)

    def _region_share_show(self) -> str:
        rs = self.ksm.region_share()
        return " ".join(f"{k}:{rs[k]}" for k in ("heap", "stack", "file_data", "file_bss", "conflicted")) + "\n"
