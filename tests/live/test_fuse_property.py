"""Random writes to every writable file through the real mount, checked against a model.

The model is written here from the kernel's rules (5.4 lib/kstrtox.c and the *_store
functions of mm/lksm.c), not from lksmfs's code:

- sysfs hands store() the bytes NUL-terminated: parsing stops at the first NUL;
- kstrtoull(s, 10): optional '+', then one or more decimal digits, then at most one
  '\\n', then the end; no digits or anything else EINVAL; above 2^64-1 ERANGE;
- kstrtoll: a leading '-' then _kstrtoull of the rest (which takes no '+'), magnitude
  <= 2^63; else as kstrtoull, <= 2^63-1 (ERANGE beyond); kstrtoint: int32 range else ERANGE;
- kstrtobool (5.4): first char y/Y/1 true, n/N/0 false, o/O + n/N true, o/O + f/F false;
- a write of more than 4096 bytes stores its first 4096 (kernfs_fop_write_iter cuts it to
  PAGE_SIZE: measured on 6.18, see test_fuse_sysfs_semantics); an empty write stores nothing.

run is in the mix with every value, but an *accepted* run with the merge bit would
start the scanner and make the state timing-dependent, so those inputs are discarded
(hypothesis.assume); nothing ever merges, so EBUSY never applies.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from testkit.memproc import filled
from testkit.mount import Mounts, read_attr, skip_unless_fuse, write_attr

pytestmark = pytest.mark.live

U64 = 2**64 - 1
UINT = 2**32 - 1
DEFAULTS = {
    "run": 0,
    "pages_to_scan": 100,
    "sleep_millisecs": 20,
    "scan_boost": 100,
    "full_scan_interval": 100,
    "one_shot_scanning": 0,
    "max_page_sharing": 256,
    "stable_node_chains_prune_millisecs": 2000,
    "use_zero_pages": 0,
    "merge_across_nodes": 1,
}
_LEADING_DIGITS = re.compile(rb"[0-9]*")


class Refused(Exception):
    def __init__(self, err: int) -> None:
        self.err = err


def cstr(b: bytes) -> bytes:
    return b.split(b"\0", 1)[0]


def _digits(s: bytes) -> int:
    """_kstrtoull(): no digits is EINVAL; an overflow is ERANGE, whatever follows the
    digits; then one optional newline and nothing else."""
    m = _LEADING_DIGITS.match(s)
    d = m.group() if m else b""
    if not d:
        raise Refused(errno.EINVAL)
    if int(d) > U64:
        raise Refused(errno.ERANGE)
    if s[len(d):] not in (b"", b"\n"):
        raise Refused(errno.EINVAL)
    return int(d)


def m_kstrtoull(b: bytes) -> int:
    s = cstr(b)
    return _digits(s[1:] if s.startswith(b"+") else s)


def m_kstrtoint(b: bytes) -> int:
    s = cstr(b)
    if s.startswith(b"-"):
        mag = _digits(s[1:])
        if mag > 2**63:
            raise Refused(errno.ERANGE)
        v = -mag
    else:
        v = m_kstrtoull(s)
        if v > 2**63 - 1:
            raise Refused(errno.ERANGE)
    if not -(2**31) <= v <= 2**31 - 1:
        raise Refused(errno.ERANGE)
    return v


def m_kstrtobool(b: bytes) -> int:
    s = cstr(b)
    if s[:1] in (b"y", b"Y", b"1"):
        return 1
    if s[:1] in (b"n", b"N", b"0"):
        return 0
    if s[:1] in (b"o", b"O") and s[1:2] in (b"n", b"N"):
        return 1
    if s[:1] in (b"o", b"O") and s[1:2] in (b"f", b"F"):
        return 0
    raise Refused(errno.EINVAL)


def einval_on_error(f):  # type: ignore[no-untyped-def]
    def g(b: bytes) -> int:
        try:
            return f(b)
        except Refused:
            raise Refused(errno.EINVAL) from None

    return g


def model_store(state: dict[str, int], name: str, data: bytes) -> tuple[int, dict[str, int]]:
    """(errno or 0, new state) for one write of `data` to `name`."""
    data = data[:4096]
    if not data:
        return 0, state
    new = dict(state)
    try:
        if name in ("pages_to_scan", "sleep_millisecs", "full_scan_interval",
                    "stable_node_chains_prune_millisecs"):
            v = einval_on_error(m_kstrtoull)(data)
            if v > UINT:
                raise Refused(errno.EINVAL)
            new[name] = v
        elif name == "run":
            v = einval_on_error(m_kstrtoull)(data)
            if v > 8:
                raise Refused(errno.EINVAL)
            new[name] = v
        elif name == "scan_boost":
            v = einval_on_error(m_kstrtoint)(data)
            if not 100 <= v <= 10000:
                raise Refused(errno.EINVAL)
            new[name] = v
        elif name == "one_shot_scanning":
            v = einval_on_error(m_kstrtoint)(data)
            if v not in (1, 2) or state[name] != 0:  # pending: "still scanning"
                raise Refused(errno.EINVAL)
            new[name] = v
        elif name == "max_page_sharing":
            v = m_kstrtoint(data)  # its errno passes through
            if v < 2:
                raise Refused(errno.EINVAL)
            new[name] = v
        elif name == "merge_across_nodes":
            v = m_kstrtoull(data)  # its errno passes through
            if v > 1:
                raise Refused(errno.EINVAL)
            new[name] = v
        elif name == "use_zero_pages":
            new[name] = einval_on_error(m_kstrtobool)(data)
        else:
            raise AssertionError(name)
    except Refused as r:
        return r.err, state
    return 0, new


def shown(name: str, value: int) -> str:
    if name == "run" and value & 8:
        return "8\n"
    return f"{value}\n"


# inputs: numbers written the many ways people (and fuzzers) write them
_num = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, 2, 7, 8, 9, 99, 100, 10000, 10001, UINT, UINT + 1, 2**31 - 1,
                     2**31, -(2**31), -(2**31) - 1, 2**63, U64, U64 + 1]),
)
_text = st.builds(
    lambda pre, n, post: pre + str(n).encode() + post,
    st.sampled_from([b"", b"+", b"-", b" ", b"\t", b"0x", b"+-", b"-+", b"00", b"\n"]),
    _num,
    st.sampled_from([b"", b"\n", b"\n\n", b" ", b" \n", b"\0", b"\0junk", b"x", b".5", b"\r\n"]),
)
_words = st.sampled_from([b"", b"\n", b" ", b"y", b"Y\n", b"n", b"no", b"on", b"ON", b"off",
                          b"oF", b"o", b"of", b"yes\n", b"true", b"\0", b"\xff\xfe",
                          b"1" * 5000, b"7" + b"\0" * 4095, b"9\n" + b"\0" * 5000,
                          b"0" * 4094 + b"12" + b"junk"])
_junk = st.binary(max_size=40)
INPUTS = st.one_of(_text, _words, _junk)
NAMES = st.sampled_from(sorted(DEFAULTS))


@pytest.fixture(scope="module")
def mount() -> Iterator[tuple[Path, Mounts]]:
    skip_unless_fuse()
    with Mounts() as m, filled(16) as c:
        d = m.start("--pid", str(c.pid), "--set", "run=0", "--no-freezer")
        yield d.mountpoint, m


class Model:
    state: dict[str, int] = dict(DEFAULTS)


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(name=NAMES, data=INPUTS)
@example(name="max_page_sharing", data=b"18446744073709551616\n\n")  # ERANGE before the junk
@example(name="merge_across_nodes", data=b"99999999999999999999x")
def test_random_writes_match_the_kernel_rules(
    mount: tuple[Path, Mounts], name: str, data: bytes
) -> None:
    mp, mounts = mount
    err, new = model_store(Model.state, name, data)
    assume(not (name == "run" and err == 0 and new["run"] & 9))  # merge or one-shot
    got = write_attr(mp, name, data)
    assert got == err, (name, data, got, err)
    Model.state = new
    for key, value in Model.state.items():
        assert read_attr(mp, key) == shown(key, value), (name, data, key)
    assert all(d.proc.poll() is None for d in mounts.daemons)
