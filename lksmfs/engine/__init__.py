"""The LKSM algorithm, pure: no FUSE, no /proc, no threads (see ksm.py).

`Ksm` and `Tunables` are imported on first use (PEP 562): a command that only needs the
engine's constants (lksmfs.engine.params) must not pay for numpy and the whole engine at
start-up (`lksmfs --help`, `lksmfs share`)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lksmfs.engine.ksm import Ksm
    from lksmfs.engine.params import Tunables

__all__ = ["Ksm", "Tunables"]


def __getattr__(name: str) -> Any:
    if name == "Ksm":
        from lksmfs.engine.ksm import Ksm

        return Ksm
    if name == "Tunables":
        from lksmfs.engine.params import Tunables

        return Tunables
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
