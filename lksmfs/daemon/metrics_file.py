"""`--metrics-textfile FILE`: the daemon's figures for node_exporter's textfile collector.

The file is replaced atomically (a temp file in the same directory, then rename(2)), the
textfile collector's convention: a scrape sees the old file or the new one, never half
of one.  The temp name does not end in `.prom`, so the collector never reads it.  The
snapshot is copied under the engine lock; rendering and writing happen outside it, so a
slow disk never holds up the scanner or a `cat`.  A failed write is logged (once per
distinct error) and never stops the daemon.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

from lksmfs.config import ConfigError
from lksmfs.daemon.metrics import Snapshot, render
from lksmfs.system.threads import start_thread

if TYPE_CHECKING:
    from lksmfs.sysfs.attrs import AttributeTable

log = logging.getLogger(__name__)

FILE_MODE = 0o644  # node_exporter runs as its own user (Debian: prometheus)


def take_snapshot(table: AttributeTable[Any]) -> Snapshot:
    """Every numeric attribute as its file shows it, region_share, per-process rows and
    the last scan.  Call it under the engine lock."""
    attributes: dict[str, int] = {}
    for name in table.names():
        text = table.show(name).decode().strip()
        with contextlib.suppress(ValueError):
            attributes[name] = int(text)
    ksm: Any = table.ksm
    return Snapshot(
        attributes=attributes,
        region_share=dict(ksm.region_share()) if "region_share" in table else None,
        processes=ksm.per_process(),
        last_scan=dict(ksm.last_scan),
    )


def write_atomically(path: str, text: str) -> None:
    """Replace `path` with `text` (UTF-8), mode 0644, through a temp file beside it."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode())
            os.fchmod(f.fileno(), FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class MetricsPublisher:
    """Keeps FILE current from a thread of its own; does nothing without a FILE.

    `publish()` only marks the figures as changed, so it is cheap and may be called
    anywhere, the engine lock held or not (after a completed scan, an accepted store, a
    crawl that changed something).  The `metrics` thread then copies a snapshot under the
    engine lock and writes outside it; changes that come while it writes are folded into
    the next write.  `start()` once the mount serves (a first file), `stop()` at
    shutdown: FILE is removed, as a stopped daemon has no figures and a stale file would
    look current to Prometheus.
    """

    def __init__(
        self,
        path: str | None,
        table: AttributeTable[Any],
        engine_lock: AbstractContextManager[Any],
        mountpoint: str | None = None,
    ) -> None:
        if path is not None and mountpoint is not None:
            inside = os.path.commonpath([os.path.abspath(path), os.path.abspath(mountpoint)])
            if inside == os.path.abspath(mountpoint):
                raise ConfigError(f"metrics textfile {path}: inside the mountpoint {mountpoint}")
        self.path = path
        self._table = table
        self._engine_lock = engine_lock
        self._due = threading.Event()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._last_error: str | None = None
        self.writes = 0  # files written (for tests and curious debuggers)

    def start(self) -> None:
        if self.path is None or self._thread is not None:
            return
        if not self.path.endswith(".prom"):
            log.warning("metrics textfile %s: node_exporter's textfile collector only reads *.prom files",
                        self.path)
        log.info("metrics: writing %s after every scan and attribute change", self.path)
        self._due.set()
        self._thread = start_thread("metrics", self._run)

    def publish(self) -> None:
        self._due.set()

    def _run(self) -> None:
        while True:
            self._due.wait()
            if self._stopping:
                return
            self._due.clear()
            self.write_now()

    def write_now(self) -> None:
        """Snapshot under the engine lock, render and replace FILE outside it."""
        if self.path is None:
            return
        with self._engine_lock:
            snap = take_snapshot(self._table)
        try:
            write_atomically(self.path, render(snap))
        except OSError as e:
            message = f"{e.strerror or e}"
            if message != self._last_error:
                log.warning("metrics textfile %s: cannot write: %s", self.path, message)
            self._last_error = message
            return
        self.writes += 1
        if self._last_error is not None:
            log.info("metrics textfile %s: written again", self.path)
            self._last_error = None

    def stop(self) -> None:
        if self.path is None or self._thread is None:
            return
        self._stopping = True
        self._due.set()
        self._thread.join(10)
        self._thread = None
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("metrics textfile %s: cannot remove: %s", self.path, e.strerror)
