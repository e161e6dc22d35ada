"""The kernel's kstrto*() parsers (lib/kstrtox.c), so writes are accepted and refused
exactly as sysfs would: an optional '+', decimal digits, one optional trailing newline."""

from __future__ import annotations

import errno

_ULL_MAX = 2**64 - 1


class ParseError(Exception):
    def __init__(self, err: int) -> None:
        super().__init__(errno.errorcode.get(err, str(err)))
        self.errno = err


def _cstring(buf: bytes) -> bytes:
    """sysfs hands store() a NUL-terminated copy: parsing stops at the first NUL."""
    nul = buf.find(b"\0")
    return buf if nul < 0 else buf[:nul]


def sysfs_streq(buf: bytes, word: str) -> bool:
    """sysfs_streq(): the C string equals `word`, give or take one trailing newline."""
    s = _cstring(buf)
    return (s[:-1] if s.endswith(b"\n") else s) == word.encode()


def kstrtoull(buf: bytes) -> int:
    """kstrtoull(s, 10): '+'? digits '\\n'?; no digits EINVAL, overflow ERANGE."""
    s = _cstring(buf)
    return _kstrtoull(s[1:] if s[:1] == b"+" else s)


def _kstrtoull(s: bytes) -> int:
    """_kstrtoull(): digits and one optional newline; no sign of any kind."""
    i = start = 0
    value = 0
    overflow = False
    while i < len(s) and 0x30 <= s[i] <= 0x39:
        value = value * 10 + (s[i] - 0x30)
        if value > _ULL_MAX:
            overflow = True
        i += 1
    if i == start:
        raise ParseError(errno.EINVAL)
    if overflow:
        raise ParseError(errno.ERANGE)
    if s[i : i + 1] == b"\n":
        i += 1
    if i != len(s):
        raise ParseError(errno.EINVAL)
    return value


def kstrtoul(buf: bytes) -> int:
    return kstrtoull(buf)


def kstrtoll(buf: bytes) -> int:
    s = _cstring(buf)
    if s[:1] == b"-":
        tmp = _kstrtoull(s[1:])  # the kernel takes no + after the -
        if tmp > 2**63:
            raise ParseError(errno.ERANGE)
        return -tmp
    tmp = kstrtoull(s)
    if tmp > 2**63 - 1:
        raise ParseError(errno.ERANGE)
    return tmp


def kstrtoint(buf: bytes) -> int:
    value = kstrtoll(buf)
    if not -(2**31) <= value <= 2**31 - 1:
        raise ParseError(errno.ERANGE)
    return value


def kstrtobool(buf: bytes) -> bool:
    """Only the first one or two characters count, as in 5.4's lib/kstrtox.c (y/n/1/0/on/off)."""
    s = _cstring(buf)
    if not s:
        raise ParseError(errno.EINVAL)
    c = chr(s[0])
    if c in "yY1":
        return True
    if c in "nN0":
        return False
    if c in "oO" and len(s) > 1:
        c2 = chr(s[1])
        if c2 in "nN":
            return True
        if c2 in "fF":
            return False
    raise ParseError(errno.EINVAL)
