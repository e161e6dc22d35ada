"""A real daemon subprocess on a real FUSE mount, for live tests and benches.

Everything started here is stopped by the context managers even when a test fails:
daemons get SIGTERM (then SIGKILL), mounts left behind are lazily detached.  Test modules
wrap these in their own small fixtures (importing a fixture function into a test module
confuses linters).  The processes a daemon scans come from testkit.memproc.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from lksmfs.daemon.mounted import MountedDaemon, read_attr
from lksmfs.system.mounts import is_mountpoint, lazy_unmount

__all__ = ["NOBODY", "Daemon", "Mounts", "fuse_unavailable", "mounted_at", "public_tmpdir",
           "read_attr", "sh", "skip_unless_fuse", "write_attr"]

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def fuse_unavailable() -> str | None:
    """Why a FUSE daemon cannot be mounted here, or None when it can."""
    if os.geteuid() != 0:
        return "live FUSE test needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        return "no fusermount/fusermount3"
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        return f"mfusepy/libfuse unavailable: {e}"
    return None


def skip_unless_fuse() -> None:
    import pytest

    why = fuse_unavailable()
    if why is not None:
        pytest.skip(why)


def mounted_at(path: str | Path) -> bool:
    """Is something mounted exactly at `path` (works for dead FUSE mounts too)?"""
    return is_mountpoint(str(path))


@contextlib.contextmanager
def public_tmpdir() -> Iterator[Path]:
    """A 0755 directory under /tmp (pytest's tmp_path is 0700: nobody could not enter)."""
    d = Path(tempfile.mkdtemp(prefix="lksmfs-test-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for sub in d.iterdir() if d.exists() else []:
            lazy_unmount(str(sub))
        shutil.rmtree(d, ignore_errors=True)


class Daemon(MountedDaemon):
    """A daemon of a test, its log next to its mountpoint."""

    def __init__(self, mountpoint: Path, args: list[str], env: dict[str, str] | None = None):
        super().__init__(mountpoint, args, mountpoint.parent / f"{mountpoint.name}.{time.monotonic_ns()}.log",
                         env=env)

    def wait_mounted(self, timeout: float = 20.0) -> None:
        try:
            self.wait_serving(timeout)
        except RuntimeError as e:
            raise AssertionError(str(e)) from None


class Mounts:
    """Start daemons in a public tmp dir; everything stopped and unmounted on exit."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self.root = Path()
        self.daemons: list[Daemon] = []

    def __enter__(self) -> Mounts:
        self.root = self._stack.enter_context(public_tmpdir())
        return self

    def __exit__(
        self,
        et: type[BaseException] | None,
        ev: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for d in reversed(self.daemons):
            d.stop()
        self._stack.close()

    def start(
        self,
        *args: str,
        name: str = "ksm",
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> Daemon:
        mp = self.root / name
        if not mounted_at(mp):  # a dead mount there is the daemon's to clear
            mp.mkdir(exist_ok=True)
        d = Daemon(mp, list(args), env)
        self.daemons.append(d)
        if wait:
            d.wait_mounted()
        return d


def sh(
    script: str,
    *,
    cwd: Path | None = None,
    shell: str = "sh",
    user: list[str] | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run a real shell command line; stdout/stderr captured as text."""
    return subprocess.run(
        [*(user or []), shell, "-c", script],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def write_attr(mount: Path, name: str, data: bytes) -> int:
    """One write() on a fresh O_WRONLY|O_TRUNC fd, as `echo` does; returns 0 or the errno."""
    try:
        fd = os.open(mount / name, os.O_WRONLY | os.O_TRUNC)
    except OSError as e:
        return e.errno or -1
    try:
        os.write(fd, data)
        return 0
    except OSError as e:
        return e.errno or -1
    finally:
        os.close(fd)
