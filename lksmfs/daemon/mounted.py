"""`lksmfs mount` in a child process: started, waited for until it serves, always stopped
with nothing left mounted.  The demo drives its daemon this way, and so does the test kit.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from lksmfs.system.mounts import is_mountpoint, lazy_unmount
from lksmfs.system.waiting import wait_until

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the daemon child: SIGTERM when the parent dies, even of SIGKILL (no stray mount)."""
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)


def read_attr(mountpoint: str | Path, name: str) -> str:
    """One attribute file's whole text: open, read to EOF, close, as `cat` does."""
    fd = os.open(Path(mountpoint) / name, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


class MountedDaemon:
    """`python -m lksmfs.cli mount MOUNTPOINT ARGS...`, its output in `log_path`.

    `own_session`: the daemon gets a session of its own (a terminal's Ctrl-C reaches only
    the parent, which stops it in order) and dies with its parent."""

    def __init__(self, mountpoint: str | Path, args: Sequence[str], log_path: str | Path, *,
                 env: dict[str, str] | None = None, own_session: bool = False) -> None:
        self.mountpoint = Path(mountpoint)
        self.log_path = Path(log_path)
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lksmfs.cli", "mount", str(self.mountpoint), *args],
            stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})),
            start_new_session=own_session, preexec_fn=_die_with_parent if own_session else None,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def serving(self) -> bool:
        """A live mount answers readdir (stat/lookup may come from the kernel's cache,
        even on a dead mount, for a second)."""
        if not is_mountpoint(str(self.mountpoint)):
            return False
        try:
            return "run" in os.listdir(self.mountpoint)
        except OSError:
            return False

    def wait_serving(self, timeout: float = 20.0) -> None:
        """Return once the files are there; RuntimeError with the log if the daemon exited
        or did not get there in time."""
        try:
            wait_until(lambda: self.proc.poll() is not None or self.serving(), timeout,
                       what=f"the daemon to serve {self.mountpoint}")
        except TimeoutError as e:
            raise RuntimeError(f"{e}:\n{self.log()}") from None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the daemon exited with status {self.proc.returncode}:\n{self.log()}")

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; SIGKILL if it does not go.  Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def stop(self) -> None:
        """Always leaves no process and no mount behind."""
        with contextlib.suppress(Exception):
            self.terminate()
        lazy_unmount(str(self.mountpoint))
        self._log.close()

    def __enter__(self) -> MountedDaemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
