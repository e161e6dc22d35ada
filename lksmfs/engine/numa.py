"""merge_across_nodes = 0: one stable and one unstable tree per NUMA node (mm/ksm.c).

With merge_across_nodes 0 the kernel looks a page up in the trees of its own node
(root_stable_tree[NUMA(get_kpfn_nid())], root_unstable_tree[NUMA(page_to_nid())]) and
never merges pages of two nodes, so each node has its own KSM page of a content, its
own chains and dups.  The engine keys both trees by a page's digest; here the page's
node becomes part of that key: `fold_nodes` mixes the node id into the digests of pages
on nodes other than 0, where the scanner forms them (Scanner._read_digests), so two
pages of different nodes never have equal digests, never meet in either tree and are
never compared byte for byte - every counter then counts per node as the kernel's do.
Node 0 keeps its digests (a one-node machine is unchanged), and so does a zero-filled
page while use_zero_pages is on (the zero page is merged with wherever the page is).

Each page's node comes from the source (`NodeSource.page_nodes`): move_pages(2) for real
processes (lksmfs.system.numa), the workload for simulated ones; -1 (unknown) counts as 0.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from lksmfs.engine.pages import HI_MASK, Digest
from lksmfs.sources.base import TaskId, inner_source

_MIX_LO = np.uint64(0x9E3779B97F4A7C15)  # odd multipliers: distinct nodes, distinct keys
_MIX_HI = np.uint64(0xC2B2AE3D27D4EB4F)


@runtime_checkable
class NodeSource(Protocol):
    """A MemorySource that knows the NUMA node of each present page."""

    def page_nodes(self, task: TaskId, vpns: np.ndarray) -> np.ndarray:
        """The node of each page (int), -1 where it cannot tell."""
        ...


def node_source(source: object) -> NodeSource | None:
    """The node-aware source under the engine's."""
    return inner_source(source, NodeSource)  # type: ignore[type-abstract]  # a protocol: isinstance only


def fold_nodes(lo: np.ndarray, hi: np.ndarray, nodes: np.ndarray,
               keep_zero: Digest | None) -> tuple[np.ndarray, np.ndarray]:
    """The digests as per-node tree keys: pages on node n > 0 get n mixed in (a zero page,
    told by the engine's digest `keep_zero`, keeps its digest: use_zero_pages merges it
    with the zero page)."""
    on = nodes > 0
    if keep_zero is not None:
        on &= ~keep_zero.is_zero(lo, hi)
    if not on.any():
        return lo, hi
    n = nodes[on].astype(np.uint64)
    lo, hi = lo.copy(), hi.copy()
    lo[on] ^= n * _MIX_LO
    hi[on] ^= (n * _MIX_HI) & np.uint64(HI_MASK)
    return lo, hi
