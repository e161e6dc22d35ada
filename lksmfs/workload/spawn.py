"""Real processes realising a workload: `spawn_workload()` (`lksmfs workload spawn`,
lksmfs.commands.workload, is its command line).

Each instance (APP/K) is a child Python process (lksmfs.workload.child) that maps real
library files, writes the workload's pages with the same content function as the
simulated source, and then waits for commands.  Every instance lives in its own freezer
cgroup ROOT/APP/K so that the daemon's freezer watcher sees real freezes.  Whatever
happens (exception, SIGTERM, SIGINT), the children are killed and the cgroups and
library files removed.

    with spawn_workload(load_workload("config/workloads/small.yaml")) as procs:
        procs.pids("viewer"); procs.freeze("viewer"); procs.rewrite("player", 0.5)
        procs.advance_round(3)  # volatile pages + the timeline's events up to round 3
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import lksmfs
from lksmfs.system.cgroups import Freezer, default_root
from lksmfs.system.proc import PAGE_SIZE, ProcessGone, TaskId, task_id
from lksmfs.workload.schema import Workload
from lksmfs.workload.timeline import Change, NewRound, Rewrite, TimelinePlayer

_PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(lksmfs.__file__)))
ROOT_NAME = "lksmfs-workload"  # the default cgroup root, under the default hierarchy


class SpawnError(RuntimeError):
    pass


@dataclass
class SpawnedInstance:
    """One running child: identity, cgroup, and where its workload sections are mapped."""

    name: str  # APP/K
    app: str
    index: int
    proc: subprocess.Popen[bytes]
    cgroup: str
    sections: dict[str, tuple[int, int]] = field(default_factory=dict)  # sid -> (addr, npages)
    start_time: int = 0  # /proc/PID/stat field 22
    frozen: bool = False
    alive: bool = True
    pending: list[Rewrite] = field(default_factory=list)  # held back while frozen
    _buf: bytes = b""

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def task(self) -> TaskId:
        return TaskId(self.pid, self.start_time)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()

    def readline(self, deadline: float) -> str:
        """One line from the child, or SpawnError at the deadline or on its death."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise SpawnError(f"{self.name} (pid {self.pid}): no answer in time")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    err = b""
                    if self.proc.stderr is not None:
                        with contextlib.suppress(OSError):
                            err = self.proc.stderr.read() or b""
                    raise SpawnError(f"{self.name} (pid {self.pid}) died: "
                                     f"{err.decode(errors='replace').strip()[-2000:]}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def expect_ok(self, deadline: float) -> None:
        line = self.readline(deadline)
        if line != "ok":
            raise SpawnError(f"{self.name}: unexpected answer {line!r}")


class SpawnedWorkload(TimelinePlayer[SpawnedInstance]):
    """The running processes of a workload.  Use spawn_workload() to get one.

    Rounds and events are played by lksmfs.workload.timeline, as for the simulated
    source; here a freeze is a cgroup freeze and a page change a command to the child."""

    def __init__(
        self,
        workload: Workload,
        *,
        cgroup_root: str | None = None,
        lib_dir: str | None = None,
        python: str = sys.executable,
        timeout: float = 60.0,
        burn_cap_ms: int = 200,
        kernel_merge: bool = False,
    ) -> None:
        super().__init__(workload)
        self.timeout = timeout
        self.burn_cap_ms = burn_cap_ms
        self.kernel_merge = kernel_merge  # prctl(PR_SET_MEMORY_MERGE): the kernel oracle may merge them
        self._python = python
        self.freezer = Freezer.open(cgroup_root or default_root(ROOT_NAME))
        self._own_lib_dir = lib_dir is None
        self.lib_dir = lib_dir or tempfile.mkdtemp(prefix="lksmfs-libs-")
        self.lib_files: dict[str, str] = {}
        self._closed = False

    # -- life cycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Create the library files and every initial instance (all built in parallel)."""
        os.makedirs(self.lib_dir, exist_ok=True)
        for lib in self.workload.libraries:
            path = os.path.join(self.lib_dir, lib.name)
            with open(path, "wb") as f:  # sparse: text, rodata, .data; .bss is anonymous
                f.truncate((lib.text_pages + lib.rodata_pages + lib.data_pages) * PAGE_SIZE)
            self.lib_files[lib.name] = path
        self._spawn_initial()

    def close(self) -> None:
        """Kill every child, remove cgroups and library files.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        insts = list(self._instances.values())
        for inst in insts:  # a v1-frozen task cannot die until thawed
            if inst.frozen:
                with contextlib.suppress(OSError):
                    self.freezer.thaw(inst.cgroup, timeout=5)
                    inst.frozen = False
        for inst in insts:
            with contextlib.suppress(ProcessLookupError):
                inst.proc.kill()
        for inst in insts:
            with contextlib.suppress(subprocess.TimeoutExpired):
                inst.proc.wait(timeout=10)
            for f in (inst.proc.stdin, inst.proc.stdout, inst.proc.stderr):
                if f is not None:
                    with contextlib.suppress(OSError):
                        f.close()
            inst.alive = False
        self.freezer.remove_all()
        for path in self.lib_files.values():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        if self._own_lib_dir:
            shutil.rmtree(self.lib_dir, ignore_errors=True)

    def __enter__(self) -> SpawnedWorkload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- inspection -------------------------------------------------------------------------

    @property
    def instances(self) -> dict[str, SpawnedInstance]:
        """Every instance ever started (APP/K -> instance), in spawn order."""
        return self._instances

    def pids(self, app: str | None = None) -> list[int]:
        return [i.pid for i in self.live(app)]

    def instance(self, name: str) -> SpawnedInstance:
        return self._instances[name]

    def describe(self) -> list[dict[str, Any]]:
        """One record per live instance: what `--json` prints."""
        return [{"app": i.app, "instance": i.name, "pid": i.pid, "start_time": i.start_time,
                 "cgroup": i.cgroup} for i in self.live()]

    # -- timeline hooks (the player is lksmfs.workload.timeline) ----------------------------

    def _freeze(self, inst: SpawnedInstance) -> None:
        self.freezer.freeze(inst.cgroup, self.timeout)

    def _thaw(self, inst: SpawnedInstance) -> None:
        self.freezer.thaw(inst.cgroup, self.timeout)

    def _exit(self, inst: SpawnedInstance) -> None:
        """SIGKILL works on a v2-frozen task; a v1-frozen one must be thawed to die."""
        inst.proc.kill()
        if inst.frozen and not self.freezer.v2:
            self.freezer.thaw(inst.cgroup, self.timeout)
        inst.proc.wait(timeout=self.timeout)

    def _update(self, updates: Sequence[tuple[SpawnedInstance, Sequence[Change]]]) -> None:
        """Send every command, then wait for all the acks (children work in parallel)."""
        for inst, changes in updates:
            for change in changes:
                inst.send(f"round {change.round}" if isinstance(change, NewRound)
                          else f"rewrite {change.fraction!r} {change.number}")
        deadline = time.monotonic() + self.timeout
        for inst, changes in updates:
            for _ in changes:
                inst.expect_ok(deadline)

    def _start(self, names: Sequence[tuple[str, int]]) -> list[SpawnedInstance]:
        """Start the children, then wait for each to report its layout (they build their
        memory in parallel)."""
        env = dict(os.environ)
        env["PYTHONPATH"] = _PKG_ROOT + (os.pathsep + env["PYTHONPATH"]
                                         if env.get("PYTHONPATH") else "")
        started: list[SpawnedInstance] = []
        for app_name, index in names:
            name = f"{app_name}/{index}"
            cg = self.freezer.group(app_name, str(index))
            proc = subprocess.Popen(
                [self._python, "-S", "-m", "lksmfs.workload.child"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                env=env, close_fds=True,
            )
            inst = SpawnedInstance(name, app_name, index, proc, cg)
            self._instances[name] = inst
            started.append(inst)
            self.freezer.add(cg, proc.pid)  # before it builds anything
            try:
                inst.start_time = task_id(proc.pid).start_time
            except ProcessGone as e:
                raise SpawnError(f"{name} died at start: {e}") from None
            app = self.workload.app(app_name)
            init = {
                "workload": self.workload.to_dict(apps=[app_name], timeline=False),
                "app": app_name,
                "index": index,
                "round": self.round,
                "libs": {n: self.lib_files[n] for n in app.libraries},
                "burn_cap_ms": self.burn_cap_ms,
                "kernel_merge": self.kernel_merge,
            }
            inst.send(json.dumps(init))
        deadline = time.monotonic() + self.timeout
        for inst in started:
            line = inst.readline(deadline)
            if not line.startswith("ready "):
                raise SpawnError(f"{inst.name}: unexpected first line {line!r}")
            info = json.loads(line[len("ready "):])
            inst.sections = {sid: (int(a), int(n)) for sid, (a, n) in info["sections"].items()}
        return started


@contextlib.contextmanager
def spawn_workload(
    workload: Workload,
    *,
    cgroup_root: str | None = None,
    lib_dir: str | None = None,
    python: str = sys.executable,
    timeout: float = 60.0,
    burn_cap_ms: int = 200,
    kernel_merge: bool = False,
) -> Iterator[SpawnedWorkload]:
    """Start every initial instance of `workload`; on exit kill them and clean up, always.
    `kernel_merge`: the children opt in to the kernel's KSM (for benches against it)."""
    procs = SpawnedWorkload(workload, cgroup_root=cgroup_root, lib_dir=lib_dir, python=python,
                            timeout=timeout, burn_cap_ms=burn_cap_ms, kernel_merge=kernel_merge)
    try:
        procs.start()
        yield procs
    finally:
        procs.close()
