"""node_exporter (Debian's prometheus-node-exporter) for live tests: started on a free
port of 127.0.0.1 with only the collectors a test names, always stopped; its samples
parsed into (name, labels) -> value."""

from __future__ import annotations

import contextlib
import re
import shutil
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from lksmfs.system.waiting import wait_until

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def node_exporter_binary() -> str:
    found = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if found is None:
        import pytest

        pytest.skip("prometheus-node-exporter is not installed (`make setup` installs it as root)")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:  # noqa: S310 - loopback only
        return str(r.read().decode())


@contextlib.contextmanager
def node_exporter(log: Path, *collector_args: str) -> Iterator[str]:
    """node_exporter with only the given collectors; yields its /metrics URL."""
    binary = node_exporter_binary()
    for _ in range(3):  # another process may take the free port first: try another
        port = _free_port()
        url = f"http://127.0.0.1:{port}/metrics"
        with open(log, "wb") as out:
            p = subprocess.Popen([binary, f"--web.listen-address=127.0.0.1:{port}",
                                  "--collector.disable-defaults", *collector_args],
                                 stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)

        def answers(p: subprocess.Popen[bytes] = p, url: str = url) -> bool:
            if p.poll() is not None:
                return True
            try:
                scrape(url)
                return True
            except OSError:
                return False

        wait_until(answers, 20)
        if p.poll() is None:
            break
    else:
        import pytest

        pytest.fail(f"node_exporter did not start:\n{log.read_text()}")
    try:
        yield url
    finally:
        p.terminate()
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """(name, labels) -> value of every sample line; label values unescaped."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        assert m, line
        labels = frozenset(
            (k, re.sub(r"\\(.)", lambda e: "\n" if e.group(1) == "n" else e.group(1), v))
            for k, v in _LABEL.findall(m.group(2) or "")
        )
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def value(s: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return s.get((name, frozenset(labels.items())))


