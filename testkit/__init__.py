"""Test and bench tooling: not part of the shipped package (setup.cfg leaves it out).

Tests find it through pytest's `pythonpath = ["."]` (pyproject.toml), benches by running
from the repository root as `python -m bench.NAME`; nothing inserts into sys.path.

- memchild:   the one child program that builds memory from a declarative spec
- memproc:    starting and driving it (MemProcess, PatternGroup), the spec language's
              hand derivation (group_counts, spec_groups, pattern_page)
- kernel_ksm: the kernel's own KSM as an oracle (KernelKsm, anon_page_census)
- mount:      a real daemon on a real FUSE mount (Mounts, Daemon, read_attr, sh)
- engine:     driving and inspecting an engine as the daemon's threads would
(The unit tests' in-memory MemorySource stays next to them: tests/unit/memfake.py.)
"""

from pathlib import Path

from lksmfs.system.waiting import wait_until

REPO = Path(__file__).resolve().parent.parent

__all__ = ["REPO", "wait_until"]
