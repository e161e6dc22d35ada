"""The LKSM algorithm, pure: no FUSE, no /proc, no threads (see ksm.py)."""

from lksmfs.engine.ksm import Ksm
from lksmfs.engine.params import Tunables

__all__ = ["Ksm", "Tunables"]
