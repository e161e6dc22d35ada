"""Helpers for the live FUSE tests: a real daemon subprocess on a real mount, real children.

Everything started here is stopped by the context managers even when a test fails:
daemons get SIGTERM (then SIGKILL), mounts left behind are lazily detached, children are
killed and reaped.  Test modules wrap these in their own small fixtures (importing a
fixture function into a test module confuses linters).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pytest
from waiting import wait_until  # noqa: F401  (re-exported to the tests)

REPO = Path(__file__).resolve().parents[2]
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# The child: N page-aligned pages of one byte value (an identical group of N pages),
# then enough CPU time not to be a "short task" (< 100 ms), then it waits for stdin EOF.
# An optional third argument becomes its comm (prctl PR_SET_NAME).
_CHILD = r"""
import mmap, sys, time
n, value = int(sys.argv[1]), int(sys.argv[2])
if len(sys.argv) > 3:
    import ctypes
    ctypes.CDLL(None).prctl(15, ctypes.c_char_p(sys.argv[3].encode()), 0, 0, 0)
m = mmap.mmap(-1, max(n, 1) * 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
m.madvise(mmap.MADV_NOHUGEPAGE)
page = bytes([value]) * 4096
for i in range(n):
    m[i * 4096:(i + 1) * 4096] = page
t = time.process_time()
while time.process_time() - t < 0.15:
    pass
print("ready", flush=True)
sys.stdin.read()
"""


def skip_unless_fuse() -> None:
    if os.geteuid() != 0:
        pytest.skip("live FUSE test needs root")
    if not os.path.exists("/dev/fuse"):
        pytest.skip("no /dev/fuse")
    if not (shutil.which("fusermount3") or shutil.which("fusermount")):
        pytest.skip("no fusermount/fusermount3")
    try:
        import mfusepy  # noqa: F401
    except (ImportError, OSError) as e:
        pytest.skip(f"mfusepy/libfuse unavailable: {e}")


def mounted_at(path: str | Path) -> bool:
    """Is something mounted exactly at `path` (works for dead FUSE mounts too)?"""
    real = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == real for line in f)


def detach(path: str | Path) -> None:
    for cmd in (["fusermount3", "-uz", str(path)], ["fusermount", "-uz", str(path)],
                ["umount", "-l", str(path)]):
        if not mounted_at(path):
            return
        with contextlib.suppress(OSError):
            subprocess.run(cmd, capture_output=True, check=False, timeout=10)


@contextlib.contextmanager
def public_tmpdir() -> Iterator[Path]:
    """A 0755 directory under /tmp (pytest's tmp_path is 0700: nobody could not enter)."""
    d = Path(tempfile.mkdtemp(prefix="lksmfs-test-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        for sub in d.iterdir() if d.exists() else []:
            if mounted_at(sub):
                detach(sub)
        shutil.rmtree(d, ignore_errors=True)


class Child:
    """A real process holding `npages` identical page-aligned pages of byte `value`;
    `user` prefixes the command (e.g. NOBODY, with a `python` that user may run)."""

    def __init__(
        self,
        npages: int,
        value: int = 0x5A,
        *,
        user: list[str] | None = None,
        python: str = sys.executable,
        comm: str | None = None,
    ) -> None:
        self.npages = npages
        self.proc = subprocess.Popen(
            [*(user or []), python, "-S", "-c", _CHILD, str(npages), str(value),
             *([comm] if comm is not None else [])],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.close()
            raise RuntimeError(f"child did not start: {line!r}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        with contextlib.suppress(Exception):
            self.proc.communicate(timeout=10)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Daemon:
    """`python -m lksmfs.cli mount MOUNTPOINT ARGS...` as a subprocess, output to a log file."""

    def __init__(self, mountpoint: Path, args: list[str], env: dict[str, str] | None = None):
        self.mountpoint = mountpoint
        self.log_path = mountpoint.parent / f"{mountpoint.name}.{time.monotonic_ns()}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        full_env = dict(os.environ, PYTHONUNBUFFERED="1")
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lksmfs.cli", "mount", str(mountpoint), *args],
            cwd=REPO,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=full_env,
        )

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def serving(self) -> bool:
        """A live mount answers readdir (stat/lookup may come from the kernel's cache,
        even on a dead mount, for a second)."""
        if not mounted_at(self.mountpoint):
            return False
        try:
            return "run" in os.listdir(self.mountpoint)
        except OSError:
            return False

    def wait_mounted(self, timeout: float = 20.0) -> None:
        wait_until(lambda: self.proc.poll() is not None or self.serving(), timeout)
        if self.proc.poll() is not None:
            raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
        if not self.serving():
            raise AssertionError(f"not mounted within {timeout} s:\n{self.log()}")

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
        if mounted_at(self.mountpoint):
            detach(self.mountpoint)
        self._log.close()


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


def read_attr(mount: Path, name: str) -> str:
    """open/read/close, like `cat`, without a process."""
    fd = os.open(mount / name, os.O_RDONLY)
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(fd)


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
