"""sd_notify(3) without libsystemd: readiness, status and the watchdog for
systemd/lksmfs.service (Type=notify, WatchdogSec=)."""

from __future__ import annotations

import logging
import os
import socket

log = logging.getLogger("lksmfs.daemon")  # the daemon's logger: log lines keep their name


def sd_notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Send `message` to $NOTIFY_SOCKET (AF_UNIX datagram; '@' = abstract). False if unset."""
    environ = os.environ if env is None else env
    addr = environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
        return True
    except OSError as e:
        log.warning("sd_notify(%s) failed: %s", message.replace("\n", " "), e)
        return False


def watchdog_interval(env: dict[str, str] | None = None) -> float | None:
    """Half of WATCHDOG_USEC in seconds, if the watchdog is enabled for this process."""
    environ = os.environ if env is None else env
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        return max(int(usec), 1) / 2e6
    except ValueError:
        return None
