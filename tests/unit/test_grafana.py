"""The shipped Grafana dashboard (config/grafana/lksmfs-grafana.json) queries only
metrics lksmfs writes: every PromQL expression is parsed for its metric names, and each
must be a family lksmfs.daemon.metrics renders for an engine of either policy."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from memfake import FakeSource, fill

from lksmfs.commands.share import locate, shipped
from lksmfs.daemon.metrics import render
from lksmfs.daemon.metrics_file import take_snapshot
from lksmfs.engine.ksm import Ksm
from lksmfs.sources.base import PAGE_SIZE, Mapping
from lksmfs.sysfs.attrs import AttributeTable

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana" / "lksmfs-grafana.json"
# PromQL words that are not metric names (aggregations and functions are told by "(")
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}
_STRING = re.compile(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'')
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers outside strings, label
    matchers, ranges and grouping clauses that are neither a function's name nor a
    keyword nor a number's exponent."""
    text = _STRING.sub('""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = _GROUPING.sub(" ", text)
    names = set()
    for m in _IDENT.finditer(text):
        before = text[m.start() - 1] if m.start() else " "
        after = text[m.end():].lstrip()[:1]
        if after == "(" or m.group().lower() in KEYWORDS or before.isdigit() or before == ".":
            continue
        names.add(m.group())
    return names


def test_the_parser_finds_metric_names() -> None:
    assert metric_names('sum by (comm) (rate(lksm_a{x="b{c}"}[5m])) / on(i) lksm_b * 4096 + 1e3') == {
        "lksm_a", "lksm_b"}
    assert metric_names('topk(10, lksm_c{instance=~"$i"}) offset 5m') == {"lksm_c"}


def exprs(node: Any) -> Iterator[str]:
    """Every `expr` of the dashboard's targets, and every template variable's query."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("expr", "definition") and isinstance(value, str):
                yield re.sub(r"^label_values\((.*),\s*\w+\)$", r"\1", value)
            else:
                yield from exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from exprs(item)


def written() -> set[str]:
    """Every family lksmfs.daemon.metrics writes, for an engine of each policy that has merged
    (per-process rows, region_share under LKSM)."""
    names: set[str] = set()
    for policy in ("lksm", "ksm"):
        src = FakeSource()
        for name in ("a", "b"):
            src.add(name, [(Mapping(0x10000000, 0x10000000 + 4 * PAGE_SIZE, vm_mergeable=True),
                            dict(enumerate([fill("x")] * 4)))])
        ksm = Ksm(src, policy=policy)
        for _ in range(3):
            ksm.full_scan()
        assert ksm.per_process()
        text = render(take_snapshot(AttributeTable(ksm)))
        names |= {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    return names


def test_every_queried_metric_is_one_lksmfs_writes() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    queried = set().union(*(metric_names(e) for e in exprs(dashboard)))
    have = written()
    assert queried <= have, sorted(queried - have)
    # what it is for: sharing, saved memory, scan cost, region_share, per-process profit
    assert {"lksm_pages_sharing", "lksm_general_profit", "lksm_pages_scanned", "lksm_region_share",
            "lksm_process_profit", "lksm_last_scan_duration_seconds"} <= queried
    for panel in dashboard["panels"]:
        assert panel["targets"] and all(t["expr"] for t in panel["targets"]), panel["title"]


def test_the_package_ships_it() -> None:
    assert "config/grafana/lksmfs-grafana.json" in shipped()
    assert locate("lksmfs-grafana.json").resolve() == DASHBOARD
