"""The lksmfs daemon: the engine's two kernel threads, the freezer hook and FUSE.

Threads, as in mm/lksm.c:
- crawler (ksm_crawld): `crawl(now)` under the engine lock, then waits on the condition
  until the time it asked for or until something wakes it (a store, a hint, a scan end);
- scanner (ksmd): `scan_batch()` under the lock while a scan is in progress, then sleeps
  sleep_millisecs (cut short when the tunable changes), else waits on the condition;
- freezer watcher: turns cgroup freezer transitions into `ksm.hint()` calls;
- lifecycle watcher (real processes only): exits (a pidfd per registered task, a
  zombie included) and execs into `ksm.task_exit()`, madvise into `ksm.madvise()`,
  as they happen (lksmfs.daemon.lifecycle);
- watchdog: WATCHDOG=1 to systemd while the engine threads are alive;
- FUSE in the main thread, in the foreground.  libfuse owns SIGTERM/SIGINT/SIGHUP while
  mounted: they end its loop and it unmounts; then the threads are stopped and we exit 0.
  SIGQUIT takes the same path (lksmfs.daemon.sigquit turns it into a SIGTERM).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from lksmfs.commands.output.summary import describe_scan
from lksmfs.config import Config, FreezerConfig
from lksmfs.daemon.freezer import FreezerWatcher
from lksmfs.daemon.lifecycle import LifecycleWatcher
from lksmfs.daemon.metrics_file import MetricsPublisher
from lksmfs.daemon.mountpoint import prepare_mountpoint
from lksmfs.daemon.notify import sd_notify, watchdog_interval
from lksmfs.daemon.sigquit import SigquitWatcher
from lksmfs.engine.params import POLICY_LKSM
from lksmfs.sources.scope import Scope
from lksmfs.sysfs.attrs import AttributeTable, apply_settings
from lksmfs.system import privilege
from lksmfs.system.proc import TaskId, try_stat
from lksmfs.system.threads import start_thread

if TYPE_CHECKING:  # the engine (and numpy) are imported when a mount starts, not for --help
    from lksmfs.sources.base import MemorySource
    from lksmfs.sources.procfs import ProcfsSource

log = logging.getLogger("lksmfs.daemon")  # the name log lines have always had

# A short GIL switch interval keeps `cat` fast while the scanner thread computes.
SWITCH_INTERVAL_S = 0.0005
# How long the scanner steps aside for a waiting sysfs writer before taking the lock again.
WRITER_GRACE_S = 0.05
JOIN_TIMEOUT_S = 10.0
# Scan lines in the log: up to REPORT_BURST at once, then one per REPORT_EVERY_S.
REPORT_BURST = 10
REPORT_EVERY_S = 10.0
_SIGNALS = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}


# -- scan lines in the log ------------------------------------------------------------


class ScanReports:
    """How often a completed scan may be said: `burst` lines at once, then one every
    `every_s` (GCRA, a token bucket kept as the time the next line is due).  LKSM's
    requested scans are all said; a mainline pass every few ms is not, and the next
    line says how many went unsaid."""

    def __init__(self, burst: int = REPORT_BURST, every_s: float = REPORT_EVERY_S) -> None:
        self.slack = (burst - 1) * every_s
        self.every_s = every_s
        self.due = 0.0  # the theoretical arrival time of the next line
        self.unsaid = 0

    def take(self, now: float) -> int | None:
        """None when this scan is not to be said; else how many were not since the last."""
        due = max(self.due, now)
        if due - now > self.slack:
            self.unsaid += 1
            return None
        self.due = due + self.every_s
        unsaid, self.unsaid = self.unsaid, 0
        return unsaid


# -- the engine lock ------------------------------------------------------------------


class EngineLock:
    """The kernel's ksm_thread_mutex, with a way for sysfs writers to cut in.

    Python locks are not fair: a scanner that releases and re-takes the lock at full
    speed (sleep_millisecs 0) can starve a waiting `echo`.  Writers entering through
    `with engine_lock:` announce themselves, and the scanner steps aside for them.
    """

    def __init__(self) -> None:
        self.raw = threading.Lock()
        self._waiting = 0
        self._count = threading.Lock()

    def __enter__(self) -> EngineLock:
        with self._count:
            self._waiting += 1
        try:
            self.raw.acquire()
        finally:
            with self._count:
                self._waiting -= 1
        return self

    def __exit__(self, *exc: object) -> None:
        self.raw.release()

    def yield_to_waiters(self, grace_s: float = WRITER_GRACE_S) -> None:
        deadline = time.monotonic() + grace_s
        while self._waiting and time.monotonic() < deadline:
            time.sleep(0.0002)


def _block_signals() -> None:
    """Only the main thread may take the signals libfuse handles (its loop waits there)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)


# -- source and freezer wiring -----------------------------------------------------------


def _scope(cfg: Config) -> Scope:
    return Scope(
        pids=set(cfg.scope.pids),
        cgroups=list(cfg.scope.cgroups),
        exclude_comms=set(cfg.scope.exclude_comms),
    )


def make_source(cfg: Config) -> tuple[MemorySource, Callable[[int], TaskId]]:
    """The configured MemorySource and the way a hinted pid becomes a TaskId."""
    from lksmfs.sources.procfs import ProcfsSource
    from lksmfs.workload.simulated import SimulatedSource

    if cfg.source == "procfs":
        src = ProcfsSource(self_pid=os.getpid(), scope=_scope(cfg))
        return src, functools.partial(scannable_task, src)
    sim = SimulatedSource.from_file(cfg.source.split(":", 1)[1])

    def resolve(pid: int) -> TaskId:
        for task in sim.tasks():
            if task.pid == pid:
                return task
        raise OSError(errno.ESRCH, "No such process")

    return sim, resolve


def scannable_task(src: ProcfsSource, pid: int) -> TaskId:
    """The TaskId a `hint` write names, refused when the task can never be scanned, so
    that no request waits on it: ESRCH when there is no such process; EINVAL for the
    daemon itself, a kernel thread, or a process outside --pid/--cgroup."""
    st = try_stat(pid, src.proc_root)
    if st is None or (not st.alive and not st.kthread):
        raise OSError(errno.ESRCH, "No such process")  # gone, exiting or a zombie: no mm
    if pid == src.self_pid:
        raise OSError(errno.EINVAL, "hint: that is the lksmfs daemon itself")
    if st.kthread:
        raise OSError(errno.EINVAL, "hint: a kernel thread has no memory to scan")
    if not src.in_scope(pid, st.comm):
        raise OSError(errno.EINVAL, "hint: the process is outside the daemon's scope")
    return st.task_id


def make_freezer(cfg: Config, on_hint: Callable[[TaskId, bool], None]) -> FreezerWatcher | None:
    """A FreezerWatcher over every hierarchy /proc/self/mountinfo lists (the roots a
    config names instead, kind by kind), or None when disabled or useless (mainline ksmd
    has no freezer hook).  It logs what it watches, and warns when that is nothing:
    without it no frozen hint ever comes."""
    if cfg.policy != POLICY_LKSM:
        log.info("freezer: not watched (policy %s: mainline has no freezer hook)", cfg.policy)
        return None
    if not cfg.freezer.enabled or cfg.source != "procfs":
        why = "--no-freezer or freezer.enabled: false" if not cfg.freezer.enabled else "simulated source"
        log.info("freezer: not watched (%s); frozen-task hints come only from the hint file", why)
        return None
    f = cfg.freezer
    w = FreezerWatcher(
        on_hint,
        v1_roots=f.v1_roots,
        v2_roots=f.v2_roots,
        treat_sigstop_as_frozen=f.treat_sigstop_as_frozen,
        poll_interval=f.poll_interval_ms / 1000,
        scope=_scope(cfg),
        self_pid=os.getpid(),
    )
    if w.v1_roots or w.v2_roots:
        log.info("freezer: watching %s", _watched(w, f))
    else:
        where = "none configured" if f.v1_roots is not None and f.v2_roots is not None else \
            "no cgroup v1 freezer and no cgroup2 in /proc/self/mountinfo"
        log.warning("freezer: watching no cgroup (%s): frozen tasks are never hinted; write 'PID frozen' "
                    "to the hint file, or set freezer.v1_roots/v2_roots", where)
    return w


def _watched(w: FreezerWatcher, f: FreezerConfig) -> str:
    """'cgroup v1 freezer at A, cgroup2 at B (found in /proc/self/mountinfo)', with the
    origin given per kind when one kind is configured and the other found."""
    kinds = [(w.v1_roots, f.v1_roots is None, "cgroup v1 freezer"), (w.v2_roots, f.v2_roots is None, "cgroup2")]
    origins = {found for roots, found, _ in kinds if roots}

    def origin(found: bool) -> str:
        return " (found in /proc/self/mountinfo)" if found else " (configured)"

    items = [", ".join(f"{label} at {r}" for r in roots) + (origin(found) if len(origins) > 1 else "")
             for roots, found, label in kinds if roots]
    return ", ".join(items) + (origin(origins.pop()) if len(origins) == 1 else "")


# -- the daemon -----------------------------------------------------------------------


@dataclass
class _Thread:
    name: str
    thread: threading.Thread


class Daemon:
    """One mount: engine, threads, FUSE.  `run()` blocks until unmounted or signalled."""

    def __init__(
        self,
        config: Config,
        mountpoint: str,
        *,
        source: MemorySource | None = None,
        resolve_task: Callable[[int], TaskId] | None = None,
    ) -> None:
        from lksmfs.engine.ksm import Ksm
        from lksmfs.sources.procfs import ProcfsSource
        from lksmfs.sysfs.fuse import LksmOperations, proc_task_id  # mfusepy loads libfuse

        self.config = config
        self.mountpoint = os.path.abspath(mountpoint)
        if source is None:
            source, resolve = make_source(config)
            resolve_task = resolve_task or resolve
        self.source = source
        self.ksm = Ksm(source, filter_enabled=config.filter, self_pid=os.getpid(), policy=config.policy)
        self.lock = EngineLock()
        self.cond = threading.Condition(self.lock.raw)
        self._stop = threading.Event()
        self._scanner_kick = threading.Event()
        self.error: BaseException | None = None
        self.error_thread = ""  # the engine thread that died, if one did
        self.table = AttributeTable(self.ksm, lock=self.lock, on_store=self._on_store)
        self.metrics = MetricsPublisher(config.metrics_textfile, self.table, self.lock, self.mountpoint)
        self.ops = LksmOperations(
            self.table,
            engine_lock=self.lock,
            resolve_task=resolve_task or (
                functools.partial(scannable_task, source) if isinstance(source, ProcfsSource) else proc_task_id
            ),
            on_hint=self.wake,
            on_init=self._on_mounted,
            hints=config.policy == POLICY_LKSM,  # the hint file plays LKSM's freezer hook
        )
        self._threads: list[_Thread] = []
        self.reports = ScanReports()
        self.freezer: FreezerWatcher | None = None
        self.lifecycle: LifecycleWatcher | None = None
        self.apply_tunables()

    # -- start values ----------------------------------------------------------------

    def apply_tunables(self) -> None:
        """Initial values go through AttributeTable.store: the same checks as `echo`."""
        apply_settings(self.table, dict(self.config.tunables.items(self.config.policy)),
                       lambda name: f"tunables.{name}")

    # -- wake-ups ----------------------------------------------------------------------

    def wake(self) -> None:
        """wake_up(&ksm_crawl_wait) and ksm_thread_wait: something changed."""
        with self.lock:
            self.cond.notify_all()

    def _on_store(self, name: str) -> None:
        if name in ("sleep_millisecs", "run", "pages_to_scan", "scan_boost"):
            self._scanner_kick.set()
        self.wake()
        self.metrics.publish()

    def _on_hint(self, task: TaskId, frozen: bool) -> None:
        """The freezer hook (freeze_task/__thaw_task -> lksm_hint)."""
        log.info("freezer hint: %s %s", task, "frozen" if frozen else "thawed")
        with self.lock:
            self.ksm.hint(task, frozen)
            self.cond.notify_all()

    # -- the mm lifecycle hooks (lksmfs.daemon.lifecycle) -------------------------------------

    def _watched_tasks(self) -> list[TaskId]:
        """Registered mms not yet exited, and the frozen task list (lksm_remove_candidate)."""
        with self.lock:
            tasks = [t for t, s in self.ksm.slots.items() if not s.exited]
            from lksmfs.engine.crawler import LksmCrawler  # imported with the engine, not for --help

            if isinstance(self.ksm.crawler, LksmCrawler):
                tasks += self.ksm.crawler.frozen_tasks
        return tasks

    def _on_exit(self, task: TaskId) -> None:
        """exit_mm() -> ksm_exit(), or an exec's new mm: the old one leaves now."""
        with self.lock:
            slot = self.ksm.slots.get(task)
            known = slot is not None and slot.task.same_image(task)
            self.ksm.task_exit(task)
            now = self.ksm.counters()["scanning_process"]
            self.cond.notify_all()
        if known:
            log.info("exit: %s left (exited or exec'd); scanning_process %d", task, now)
            self.metrics.publish()

    def _on_madvise(self, pid: int) -> None:
        """ksm_madvise() -> __ksm_enter(): registered at once, short or not (a process in
        scope: the checks of the hint file)."""
        from lksmfs.sources.procfs import ProcfsSource

        assert isinstance(self.source, ProcfsSource)
        try:
            task = scannable_task(self.source, pid)
        except OSError:
            return  # gone, or never ours (outside --pid/--cgroup, ourselves, a kernel thread)
        with self.lock:
            added = self.ksm.madvise(task)
            now = self.ksm.counters()["scanning_process"]
            if added:
                self.cond.notify_all()
        if added:
            log.info("madvise: %s registered (MADV_MERGEABLE or PR_SET_MEMORY_MERGE); scanning_process %d",
                     task, now)
            self.metrics.publish()

    def _start_lifecycle(self) -> None:
        """Exits and execs of real processes under both policies; madvise under LKSM's
        (mainline's ksmd registers the madvised at its next pass)."""
        from lksmfs.sources.procfs import ProcfsSource  # imported with the engine, not for --help

        if not isinstance(self.source, ProcfsSource):
            return
        lksm = self.config.policy == POLICY_LKSM
        self.lifecycle = LifecycleWatcher(
            watched=self._watched_tasks,
            on_exit=self._on_exit,
            on_madvise=self._on_madvise if lksm else None,
            proc_root=self.source.proc_root,
        )
        self.lifecycle.start()
        log.info("lifecycle: exits %s; execs%s every %.1f s", "by pidfd" if self.lifecycle.use_pidfd else "polled",
                 " and madvise" if lksm else "", self.lifecycle.poll_interval)

    def _on_mounted(self) -> None:
        self._mounted = True
        try:
            log.info("mounted at %s", self.mountpoint)
            sd_notify(f"READY=1\nSTATUS=mounted at {self.mountpoint}\nMAINPID={os.getpid()}")
            self.metrics.start()
        except Exception:  # init must never fail
            log.exception("ready notification failed")

    # -- threads -----------------------------------------------------------------------

    def _fatal(self, what: str, exc: BaseException) -> None:
        """An engine thread died: stop serving (systemd restarts us) rather than lie."""
        log.critical("%s thread died", what, exc_info=exc)
        if self.error is None:
            self.error = exc
            self.error_thread = what
        self._stop.set()
        if not self._unmounting:
            os.kill(os.getpid(), signal.SIGTERM)  # ends the FUSE loop in the main thread

    def _crawler(self) -> None:
        _block_signals()
        try:
            with self.cond:
                while not self._stop.is_set():
                    published = self.ksm.counters()
                    due = self.ksm.crawl(time.monotonic())
                    if self.ksm.counters() is not published:  # e.g. a one-shot with no one to scan
                        self.metrics.publish()
                        if self.lifecycle is not None:
                            self.lifecycle.wake()  # slots may have joined: watch them now
                    self.cond.notify_all()  # a scan may have been prepared
                    if self._stop.is_set():
                        break
                    timeout = None if due is None else max(0.0, due - time.monotonic())
                    self.cond.wait(timeout)
        except BaseException as e:  # noqa: BLE001 - report any engine failure
            self._fatal("crawler", e)

    def _scanner(self) -> None:
        _block_signals()
        try:
            while not self._stop.is_set():
                with self.cond:
                    while not self._stop.is_set() and not self.ksm.scanner_should_run():
                        self.cond.wait()
                    if self._stop.is_set():
                        break
                    self._scanner_kick.clear()
                    last_scan = self.ksm.last_scan
                    self.ksm.scan_batch()
                    report = None
                    if self.ksm.last_scan is not last_scan:  # _finish_scan ran
                        self.metrics.publish()
                        report = describe_scan(self.ksm.last_scan, self.ksm.counters())
                    running = self.ksm.scanner_should_run()
                    if not running:
                        self.cond.notify_all()  # scan over: the crawler may have work
                if report is not None:  # outside the lock: a slow journal must not hold the engine
                    self._report_scan(report)
                self.lock.yield_to_waiters()
                if running:
                    self._scanner_kick.wait(self.ksm.tunables.sleep_millisecs / 1000)
        except BaseException as e:  # noqa: BLE001
            self._fatal("scanner", e)

    def _report_scan(self, report: str) -> None:
        """An INFO line per completed scan, and the same words in systemctl status - at
        the pace ScanReports allows (mainline's ksmd with sleep_millisecs=0 wraps a pass
        every few ms); the others go to DEBUG."""
        unsaid = self.reports.take(time.monotonic())
        if unsaid is None:
            log.debug("%s", report)
            return
        more = f" ({unsaid} more scans since the last line)" if unsaid else ""
        log.info("%s%s", report, more)
        sd_notify(f"STATUS=last {report} (at {time.strftime('%H:%M:%S')})")

    def _watchdog(self, interval: float) -> None:
        _block_signals()
        while not self._stop.wait(interval):
            if self.engine_alive():
                sd_notify("WATCHDOG=1")
            else:
                log.error("engine thread dead: not petting the watchdog")

    def _start(self, name: str, target: Callable[..., None], *args: Any) -> None:
        """A thread called `name` in the log and in `ps -L` (the kernel's ksmd is
        "ksmd"; ours are "crawler" and "scanner")."""
        self._threads.append(_Thread(name, start_thread(name, target, *args)))

    def engine_alive(self) -> bool:
        """Are the crawler and the scanner still running (what the watchdog vouches for)?"""
        return all(t.thread.is_alive() for t in self._threads if t.name in ("crawler", "scanner"))

    def start_threads(self) -> None:
        """Start every helper thread with libfuse's signals blocked: they inherit the mask,
        so SIGTERM always reaches the main thread, where libfuse's loop waits for it."""
        old = signal.pthread_sigmask(signal.SIG_BLOCK, _SIGNALS)
        try:
            self._start("crawler", self._crawler)
            self._start("scanner", self._scanner)
            self.freezer = make_freezer(self.config, self._on_hint)
            if self.freezer is not None:
                self.freezer.start()
            self._start_lifecycle()
            interval = watchdog_interval()
            if interval is not None:
                self._start("watchdog", self._watchdog, interval)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def stop_threads(self) -> None:
        self._stop.set()
        self._scanner_kick.set()
        if self.freezer is not None:
            with contextlib.suppress(Exception):
                self.freezer.stop()
        if self.lifecycle is not None:
            with contextlib.suppress(Exception):
                self.lifecycle.stop()
        with self.cond:
            self.cond.notify_all()
        for t in self._threads:
            t.thread.join(JOIN_TIMEOUT_S)
            if t.thread.is_alive():
                log.warning("%s thread did not stop within %.0f s", t.name, JOIN_TIMEOUT_S)
        with contextlib.suppress(Exception):
            self.source.close()

    # -- run -----------------------------------------------------------------------------

    _unmounting = False
    _mounted = False  # libfuse called init: the kernel finished the handshake

    def run(self) -> int:
        """Mount and serve until unmounted or signalled; 0 on a clean stop."""
        from lksmfs.sysfs.fuse import mount

        prepare_mountpoint(self.mountpoint)
        self.log_start()
        quit_watcher = SigquitWatcher(self._quit)
        quit_watcher.start()
        self.start_threads()
        try:
            mount(self.ops, self.mountpoint)
        finally:
            self._unmounting = True
            sd_notify("STOPPING=1")
            if self._mounted:
                log.info("unmounted %s, stopping", self.mountpoint)
            self.stop_threads()
            self.metrics.stop()
            quit_watcher.stop()
        if self.error is not None:
            # not a clean stop: said last, where a user looks, and in the exit status
            why = f"the {self.error_thread} thread died ({type(self.error).__name__}: {self.error})"
            log.critical("%s: unmounted %s, exiting with status 1", why, self.mountpoint)
            sd_notify(f"STATUS={why}")
            print(f"lksmfs mount: {why}; unmounted {self.mountpoint}", file=sys.stderr)
            return 1
        return 0

    def log_start(self) -> None:
        """Say at start what will be scanned, and warn about what names nothing: a pid
        or cgroup of --pid/--cgroup that does not exist now."""
        scope = self.config.scope
        if self.config.source != "procfs":
            log.info("source: %s", self.config.source)
        elif not scope.pids and not scope.cgroups:
            log.info("scope: every user process%s", f" but comm {', '.join(scope.exclude_comms)}"
                     if scope.exclude_comms else "")
        else:
            log.info("scope: %s", ", ".join([f"pid {p}" for p in scope.pids] + [f"cgroup {d}" for d in scope.cgroups]))
            unmatched = _scope(self.config).unmatched(self_pid=os.getpid())
            for u in unmatched:
                later = " (its processes are scanned once it has some)" if u.cgroup else ""
                log.warning("scope: %s: %s%s", u.what, u.message, later)
            if len(unmatched) == len(scope.pids) + len(scope.cgroups):
                log.warning("scope: nothing in --pid/--cgroup can be scanned now: nothing will be until it can")
        lacking = privilege.missing(privilege.READ_CAPS)
        if self.config.source == "procfs" and lacking:
            log.warning("not privileged (%s, without %s): other users' processes cannot be read; they are "
                        "skipped and counted in tasks_denied", privilege.who(), " and ".join(lacking))

    def _quit(self) -> None:
        """SIGQUIT: the SIGTERM path (libfuse ends its loop and unmounts)."""
        if not self._unmounting:
            os.kill(os.getpid(), signal.SIGTERM)
