"""The page-pattern spec language of testkit.memchild, and what it predicts by hand.

A spec is a list of (count, pattern) runs (`Pages`); a `Region` is one mapping of a
child.  From the specs of several processes alone, `spec_groups` gives the groups of
identical pages and `expected_counts` the pages_shared/pages_sharing a KSM with a given
max_page_sharing converges to: expected values worked out from the rules, never read
back from a program.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from lksmfs.system.proc import PAGE_SIZE
from testkit.memchild import SAME_MAGIC, WORDS, header

Pattern = str | int
Pages = Sequence[tuple[int, Pattern]]
Spec = Pages  # one process's pattern mapping (the oracle's word)
GroupKey = int | tuple[str, int]


@dataclass(frozen=True)
class Region:
    """One mapping of a child: `kind` private (anonymous), shared (MAP_SHARED anonymous)
    or file (FILE mapped MAP_PRIVATE; it must be at least as long as the region).
    `madvise`: madvise(MADV_MERGEABLE) on it (VM_MERGEABLE: mainline KSM may merge it).
    `hugepage`: 2 MiB aligned and madvise(MADV_HUGEPAGE) (a child started with `thp`)."""

    name: str
    pages: Pages
    kind: str = "private"
    file: str | None = None
    madvise: bool = False
    hugepage: bool = False

    @property
    def npages(self) -> int:
        return sum(c for c, _ in self.pages)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "kind": self.kind, "pages": format_pages(self.pages)}
        if self.file is not None:
            out["file"] = self.file
        if self.madvise:
            out["madvise"] = True
        if self.hugepage:
            out["hugepage"] = True
        return out


def child_spec(regions: Iterable[Region], **options: Any) -> str:
    """The JSON spec memchild takes (options: comm, cpu_ms, merge, stop)."""
    return json.dumps({"regions": [r.to_json() for r in regions], **options})


def byte_value(pattern: Pattern) -> int:
    """A byte pattern as an int: 97, '0x61' or the one-character 'a'; 'zero' is 0."""
    if pattern == "zero":
        return 0
    if isinstance(pattern, int):
        value = pattern
    elif len(pattern) == 1:
        value = ord(pattern)
    else:
        value = int(pattern, 0)
    if not 0 <= value <= 255:
        raise ValueError(f"byte pattern out of range: {pattern!r}")
    return value


def format_pages(pages: Pages) -> str:
    """The child's form: ``64:97,8:zero,4:unique``."""
    parts = []
    for count, pattern in pages:
        if count < 0:
            raise ValueError(f"negative count {count}")
        if pattern in WORDS:
            parts.append(f"{count}:{pattern}")
        else:
            parts.append(f"{count}:{byte_value(pattern)}")
    if not parts:
        raise ValueError("empty spec")
    return ",".join(parts)


def byte_runs(values: Sequence[int]) -> list[tuple[int, Pattern]]:
    """One page per byte value, consecutive equal values as one run."""
    runs: list[tuple[int, Pattern]] = []
    for v in values:
        if runs and runs[-1][1] == v:
            runs[-1] = (runs[-1][0] + 1, v)
        else:
            runs.append((1, v))
    return runs


# ---------------------------------------------------------------- hand derivation (pure)


def group_counts(n: int, max_page_sharing: int) -> tuple[int, int]:
    """(pages_shared, pages_sharing) for `n` identical pages under ksm's max_page_sharing.

    Each KSM page (stable node, or dup of a chain) carries at most `max_page_sharing` mappings.
    Pages fill one KSM page at a time; a final lone page has nothing to merge with (its chain is
    full, and the unstable tree holds no equal page), so it stays unshared.
    """
    if max_page_sharing < 2:
        raise ValueError("max_page_sharing must be >= 2")
    if n < 2:
        return (0, 0)
    full, rest = divmod(n, max_page_sharing)
    shared = full + (1 if rest >= 2 else 0)
    sharing = full * (max_page_sharing - 1) + (rest - 1 if rest >= 2 else 0)
    return (shared, sharing)


def expected_counts(groups: Iterable[int], max_page_sharing: int) -> tuple[int, int]:
    """Sum of `group_counts` over groups of identical pages (sizes)."""
    shared = sharing = 0
    for n in groups:
        s, g = group_counts(n, max_page_sharing)
        shared += s
        sharing += g
    return (shared, sharing)


def spec_groups(specs: Iterable[Pages]) -> dict[GroupKey, int]:
    """Sizes of groups of identical *anonymous* pages across all `specs` (one per process).

    Keys: a byte value for byte patterns ('zero' is byte 0); ('same', page index) for 'same'
    pages, which equal the page at that index in every other process; 'unique' pages are in no
    group, 'read' and 'untouched' pages are not anonymous pages at all.
    """
    groups: dict[GroupKey, int] = {}
    for spec in specs:
        index = 0
        for count, pattern in spec:
            if pattern == "same":
                for i in range(index, index + count):
                    groups[("same", i)] = groups.get(("same", i), 0) + 1
            elif pattern not in ("unique", "read", "untouched") and count:
                key = byte_value(pattern)
                groups[key] = groups.get(key, 0) + count
            index += count
    return groups


def pattern_page(key: GroupKey) -> bytes:
    """The exact contents of a page of group `key` (as the child writes it)."""
    if isinstance(key, int):
        return bytes([key]) * PAGE_SIZE
    kind, index = key
    if kind != "same":
        raise ValueError(f"no fixed contents for {key!r}")
    return header(SAME_MAGIC, 0, index, 0).ljust(PAGE_SIZE, b"\0")
