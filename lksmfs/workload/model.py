"""The content model: which bytes every workload page holds, as a pure function.

Both the simulated source and the real child processes compute page contents here, so
the two realise byte-identical memory and sharing over the workload's pages agrees.
Pure Python (no numpy): a spawned child must start in a few ms of CPU so that the
short-task rule (< 100 ms) can still be exercised with real processes.

A page's content is fixed by a 64-bit key: key 0 is a zero-filled page; any other key
gives the 4096 bytes of 512 little-endian words `key ^ T[i]` (T a fixed table), so two
pages are equal iff their keys are equal.  Keys are (hash-mixed) functions of:

- shared library page:   (seed, library, data|bss, offset)
- shared heap/stack/anon page:   (seed, pool, index among the section's shared pages)
- unique page:   (seed, instance, section, offset, generation, volatile round)

Within a section, which offsets are shared, zero or unique is fixed by ranking offsets
with a hash: the first round_half_up(share * n) are shared, the next
round_half_up(zero * n) zero, the rest unique.  For libraries the ranking depends only on
(library, section), so every process has the same shared offsets: what LKSM_FILTER's
per-offset bitmaps exploit.  Volatile pages are the first round_half_up(volatile * u)
unique pages of a section (u unique pages), re-keyed every round the instance runs;
`rewrite(fraction)` re-keys round_half_up(fraction * n) pages of every section, shared
ones included (that is a broken merge, the kernel's COW break).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

from lksmfs.system.proc import PAGE_SIZE
from lksmfs.workload.schema import App, Library, Section, Workload

WORDS = PAGE_SIZE // 8
MASK = (1 << 64) - 1

# page classes
SHARED = 0
ZERO = 1
UNIQUE = 2

# section kinds, named as the LKSM_FILTER region they land in (anon: see SimulatedSource)
KINDS = ("file_data", "file_bss", "heap", "stack", "anon")

_TAG_LIB, _TAG_POOL, _TAG_UNIQUE, _TAG_CLASS, _TAG_VOL, _TAG_REWRITE, _TAG_ASLR = range(1, 8)


def splitmix64(x: int) -> int:
    """One splitmix64 step: a bijective, well-mixed 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & MASK
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def mix(*parts: int) -> int:
    """Hash a tuple of integers to 64 bits (order matters)."""
    h = 0x6C6B736D66730000  # "lksmfs"
    for p in parts:
        h = splitmix64(h ^ (p & MASK))
    return h


def name_id(name: str) -> int:
    """A stable 64-bit id for a name (hash() is salted per process: useless here)."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def round_half_up(fraction: float, n: int) -> int:
    """How many of n pages a fraction selects: the nearest integer, halves rounding up."""
    return min(n, int(math.floor(fraction * n + 0.5)))


PAGE_TABLE: tuple[int, ...] = tuple(splitmix64(0x5441424C45 + i) for i in range(WORDS))
_TABLE_INT = sum(w << (64 * i) for i, w in enumerate(PAGE_TABLE))
_REPEAT = sum(1 << (64 * i) for i in range(WORDS))  # key * _REPEAT puts key in every word
_ZERO_PAGE = bytes(PAGE_SIZE)


def page_bytes(key: int) -> bytes:
    """The 4096 bytes of the page with this key (big-int XOR: no per-word Python loop)."""
    if key == 0:
        return _ZERO_PAGE
    return ((key * _REPEAT) ^ _TABLE_INT).to_bytes(PAGE_SIZE, "little")


def _ranked(seed: int, domain: str, n: int) -> list[int]:
    d = name_id(domain)
    return sorted(range(n), key=lambda off: mix(seed, _TAG_CLASS, d, off))


@dataclass
class SectionModel:
    """One section of one instance: its page classes, shared keys and current generations."""

    sid: str  # "lib:NAME:data", "lib:NAME:bss", "heap", "stack", "anon:NAME"
    kind: str  # one of KINDS
    npages: int
    classes: list[int]
    shared_keys: list[int]  # 0 where not SHARED
    volatile: list[int]  # offsets of volatile pages (all UNIQUE)
    library: str = ""
    gen: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.gen:
            self.gen = [0] * self.npages
        self._volatile_set = frozenset(self.volatile)

    @property
    def sid_id(self) -> int:
        return name_id(self.sid)

    def count(self, cls: int) -> int:
        return sum(1 for c in self.classes if c == cls)


def _classify(seed: int, domain: str, n: int, share: float, zero: float) -> list[int]:
    ns = round_half_up(share, n)
    nz = min(n - ns, round_half_up(zero, n))
    classes = [UNIQUE] * n
    for rank, off in enumerate(_ranked(seed, domain, n)):
        if rank < ns:
            classes[off] = SHARED
        elif rank < ns + nz:
            classes[off] = ZERO
    return classes


def _volatile(seed: int, app: str, sid: str, classes: list[int], volatile: float) -> list[int]:
    unique = [off for off, c in enumerate(classes) if c == UNIQUE]
    nv = round_half_up(volatile, len(unique))
    d = name_id(f"{app}:{sid}")
    unique.sort(key=lambda off: mix(seed, _TAG_VOL, d, off))
    return sorted(unique[:nv])


def library_section(seed: int, app: App, lib: Library, which: str) -> SectionModel:
    """The .data ('data') or .bss ('bss') section of `lib` as mapped by an instance of `app`."""
    n = lib.data_pages if which == "data" else lib.bss_pages
    share, zero = (lib.share, lib.zero) if which == "data" else (lib.bss_share, lib.bss_zero)
    sid = f"lib:{lib.name}:{which}"
    classes = _classify(seed, sid, n, share, zero)  # same in every app: filter-friendly
    lid = name_id(lib.name)
    sel = 0 if which == "data" else 1
    shared = [mix(seed, _TAG_LIB, lid, sel, off) | 1 if c == SHARED else 0
              for off, c in enumerate(classes)]
    kind = "file_data" if which == "data" else "file_bss"
    return SectionModel(sid, kind, n, classes, shared, _volatile(seed, app.name, sid, classes,
                                                                   app.volatile), lib.name)


def pool_section(seed: int, app: App, sid: str, kind: str, pool: str, sec: Section) -> SectionModel:
    """A heap, stack or anon section: shared pages are pool pages 0, 1, 2... in offset order."""
    n = sec.pages
    classes = _classify(seed, f"{app.name}:{sid}", n, sec.share, sec.zero)
    pid = name_id(f"pool:{pool}")
    shared = [0] * n
    index = 0
    for off, c in enumerate(classes):
        if c == SHARED:
            shared[off] = mix(seed, _TAG_POOL, pid, index) | 1
            index += 1
    return SectionModel(sid, kind, n, classes, shared,
                        _volatile(seed, app.name, sid, classes, app.volatile))


class InstanceModel:
    """The memory of one instance (APP/K): every section, and the state that changes keys.

    `vol_round` is the round whose content the volatile pages hold (a frozen instance keeps
    its old one); `gen[off]` is the number of the last rewrite that touched a page.
    """

    def __init__(self, workload: Workload, app: App, index: int) -> None:
        self.seed = workload.seed
        self.app = app
        self.index = index
        self.name = f"{app.name}/{index}"
        self.inst_id = name_id(self.name)
        self.vol_round = 0
        self.writes = 0  # pages written so far: the fault count of a real process
        secs: list[SectionModel] = []
        for lib in workload.app_libraries(app):
            if lib.data_pages:
                secs.append(library_section(self.seed, app, lib, "data"))
            if lib.bss_pages:
                secs.append(library_section(self.seed, app, lib, "bss"))
        if app.heap.pages:
            secs.append(pool_section(self.seed, app, "heap", "heap", "heap", app.heap))
        if app.stack.pages:
            secs.append(pool_section(self.seed, app, "stack", "stack", "stack", app.stack))
        for a in app.anon:
            secs.append(pool_section(self.seed, app, f"anon:{a.name}", "anon", f"anon:{a.name}", a))
        self.sections: dict[str, SectionModel] = {s.sid: s for s in secs}
        self.writes = sum(s.npages for s in secs)

    def key(self, sec: SectionModel, off: int) -> int:
        g = sec.gen[off]
        if g == 0:
            c = sec.classes[off]
            if c == SHARED:
                return sec.shared_keys[off]
            if c == ZERO:
                return 0
        vr = self.vol_round if off in sec._volatile_set else MASK
        return mix(self.seed, _TAG_UNIQUE, self.inst_id, sec.sid_id, off, g, vr) | 1

    def keys(self, sid: str) -> list[int]:
        sec = self.sections[sid]
        return [self.key(sec, off) for off in range(sec.npages)]

    def set_round(self, rnd: int) -> dict[str, list[int]]:
        """Volatile pages take the content of round `rnd`; returns the re-keyed offsets."""
        if rnd == self.vol_round:
            return {}
        self.vol_round = rnd
        changed = {s.sid: list(s.volatile) for s in self.sections.values() if s.volatile}
        self.writes += sum(len(v) for v in changed.values())
        return changed

    def rewrite(self, fraction: float, number: int) -> dict[str, list[int]]:
        """Rewrite number `number` (>= 1): re-key round_half_up(fraction * n) pages per section."""
        if number < 1:
            raise ValueError("rewrite numbers start at 1")
        changed: dict[str, list[int]] = {}
        for sec in self.sections.values():
            k = round_half_up(fraction, sec.npages)
            if not k:
                continue
            sid_id = sec.sid_id
            offs = sorted(range(sec.npages),
                          key=lambda off: mix(self.seed, _TAG_REWRITE, self.inst_id, sid_id, off,
                                              number))[:k]
            for off in offs:
                sec.gen[off] = number
            changed[sec.sid] = sorted(offs)
            self.writes += k
        return changed


def aslr_seed(seed: int, instance: str) -> int:
    """Seed of the simulated address-space randomisation of an instance."""
    return mix(seed, _TAG_ASLR, name_id(instance))
