"""Workload files: YAML describing the MEMORY of a set of apps, loaded into frozen dataclasses.

A workload says which libraries exist (size of their .data/.bss in pages, how much of it
is identical in every process), which apps run (how many instances, which libraries,
heap/stack/extra anonymous mappings, volatility, CPU time, what they ask of mainline
KSM: `ksm: none|prctl|[areas]`) and a timeline of events
(freeze, thaw, exit, spawn, rewrite, one_shot) at scan-round numbers.  The same file
drives the simulated source and the real-process spawner, so both realise the same
pages (lksmfs.workload.model holds the content function).

Every validation error names the file, the key path and the reason, so a typo in a
40-app file is found at once: ``WorkloadError("tv.yaml: apps[3].heap.share: ...")``.
The schema itself is documented at the top of config/workloads/tizen-tv.yaml.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

MAX_SECTION_PAGES = 1 << 20  # 4 GiB of one section: anything larger is a typo
# what an app asks of mainline KSM (policy `ksm`; LKSM scans every app regardless):
KSM_NONE = "none"  # nothing: mainline ksmd never looks at it
KSM_PRCTL = "prctl"  # prctl(PR_SET_MEMORY_MERGE): every mapping mergeable
# a list of these madvise(MADV_MERGEABLE)s just those areas (an anon mapping by its name)
KSM_AREAS = ("heap", "stack", "data", "bss")
NAME_RE = re.compile(r"^[A-Za-z0-9_.+-]+$")  # no '/': it separates app and instance
ACTIONS = ("freeze", "thaw", "exit", "spawn", "rewrite", "one_shot")


class WorkloadError(ValueError):
    """A workload file is malformed; the message is `FILE: KEY: REASON`."""


@dataclass(frozen=True)
class Library:
    """A shared library as a process maps it: text (exec), rodata, .data (file, COWed), .bss.

    `share`/`zero` are the fractions of .data pages whose content is the same in every
    process (a function of library and offset) and that are written with zeros; the rest
    are unique per process.  `bss_share`/`bss_zero` do the same for .bss.
    """

    name: str
    data_pages: int
    bss_pages: int
    share: float = 0.0
    zero: float = 0.0
    bss_share: float = 0.0
    bss_zero: float = 0.0
    text_pages: int = 4
    rodata_pages: int = 1


@dataclass(frozen=True)
class Section:
    """An anonymous area of an app: heap, stack or an extra mapping (`name` is its pool).

    Shared pages of a section have content that is a function of (pool, index), so they are
    equal across every app with the same pool: heap pool `heap`, stack pool `stack`, an
    extra mapping's pool is its name.
    """

    pages: int
    share: float = 0.0
    zero: float = 0.0
    name: str = ""


@dataclass(frozen=True)
class App:
    """An application: `count` identical instances named APP/0 .. APP/count-1."""

    name: str
    count: int
    libraries: tuple[str, ...]
    heap: Section
    stack: Section
    anon: tuple[Section, ...] = ()
    volatile: float = 0.0  # fraction of each section's unique pages rewritten every round
    cpu_ms: int = 1000  # CPU time the instance has used (short-task rule: < 100 ms)
    # mainline KSM opt-in: KSM_NONE, KSM_PRCTL, or the areas it madvises (KSM_AREAS or
    # the names of its anon mappings)
    ksm: str | tuple[str, ...] = KSM_NONE
    # the NUMA node each instance's memory is on: instance K on numa_nodes[K % len]
    # (simulated memory only; merge_across_nodes 0 keeps the nodes apart)
    numa_nodes: tuple[int, ...] = (0,)

    def node_of(self, index: int) -> int:
        """The NUMA node instance `index` of the app lives on."""
        return self.numa_nodes[index % len(self.numa_nodes)]

    def ksm_mergeable(self, area: str) -> bool:
        """Is this area of the app VM_MERGEABLE (heap, stack, data, bss, ANON_NAME)?"""
        return self.ksm == KSM_PRCTL or (isinstance(self.ksm, tuple) and area in self.ksm)


@dataclass(frozen=True)
class Event:
    """One timeline entry.  `target` is an app name (all its live instances) or APP/K."""

    round: int
    action: str  # one of ACTIONS
    target: str = ""  # freeze/thaw/exit/rewrite: app or instance; spawn: app
    fraction: float = 0.0  # rewrite
    count: int = 1  # spawn
    mode: int = 0  # one_shot: 1 partial, 2 full


@dataclass(frozen=True)
class Workload:
    path: str
    seed: int
    libraries: tuple[Library, ...]
    apps: tuple[App, ...]
    timeline: tuple[Event, ...] = ()
    _libs: dict[str, Library] = field(default_factory=dict, init=False, compare=False, repr=False)
    _apps: dict[str, App] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._libs.update({lib.name: lib for lib in self.libraries})
        self._apps.update({app.name: app for app in self.apps})

    def library(self, name: str) -> Library:
        return self._libs[name]

    def app(self, name: str) -> App:
        return self._apps[name]

    def app_libraries(self, app: App) -> list[Library]:
        return [self._libs[n] for n in app.libraries]

    def to_dict(self, apps: list[str] | None = None, timeline: bool = True) -> dict[str, Any]:
        """The YAML form again (optionally restricted to some apps): how a spawned child is
        told its memory without re-reading the file."""
        chosen = [a for a in self.apps if apps is None or a.name in apps]
        libs = {n for a in chosen for n in a.libraries}

        def section(s: Section) -> dict[str, Any]:
            d: dict[str, Any] = {"pages": s.pages, "share": s.share, "zero": s.zero}
            if s.name:
                d["name"] = s.name
            return d

        out: dict[str, Any] = {
            "seed": self.seed,
            "libraries": [
                {
                    "name": lib.name,
                    "data_pages": lib.data_pages,
                    "bss_pages": lib.bss_pages,
                    "share": lib.share,
                    "zero": lib.zero,
                    "bss_share": lib.bss_share,
                    "bss_zero": lib.bss_zero,
                    "text_pages": lib.text_pages,
                    "rodata_pages": lib.rodata_pages,
                }
                for lib in self.libraries
                if lib.name in libs
            ],
            "apps": [
                {
                    "name": a.name,
                    "count": a.count,
                    "libraries": list(a.libraries),
                    "heap": section(a.heap),
                    "stack": section(a.stack),
                    "anon": [section(s) for s in a.anon],
                    "volatile": a.volatile,
                    "cpu_ms": a.cpu_ms,
                    "ksm": list(a.ksm) if isinstance(a.ksm, tuple) else a.ksm,
                    "numa_nodes": list(a.numa_nodes),
                }
                for a in chosen
            ],
        }
        if timeline and apps is None:
            out["timeline"] = [_event_dict(e) for e in self.timeline]
        return out


def _event_dict(e: Event) -> dict[str, Any]:
    d: dict[str, Any] = {"round": e.round}
    if e.action == "one_shot":
        d["one_shot"] = e.mode
    else:
        d[e.action] = e.target
    if e.action == "rewrite":
        d["fraction"] = e.fraction
    if e.action == "spawn" and e.count != 1:
        d["count"] = e.count
    return d


class _Checker:
    """Validation helpers that know the file name, so every error says FILE: KEY: REASON."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, reason: str) -> WorkloadError:
        return WorkloadError(f"{self.path}: {key}: {reason}")

    def mapping(self, value: Any, key: str, allowed: set[str], required: set[str]) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"expected a mapping, got {type(value).__name__}")
        for k in value:
            if k not in allowed:
                raise self.fail(f"{key}.{k}", f"unknown key (allowed: {', '.join(sorted(allowed))})")
        for k in sorted(required):
            if k not in value:
                raise self.fail(f"{key}.{k}", "missing")
        return value

    def integer(self, value: Any, key: str, lo: int = 0, hi: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}")
        if value < lo:
            raise self.fail(key, f"must be >= {lo}, got {value}")
        if hi is not None and value > hi:
            raise self.fail(key, f"must be <= {hi}, got {value}")
        return value

    def fraction(self, value: Any, key: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a fraction in [0, 1], got {value!r}")
        if not 0.0 <= float(value) <= 1.0:
            raise self.fail(key, f"must be in [0, 1], got {value}")
        return float(value)

    def name(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not NAME_RE.match(value):
            raise self.fail(key, f"expected a name of letters, digits and _.+-, got {value!r}")
        return value

    def share_zero(self, share: float, zero: float, key: str, zkey: str = "zero") -> None:
        if share + zero > 1.0 + 1e-9:
            raise self.fail(f"{key}.{zkey}", f"share + zero must be <= 1, got {share} + {zero}")


def _library(c: _Checker, raw: Any, key: str) -> Library:
    d = c.mapping(
        raw,
        key,
        {"name", "data_pages", "bss_pages", "share", "zero", "bss_share", "bss_zero",
         "text_pages", "rodata_pages"},
        {"name", "data_pages", "bss_pages"},
    )
    share = c.fraction(d.get("share", 0.0), f"{key}.share")
    zero = c.fraction(d.get("zero", 0.0), f"{key}.zero")
    c.share_zero(share, zero, key)
    bss_share = c.fraction(d.get("bss_share", share), f"{key}.bss_share")
    bss_zero = c.fraction(d.get("bss_zero", zero), f"{key}.bss_zero")
    c.share_zero(bss_share, bss_zero, key, "bss_zero")
    return Library(
        name=c.name(d["name"], f"{key}.name"),
        data_pages=c.integer(d["data_pages"], f"{key}.data_pages", 0, MAX_SECTION_PAGES),
        bss_pages=c.integer(d["bss_pages"], f"{key}.bss_pages", 0, MAX_SECTION_PAGES),
        share=share,
        zero=zero,
        bss_share=bss_share,
        bss_zero=bss_zero,
        text_pages=c.integer(d.get("text_pages", 4), f"{key}.text_pages", 1, MAX_SECTION_PAGES),
        rodata_pages=c.integer(d.get("rodata_pages", 1), f"{key}.rodata_pages", 1,
                               MAX_SECTION_PAGES),
    )


def _section(c: _Checker, raw: Any, key: str, named: bool = False, lo: int = 0) -> Section:
    allowed = {"pages", "share", "zero"} | ({"name"} if named else set())
    d = c.mapping(raw, key, allowed, {"pages"})
    share = c.fraction(d.get("share", 0.0), f"{key}.share")
    zero = c.fraction(d.get("zero", 0.0), f"{key}.zero")
    c.share_zero(share, zero, key)
    name = c.name(d["name"], f"{key}.name") if "name" in d else ""
    return Section(
        pages=c.integer(d["pages"], f"{key}.pages", lo, MAX_SECTION_PAGES),
        share=share,
        zero=zero,
        name=name,
    )


def _app(c: _Checker, raw: Any, key: str, libs: dict[str, Library]) -> App:
    d = c.mapping(
        raw,
        key,
        {"name", "count", "libraries", "heap", "stack", "anon", "volatile", "cpu_ms", "ksm", "numa_nodes"},
        {"name", "heap"},
    )
    name = c.name(d["name"], f"{key}.name")
    lib_names = d.get("libraries", [])
    if not isinstance(lib_names, list):
        raise c.fail(f"{key}.libraries", "expected a list of library names")
    for i, ln in enumerate(lib_names):
        if ln not in libs:
            raise c.fail(f"{key}.libraries[{i}]", f"unknown library {ln!r}")
        if ln in lib_names[:i]:
            raise c.fail(f"{key}.libraries[{i}]", f"library {ln!r} listed twice")
    anon_raw = d.get("anon", [])
    if isinstance(anon_raw, dict):
        anon_raw = [anon_raw]
    if not isinstance(anon_raw, list):
        raise c.fail(f"{key}.anon", "expected a list of {pages, share, zero, name}")
    anon: list[Section] = []
    for i, a in enumerate(anon_raw):
        s = _section(c, a, f"{key}.anon[{i}]", named=True, lo=1)
        if not s.name:
            s = Section(s.pages, s.share, s.zero, f"anon{i}")
        if any(o.name == s.name for o in anon):
            raise c.fail(f"{key}.anon[{i}].name", f"duplicate anon mapping name {s.name!r}")
        anon.append(s)
    return App(
        name=name,
        count=c.integer(d.get("count", 1), f"{key}.count", 0, 10000),
        libraries=tuple(lib_names),
        heap=_section(c, d["heap"], f"{key}.heap"),
        stack=_section(c, d.get("stack", {"pages": 1}), f"{key}.stack"),
        anon=tuple(anon),
        volatile=c.fraction(d.get("volatile", 0.0), f"{key}.volatile"),
        cpu_ms=c.integer(d.get("cpu_ms", 1000), f"{key}.cpu_ms", 0),
        ksm=_ksm_opt_in(c, d.get("ksm", KSM_NONE), f"{key}.ksm", [s.name for s in anon]),
        numa_nodes=_numa_nodes(c, d.get("numa_nodes", [0]), f"{key}.numa_nodes"),
    )


def _numa_nodes(c: _Checker, raw: Any, key: str) -> tuple[int, ...]:
    """A non-empty list of node ids (0..1023: MAX_NUMNODES of NODES_SHIFT 10)."""
    if not isinstance(raw, list) or not raw:
        raise c.fail(key, f"expected a non-empty list of NUMA node ids, got {raw!r}")
    return tuple(c.integer(n, f"{key}[{i}]", 0, 1023) for i, n in enumerate(raw))


def _ksm_opt_in(c: _Checker, raw: Any, key: str, anon: list[str]) -> str | tuple[str, ...]:
    """`none`, `prctl`, or a non-empty list of areas to madvise: heap, stack, data (every
    library's .data), bss (every library's .bss) or the name of one of its anon mappings."""
    if raw in (KSM_NONE, KSM_PRCTL):
        return str(raw)
    allowed = (*KSM_AREAS, *anon)
    if not isinstance(raw, list) or not raw:
        raise c.fail(key, f"expected none, prctl or a list of areas to madvise ({', '.join(allowed)}), "
                          f"got {raw!r}")
    for i, area in enumerate(raw):
        if area not in allowed:
            raise c.fail(f"{key}[{i}]", f"unknown area {area!r} (allowed: {', '.join(allowed)})")
        if area in raw[:i]:
            raise c.fail(f"{key}[{i}]", f"area {area!r} listed twice")
    return tuple(raw)


def _event(c: _Checker, raw: Any, key: str, apps: dict[str, App], spawns: dict[str, int]) -> Event:
    d = c.mapping(raw, key, {"round", "fraction", "count", *ACTIONS}, {"round"})
    rnd = c.integer(d["round"], f"{key}.round", 0)
    actions = [a for a in ACTIONS if a in d]
    if len(actions) != 1:
        raise c.fail(key, f"needs exactly one of {', '.join(ACTIONS)}, got {actions or 'none'}")
    action = actions[0]
    akey = f"{key}.{action}"
    if "fraction" in d and action != "rewrite":
        raise c.fail(f"{key}.fraction", "only a rewrite takes a fraction")
    if "count" in d and action != "spawn":
        raise c.fail(f"{key}.count", "only a spawn takes a count")
    if action == "one_shot":
        mode = d["one_shot"]
        if mode not in (1, 2) or isinstance(mode, bool):
            raise c.fail(akey, f"must be 1 (partial) or 2 (full), got {mode!r}")
        return Event(rnd, action, mode=mode)
    target = d[action]
    if not isinstance(target, str):
        raise c.fail(akey, f"expected an app or APP/INDEX, got {target!r}")
    app_name, sep, idx = target.partition("/")
    if app_name not in apps:
        raise c.fail(akey, f"unknown app {app_name!r}")
    if action == "spawn":
        if sep:
            raise c.fail(akey, "spawn takes an app name, not an instance")
        count = c.integer(d.get("count", 1), f"{key}.count", 1, 10000)
        spawns[app_name] = spawns.get(app_name, 0) + count
        return Event(rnd, action, target, count=count)
    if sep:
        if not idx.isdigit():
            raise c.fail(akey, f"instance index must be a number, got {idx!r}")
        limit = apps[app_name].count + spawns.get(app_name, 0)
        if int(idx) >= limit:
            raise c.fail(akey, f"{app_name} has only {limit} instance(s) by then (0..{limit - 1})")
    fraction = 0.0
    if action == "rewrite":
        if "fraction" not in d:
            raise c.fail(f"{key}.fraction", "missing")
        fraction = c.fraction(d["fraction"], f"{key}.fraction")
    return Event(rnd, action, target, fraction=fraction)


def parse_workload(data: Any, path: str = "<workload>") -> Workload:
    """Validate an already-parsed YAML document; errors name `path`."""
    c = _Checker(path)
    d = c.mapping(data, "<top>", {"seed", "libraries", "apps", "timeline"}, {"apps"})
    seed = c.integer(d.get("seed", 0), "seed", 0, 2**64 - 1)
    libs_raw = d.get("libraries") or []
    if not isinstance(libs_raw, list):
        raise c.fail("libraries", "expected a list")
    libs: dict[str, Library] = {}
    for i, raw in enumerate(libs_raw):
        lib = _library(c, raw, f"libraries[{i}]")
        if lib.name in libs:
            raise c.fail(f"libraries[{i}].name", f"duplicate library {lib.name!r}")
        libs[lib.name] = lib
    apps_raw = d["apps"]
    if not isinstance(apps_raw, list) or not apps_raw:
        raise c.fail("apps", "expected a non-empty list")
    apps: dict[str, App] = {}
    for i, raw in enumerate(apps_raw):
        app = _app(c, raw, f"apps[{i}]", libs)
        if app.name in apps:
            raise c.fail(f"apps[{i}].name", f"duplicate app {app.name!r}")
        apps[app.name] = app
    tl_raw = d.get("timeline") or []
    if not isinstance(tl_raw, list):
        raise c.fail("timeline", "expected a list of events")
    spawns: dict[str, int] = {}
    events = []
    indexed = sorted(enumerate(tl_raw), key=lambda p: _round_key(p[1]))
    for i, raw in indexed:  # in round order, so APP/K may name an instance spawned earlier
        events.append((i, _event(c, raw, f"timeline[{i}]", apps, spawns)))
    events.sort(key=lambda p: (p[1].round, p[0]))
    return Workload(
        path=path,
        seed=seed,
        libraries=tuple(libs.values()),
        apps=tuple(apps.values()),
        timeline=tuple(e for _, e in events),
    )


def _round_key(raw: Any) -> int:
    r = raw.get("round") if isinstance(raw, dict) else None
    return r if isinstance(r, int) and not isinstance(r, bool) else -1


def load_workload(path: str) -> Workload:
    """Read and validate a workload YAML file."""
    import yaml  # lazily: spawned children parse a dict and should start fast

    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise WorkloadError(f"{path}: <file>: {e.strerror or e}") from e
    except yaml.YAMLError as e:
        raise WorkloadError(f"{path}: <yaml>: {e}") from e
    return parse_workload(data, path)
