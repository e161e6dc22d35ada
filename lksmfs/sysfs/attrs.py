"""The sysfs attribute table: name -> show/store with the kernel's validation.

This is the whole ABI of /sys/kernel/mm/ksm (SPEC §1), without FUSE, for either
scheduling policy: an LKSM kernel's files (mm/lksm.c) under `lksm`, mainline's
(mm/ksm.c 6.18, the KSM advisor's files included) under `ksm`.  The FUSE adapter
(lksmfs.sysfs.fuse) is a thin layer over `AttributeTable`, and the unit tests call it
directly.  Every store either applies completely or raises `OSError(errno)` having
changed nothing, as the kernels' *_store() functions do.

Initial values (a config file's `tunables:`, `--set NAME=VALUE` of every command) take
the same path: `check_setting` runs the store against a dry-run engine, `apply_settings`
checks them all and then stores them, so a value `echo` would refuse is refused at
start, naming where it came from and why.
"""

from __future__ import annotations

import contextlib
import errno
from collections.abc import Callable, Iterable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from lksmfs.engine.advisor import ADVISOR_MODES, KSM_ADVISOR_NONE, mode_show
from lksmfs.engine.params import (
    KSM_RUN_ONESHOT,
    KSM_RUN_UNMERGE,
    LKSM_SCAN_FULL,
    LKSM_SCAN_PARTIAL,
    POLICIES,
    POLICY_KSM,
    POLICY_LKSM,
    UINT_MAX,
    ULONG_MAX,
    Tunables,
)
from lksmfs.sysfs.kstrto import ParseError, kstrtobool, kstrtoint, kstrtoul, sysfs_streq

# kernfs_fop_write_iter(): sysfs files have no atomic_write_len, so a longer write() is
# cut to its first page (PAGE_SIZE), stored, and reported as a short write of 4096 bytes
MAX_WRITE = 4096
REGIONS = ("heap", "stack", "file_data", "file_bss", "conflicted")  # region_share's order

RW = 0o644
RO = 0o444


@dataclass(frozen=True)
class Attr:
    name: str
    mode: int
    show: Callable[[], str]
    store: Callable[[bytes], None] | None = None


class AttributeEngine(Protocol):
    """What the attribute files read and write of an engine: the facade of
    lksmfs.engine.ksm.Ksm, and of the stand-ins that validate values without one."""

    @property
    def tunables(self) -> Tunables: ...

    @property
    def filter_enabled(self) -> bool: ...

    @property
    def policy(self) -> str: ...

    def counters(self) -> Mapping[str, int]: ...

    def region_share(self) -> Mapping[str, int]: ...

    def has_stable_nodes(self) -> bool: ...

    def set_tunable(self, name: str, value: int) -> None: ...

    def set_run(self, flags: int) -> None: ...

    def request_one_shot(self, mode: int) -> bool: ...


E_co = TypeVar("E_co", bound=AttributeEngine, covariant=True)


# The files, in the order each kernel's ksm_attrs[] lists them.  LKSM (mm/lksm.c), with
# mainline's pages_scanned, general_profit and ksm_zero_pages read-only at the end:
LKSM_FILES = (
    "sleep_millisecs", "pages_to_scan", "pages_shared", "pages_sharing", "pages_unshared",
    "pages_volatile", "full_scans", "run", "merge_across_nodes", "max_page_sharing",
    "stable_node_chains", "stable_node_dups", "stable_node_chains_prune_millisecs",
    "use_zero_pages", "scanning_process", "full_scan_interval", "one_shot_scanning", "scan_boost",
    "pages_scanned", "general_profit", "ksm_zero_pages",
)
LKSM_FILTER_FILES = ("nr_regions", "region_share")  # CONFIG_LKSM_FILTER
# Mainline (mm/ksm.c 6.18; merge_across_nodes as with CONFIG_NUMA), with the KSM
# advisor's files (6.7+): no run=8, no LKSM file.
KSM_ADVISOR_FILES = (
    "advisor_mode", "advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
)
KSM_FILES = (
    "sleep_millisecs", "pages_to_scan", "run", "pages_scanned", "pages_shared", "pages_sharing",
    "pages_unshared", "pages_volatile", "pages_skipped", "ksm_zero_pages", "full_scans",
    "merge_across_nodes", "max_page_sharing", "stable_node_chains", "stable_node_dups",
    "stable_node_chains_prune_millisecs", "use_zero_pages", "general_profit", "smart_scan",
) + KSM_ADVISOR_FILES


def _einval() -> OSError:
    return OSError(errno.EINVAL, "Invalid argument")


class AttributeTable(Generic[E_co]):
    """Every attribute file of the engine's policy, in the order its ksm_attrs[] lists
    them (mm/lksm.c for `lksm`, mm/ksm.c for `ksm`).

    `lock` serialises stores against the engine threads (the kernel's ksm_thread_mutex);
    shows read the engine's published counters and never take it, so `cat` stays fast
    while the scanner is busy.  `on_store(name)` is called after every accepted store
    (the daemon wakes its threads there: the kernel's wake_up(&ksm_crawl_wait)).
    """

    def __init__(
        self,
        ksm: E_co,
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

        stores: dict[str, Callable[[bytes], None]] = {
            "sleep_millisecs": self._uint_store("sleep_millisecs"),
            "pages_to_scan": self._uint_store("pages_to_scan"),
            "run": self._run_store,
            "merge_across_nodes": self._merge_across_nodes_store,
            "max_page_sharing": self._max_page_sharing_store,
            "stable_node_chains_prune_millisecs": self._uint_store("stable_node_chains_prune_millisecs"),
            "use_zero_pages": self._bool_store("use_zero_pages"),
            "full_scan_interval": self._uint_store("full_scan_interval"),
            "one_shot_scanning": self._one_shot_store,
            "scan_boost": self._scan_boost_store,
            "smart_scan": self._bool_store("smart_scan"),
            "advisor_mode": self._advisor_mode_store,
            "advisor_max_cpu": self._ulong_store("advisor_max_cpu", UINT_MAX),
            "advisor_min_pages_to_scan": self._ulong_store("advisor_min_pages_to_scan"),
            "advisor_max_pages_to_scan": self._ulong_store("advisor_max_pages_to_scan"),
            "advisor_target_scan_time": self._ulong_store("advisor_target_scan_time", least=1),
        }
        shows = {"run": self._run_show, "region_share": self._region_share_show,
                 "advisor_mode": lambda: mode_show(t.advisor_mode) + "\n"}
        names: tuple[str, ...]
        if ksm.policy == POLICY_KSM:
            names = KSM_FILES
        else:
            names = LKSM_FILES + (LKSM_FILTER_FILES if ksm.filter_enabled else ())  # CONFIG_LKSM_FILTER
        self._attrs = {
            name: Attr(name, RW, shows.get(name, tunable(name)), stores[name]) if name in stores
            else Attr(name, RO, shows.get(name, counter(name)))
            for name in names
        }

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

    def values(self) -> dict[str, int | dict[str, int]]:
        """Every file's value as `cat` would show it, parsed: ints, region_share as
        {region: pages}, advisor_mode as its number (0 none, 1 scan-time)."""
        out: dict[str, int | dict[str, int]] = {}
        for name in self.names():
            text = self.show(name).decode().strip()
            if name == "region_share":
                out[name] = {k: int(v) for k, v in (kv.split(":") for kv in text.split())}
            elif name == "advisor_mode":  # the bracketed word, as enum ksm_advisor_type
                out[name] = ADVISOR_MODES.index(text[text.index("[") + 1 : text.index("]")])
            else:
                out[name] = int(text)
        return out

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
        kstrtoul; an error or a value above UINT_MAX is EINVAL.  pages_to_scan is EINVAL
        whatever the value while the KSM advisor tunes it (mainline's
        pages_to_scan_store() checks that first)."""

        def store(data: bytes) -> None:
            if key == "pages_to_scan" and self.ksm.tunables.advisor_mode != KSM_ADVISOR_NONE:
                raise _einval()
            try:
                value = kstrtoul(data)
            except ParseError:
                raise _einval() from None
            if value > UINT_MAX:
                raise _einval()
            self.ksm.set_tunable(key, value)

        return store

    def _ulong_store(self, key: str, mask: int = ULONG_MAX, least: int = 0) -> Callable[[bytes], None]:
        """The advisor's numbers (advisor_*_store()): kstrtoul, an error is EINVAL, and so
        is a value below `least` (target_scan_time: 1).  advisor_max_cpu is an unsigned
        int the unsigned long is stored into: its low 32 bits (`mask`)."""

        def store(data: bytes) -> None:
            try:
                value = kstrtoul(data)
            except ParseError:
                raise _einval() from None
            if value < least:
                raise _einval()
            self.ksm.set_tunable(key, value & mask)

        return store

    def _advisor_mode_store(self, data: bytes) -> None:
        """advisor_mode_store(): sysfs_streq() against `scan-time` and `none` (one
        trailing newline allowed); a change sets the advisor's defaults (the engine)."""
        for mode, name in enumerate(ADVISOR_MODES):
            if sysfs_streq(data, name):
                self.ksm.set_tunable("advisor_mode", mode)
                return
        raise _einval()

    def _run_show(self) -> str:
        run = self.ksm.tunables.run
        return f"{KSM_RUN_ONESHOT if run & KSM_RUN_ONESHOT else run}\n"

    def _run_store(self, data: bytes) -> None:
        """run_store(): LKSM takes up to 8 (one-shot), mainline up to 2 (unmerge)."""
        try:
            flags = kstrtoul(data)
        except ParseError:
            raise _einval() from None
        top = KSM_RUN_UNMERGE if self.ksm.policy == POLICY_KSM else KSM_RUN_ONESHOT
        if flags > UINT_MAX or flags > top:
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

    def _bool_store(self, key: str) -> Callable[[bytes], None]:
        """use_zero_pages, smart_scan: kstrtobool; anything else is EINVAL."""

        def store(data: bytes) -> None:
            try:
                value = kstrtobool(data)
            except ParseError:
                raise _einval() from None
            self.ksm.set_tunable(key, int(value))

        return store

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
        return " ".join(f"{k}:{rs[k]}" for k in REGIONS) + "\n"


# -- initial values ----------------------------------------------------------------------

# Writable attributes in the order initial values are applied: every plain tunable first,
# then `run` (the threads start scanning with the final values), then a one-shot request,
# which only makes sense once the mode is set.
SETTING_ORDER = (
    "pages_to_scan",
    "sleep_millisecs",
    "scan_boost",
    "full_scan_interval",
    "max_page_sharing",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
    "merge_across_nodes",
    "run",
    "one_shot_scanning",
)
# the same for mainline's files (policy `ksm`)
KSM_SETTING_ORDER = (
    "advisor_max_cpu",
    "advisor_min_pages_to_scan",
    "advisor_max_pages_to_scan",
    "advisor_target_scan_time",
    "pages_to_scan",
    "sleep_millisecs",
    "max_page_sharing",
    "stable_node_chains_prune_millisecs",
    "use_zero_pages",
    "merge_across_nodes",
    "smart_scan",
    "advisor_mode",  # after pages_to_scan (not writable while the advisor is on)
    "run",
)


def setting_order(policy: str = POLICY_LKSM) -> tuple[str, ...]:
    """The writable attributes of `policy` in the order initial values are applied."""
    return KSM_SETTING_ORDER if policy == POLICY_KSM else SETTING_ORDER


# Human words for what the stores refuse (they only say EINVAL/ERANGE/EBUSY).
_RULES = {
    "run": "must be an integer 0..8 (0 stop, 1 merge, 2 unmerge, 8 one-shot)",
    "pages_to_scan": "must be an unsigned integer <= 4294967295",
    "sleep_millisecs": "must be an unsigned integer <= 4294967295",
    "full_scan_interval": "must be an unsigned integer <= 4294967295",
    "stable_node_chains_prune_millisecs": "must be an unsigned integer <= 4294967295",
    "scan_boost": "must be 100..10000",
    "max_page_sharing": "must be an integer >= 2",
    "use_zero_pages": "must be 0 or 1",
    "merge_across_nodes": "must be 0 or 1",
    "one_shot_scanning": "must be 0 (no request), 1 (partial) or 2 (full)",
    "smart_scan": "must be 0 or 1",
    "advisor_mode": "must be none or scan-time",
    "advisor_max_cpu": "must be an unsigned integer <= 18446744073709551615",
    "advisor_min_pages_to_scan": "must be an unsigned integer <= 18446744073709551615",
    "advisor_max_pages_to_scan": "must be an unsigned integer <= 18446744073709551615",
    "advisor_target_scan_time": "must be an unsigned integer 1..18446744073709551615",
}
# what the same names mean under policy `ksm` where they differ
_KSM_RULES = {
    "run": "must be an integer 0..2 (0 stop, 1 merge, 2 unmerge)",
}


class SettingError(ValueError):
    """A refused initial value: the message says where it came from, why, and the value."""


class DryRunEngine:
    """Just enough of an engine for the stores to validate a value: it records what a
    store would apply instead of applying it (no engine, no memory source needed)."""

    filter_enabled = True

    def __init__(self, policy: str = POLICY_LKSM) -> None:
        if policy not in POLICIES:
            raise SettingError(f"policy: must be one of {', '.join(POLICIES)} (got {policy!r})")
        self.policy = policy
        self.tunables = Tunables()
        self.applied: dict[str, int] = {}

    def set_tunable(self, name: str, value: int) -> None:
        self.applied[name] = value

    def set_run(self, flags: int) -> None:
        self.applied["run"] = flags

    def request_one_shot(self, mode: int) -> bool:
        self.applied["one_shot_scanning"] = mode
        return True

    def has_stable_nodes(self) -> bool:
        return False

    def counters(self) -> dict[str, int]:
        return {}

    def region_share(self) -> dict[str, int]:
        return {}


def writable_names(policy: str = POLICY_LKSM) -> list[str]:
    """The writable attribute files of `policy`, in the table's order."""
    table = AttributeTable(DryRunEngine(policy))
    return [n for n in table.names() if table.writable(n)]


def _rule(name: str, policy: str) -> str:
    if policy == POLICY_KSM and name in _KSM_RULES:
        return _KSM_RULES[name]
    return _RULES.get(name, "invalid value")


def check_setting(name: str, raw: str | int, where: str, policy: str = POLICY_LKSM) -> int:
    """The value `echo RAW > NAME` would store under `policy`, or
    SettingError("WHERE: reason (got RAW)").  `one_shot_scanning` 0 means "no request"
    (the file itself refuses 0)."""
    dry = DryRunEngine(policy)
    table = AttributeTable(dry)
    if name not in table or not table.writable(name):
        what = "unknown attribute" if name not in table else "read-only attribute"
        other = [p for p in POLICIES if p != policy and name in writable_names(p)]
        if other:
            what = f"not a file under policy {policy} (only under policy {other[0]})"
        raise SettingError(f"{where}: {what} (writable ones: {', '.join(sorted(writable_names(policy)))})")
    if isinstance(raw, bool):
        raise SettingError(f"{where}: {_rule(name, policy) if name in _RULES else 'must be an integer'} (got {raw})")
    if name == "one_shot_scanning" and str(raw).strip() == "0":
        return 0
    text = setting_text(name, raw)
    try:
        table.store(name, text.encode("utf-8", "surrogateescape") + b"\n")
    except OSError as e:
        reason = _rule(name, policy)
        if e.errno == errno.ERANGE:
            reason += ", out of range"
        raise SettingError(f"{where}: {reason} (got {text})") from None
    # an unchanged value is accepted without a call (max_page_sharing, merge_across_nodes)
    return int(dry.applied.get(name, getattr(dry.tunables, name)))


def setting_text(name: str, value: str | int) -> str:
    """What to write to NAME for a value: advisor_mode's number is written as its word
    (the engine keeps enum ksm_advisor_type; the file takes `none` or `scan-time`)."""
    if name == "advisor_mode" and isinstance(value, int) and 0 <= value < len(ADVISOR_MODES):
        return ADVISOR_MODES[value]
    return str(value)


def parse_set(items: Iterable[str], policy: str = POLICY_LKSM) -> dict[str, int]:
    """`--set NAME=VALUE ...` -> {name: value}, each checked as a write to NAME would be
    under `policy`."""
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise SettingError(f"--set {item}: expected NAME=VALUE")
        out[name] = check_setting(name, value.strip(), f"--set {item}", policy)
    return out


def apply_settings(
    table: AttributeTable[AttributeEngine],
    values: Mapping[str, int | str],
    where: Callable[[str], str] = str,
) -> None:
    """Store initial values through the table, exactly as `echo VALUE > NAME` would, in
    SETTING_ORDER.  Every value is checked first (a bad one raises SettingError before
    anything is stored); one_shot_scanning 0 is no request, and a value the engine
    already has is not stored again.  `where(name)` says where a value came from.  The
    engine's policy says which files exist."""
    policy = table.ksm.policy
    order = setting_order(policy)
    for name in values:
        if name not in order:
            check_setting(name, values[name], where(name), policy)  # raises: unknown or read-only
    checked = {n: check_setting(n, values[n], where(n), policy) for n in order if n in values}
    for name, value in checked.items():
        if name == "one_shot_scanning" and value == 0:
            continue
        if name != "run" and getattr(table.ksm.tunables, name) == value:
            continue
        try:
            table.store(name, f"{setting_text(name, value)}\n".encode())
        except OSError as e:
            raise SettingError(f"{where(name)}: refused by the engine: {e.strerror} (got {value})") from None
