"""Workload files: the shipped ones load; every bad value is reported as FILE: KEY: REASON."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from lksmfs.workload.schema import WorkloadError, load_workload, parse_workload

CONFIG = Path(__file__).resolve().parents[2] / "config" / "workloads"

BASE: dict[str, Any] = {
    "seed": 1,
    "libraries": [{"name": "liba.so", "data_pages": 4, "bss_pages": 2, "share": 0.5}],
    "apps": [
        {"name": "viewer", "count": 2, "libraries": ["liba.so"], "heap": {"pages": 8}},
        {"name": "player", "heap": {"pages": 4}},
    ],
    "timeline": [],
}


def test_small_loads_as_written() -> None:
    w = load_workload(str(CONFIG / "small.yaml"))
    assert w.seed == 7
    assert [lib.name for lib in w.libraries] == ["libfoo.so.1", "libbar.so.2"]
    foo = w.library("libfoo.so.1")
    assert (foo.data_pages, foo.bss_pages, foo.share, foo.zero) == (4, 2, 0.5, 0.25)
    assert (foo.bss_share, foo.bss_zero) == (0.5, 0.25)  # default: the .data fractions
    assert (foo.text_pages, foo.rodata_pages) == (2, 1)
    viewer = w.app("viewer")
    assert viewer.count == 2 and viewer.libraries == ("libfoo.so.1", "libbar.so.2")
    assert (viewer.heap.pages, viewer.heap.share, viewer.heap.zero) == (8, 0.5, 0.25)
    player = w.app("player")
    assert player.count == 1  # default
    assert [(a.name, a.pages, a.share) for a in player.anon] == [("gpu", 4, 0.5)]
    assert player.volatile == 0.5 and w.app("widget").cpu_ms == 50
    assert [(e.round, e.action) for e in w.timeline] == [
        (1, "freeze"), (2, "one_shot"), (3, "rewrite"), (4, "thaw"), (5, "spawn"),
        (6, "exit"), (6, "one_shot"),
    ]
    assert w.timeline[2].fraction == 0.5 and w.timeline[6].mode == 2


def test_tizen_loads_with_every_kind_of_event() -> None:
    w = load_workload(str(CONFIG / "tizen-tv.yaml"))
    instances = sum(a.count for a in w.apps)
    assert 30 <= instances <= 40
    assert len(w.libraries) >= 30
    assert {e.action for e in w.timeline} == {"freeze", "thaw", "exit", "spawn", "rewrite",
                                             "one_shot"}
    assert any(a.cpu_ms < 100 for a in w.apps)  # short tasks for the short-task rule
    rounds = [e.round for e in w.timeline]
    assert rounds == sorted(rounds)


def test_to_dict_round_trips() -> None:
    w = load_workload(str(CONFIG / "small.yaml"))
    again = parse_workload(w.to_dict(), w.path)
    assert again.libraries == w.libraries and again.apps == w.apps
    assert again.timeline == w.timeline


def test_timeline_may_name_an_instance_spawned_earlier() -> None:
    d = copy.deepcopy(BASE)
    d["timeline"] = [{"round": 5, "freeze": "viewer/2"}, {"round": 2, "spawn": "viewer"}]
    w = parse_workload(d, "t.yaml")
    assert [(e.round, e.action, e.target) for e in w.timeline] == [
        (2, "spawn", "viewer"), (5, "freeze", "viewer/2")]


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d[int(p)] if isinstance(d, list) else d[p]
    if isinstance(d, list):
        d[int(parts[-1])] = value
    elif value is _DELETE:
        del d[parts[-1]]
    else:
        d[parts[-1]] = value


_DELETE = object()

BAD = [
    ("libraries.0.share", 1.5, "libraries[0].share", "must be in [0, 1]"),
    ("libraries.0.zero", 0.6, "libraries[0].zero", "share + zero must be <= 1"),
    ("libraries.0.bss_zero", 0.7, "libraries[0].bss_zero", "share + zero must be <= 1"),
    ("libraries.0.data_pages", -1, "libraries[0].data_pages", "must be >= 0"),
    ("libraries.0.text_pages", 0, "libraries[0].text_pages", "must be >= 1"),
    ("libraries.0.data_pages", "4", "libraries[0].data_pages", "expected an integer"),
    ("libraries.0.name", "lib/a", "libraries[0].name", "expected a name"),
    ("libraries.0.size", 3, "libraries[0].size", "unknown key"),
    ("apps.0.libraries", ["libz.so"], "apps[0].libraries[0]", "unknown library 'libz.so'"),
    ("apps.0.libraries", ["liba.so", "liba.so"], "apps[0].libraries[1]", "listed twice"),
    ("apps.0.heap", _DELETE, "apps[0].heap", "missing"),
    ("apps.0.heap", {"pages": -2}, "apps[0].heap.pages", "must be >= 0"),
    ("apps.0.heap", {"pages": 4, "share": "half"}, "apps[0].heap.share", "expected a fraction"),
    ("apps.0.heap", {"pages": 4, "share": 0.7, "zero": 0.4}, "apps[0].heap.zero", "share + zero"),
    ("apps.0.count", True, "apps[0].count", "expected an integer"),
    ("apps.0.volatile", -0.1, "apps[0].volatile", "must be in [0, 1]"),
    ("apps.0.cpu_ms", 1.5, "apps[0].cpu_ms", "expected an integer"),
    ("apps.0.heep", {"pages": 1}, "apps[0].heep", "unknown key"),
    ("apps.0.anon", [{"pages": 0}], "apps[0].anon[0].pages", "must be >= 1"),
    ("apps.0.anon", [{"name": "x", "pages": 1}, {"name": "x", "pages": 2}],
     "apps[0].anon[1].name", "duplicate anon mapping name"),
    ("apps.1.name", "viewer", "apps[1].name", "duplicate app 'viewer'"),
    ("apps", [], "apps", "non-empty"),
    ("seed", -3, "seed", "must be >= 0"),
    ("timeline", [{"round": 1, "freeze": "viewer", "thaw": "viewer"}], "timeline[0]",
     "exactly one of"),
    ("timeline", [{"round": 1}], "timeline[0]", "exactly one of"),
    ("timeline", [{"freeze": "viewer"}], "timeline[0].round", "missing"),
    ("timeline", [{"round": -1, "freeze": "viewer"}], "timeline[0].round", "must be >= 0"),
    ("timeline", [{"round": 1, "one_shot": 3}], "timeline[0].one_shot",
     "must be 1 (partial) or 2 (full)"),
    ("timeline", [{"round": 1, "freeze": "tv"}], "timeline[0].freeze", "unknown app 'tv'"),
    ("timeline", [{"round": 1, "thaw": "viewer/2"}], "timeline[0].thaw",
     "viewer has only 2 instance(s)"),
    ("timeline", [{"round": 1, "exit": "viewer/x"}], "timeline[0].exit", "must be a number"),
    ("timeline", [{"round": 1, "rewrite": "viewer"}], "timeline[0].fraction", "missing"),
    ("timeline", [{"round": 1, "rewrite": "viewer", "fraction": 2}], "timeline[0].fraction",
     "must be in [0, 1]"),
    ("timeline", [{"round": 1, "freeze": "viewer", "fraction": 0.5}], "timeline[0].fraction",
     "only a rewrite"),
    ("timeline", [{"round": 1, "spawn": "viewer/0"}], "timeline[0].spawn",
     "takes an app name"),
    ("timeline", [{"round": 1, "spawn": "viewer", "count": 0}], "timeline[0].count",
     "must be >= 1"),
]


@pytest.mark.parametrize("where,value,key,reason", BAD, ids=[f"{b[2]}:{b[3]}" for b in BAD])
def test_bad_value_names_file_key_and_reason(
    tmp_path: Path, where: str, value: Any, key: str, reason: str
) -> None:
    d = copy.deepcopy(BASE)
    _set(d, where, value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(WorkloadError) as info:
        load_workload(str(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}: {key}: "), msg
    assert reason in msg, msg


def test_duplicate_library_is_named(tmp_path: Path) -> None:
    d = copy.deepcopy(BASE)
    d["libraries"].append(dict(d["libraries"][0]))
    with pytest.raises(WorkloadError, match=r"^t\.yaml: libraries\[1\]\.name: duplicate"):
        parse_workload(d, "t.yaml")


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("apps: [\n")
    with pytest.raises(WorkloadError, match=rf"^{path}: <yaml>: "):
        load_workload(str(path))
    missing = os.path.join(tmp_path, "nope.yaml")
    with pytest.raises(WorkloadError, match=rf"^{missing}: <file>: No such file"):
        load_workload(missing)


def test_top_level_must_be_a_mapping() -> None:
    with pytest.raises(WorkloadError, match=r"^x\.yaml: <top>: expected a mapping"):
        parse_workload(["apps"], "x.yaml")
