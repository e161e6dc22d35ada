"""The whole suite: processes started by tests get the signals a terminal would give them.

A run started in the background by a non-interactive shell (CI, `nohup make test`,
`make test &`) inherits SIGINT and SIGQUIT ignored, and every process it starts would
too: a test's Ctrl-C (`lksmfs scan`) or SIGQUIT (`lksmfs mount`) would then be ignored
by design (an inherited SIG_IGN is respected, as libfuse and the daemon do).  Handled
here instead, they are back to their default in the processes the tests exec.

Property tests (hypothesis) explore new examples on every developer run; under CI
(`CI` set, as `.ci/run` is run) they replay the examples their seed derives
(`derandomize`), so a landing is judged on the same cases every time - an example a
developer run finds is kept as an `@example` or a worked test.
"""

from __future__ import annotations

import os
import signal

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def pytest_configure(config: pytest.Config) -> None:
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # what Python does on a terminal
    if signal.getsignal(signal.SIGQUIT) == signal.SIG_IGN:
        signal.signal(signal.SIGQUIT, lambda signum, frame: None)  # exec resets a handler to SIG_DFL
