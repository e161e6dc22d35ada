"""Initial attribute values (config tunables:, --set of every command): one parser, one
path through the stores, the same words everywhere."""

from __future__ import annotations

import argparse
import errno
import os
from typing import Any

import pytest

from lksmfs.commands.mount import _add_arguments, config_from_args
from lksmfs.engine.params import Tunables
from lksmfs.sysfs.attrs import (
    SETTING_ORDER,
    AttributeTable,
    DryRunEngine,
    SettingError,
    apply_settings,
    check_setting,
    parse_set,
    writable_names,
)


def test_parse_set_goes_through_the_store_rules() -> None:
    assert parse_set(["run=8", "pages_to_scan=10000", "sleep_millisecs=0"]) == {
        "run": 8,
        "pages_to_scan": 10000,
        "sleep_millisecs": 0,
    }
    assert parse_set(["use_zero_pages=y", "merge_across_nodes=0", "one_shot_scanning=2"]) == {
        "use_zero_pages": 1,
        "merge_across_nodes": 0,
        "one_shot_scanning": 2,
    }
    assert parse_set([]) == {}


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("run", "--set run: expected NAME=VALUE"),
        ("=3", "--set =3: expected NAME=VALUE"),
        ("run=9", "--set run=9: must be an integer 0..8"),
        ("scan_boost=99", "--set scan_boost=99: must be 100..10000 (got 99)"),
        ("pages_sharing=1", "--set pages_sharing=1: read-only attribute"),
        ("bogus=1", "--set bogus=1: unknown attribute"),
        ("pages_to_scan=1e3", "--set pages_to_scan=1e3: must be an unsigned integer"),
    ],
)
def test_parse_set_errors(item: str, message: str) -> None:
    with pytest.raises(SettingError) as ei:
        parse_set([item])
    assert message in str(ei.value)


def test_validate_one_shot_zero_means_no_request() -> None:
    assert check_setting("one_shot_scanning", 0, "w") == 0
    assert check_setting("max_page_sharing", 256, "w") == 256  # unchanged value kept


class Busy(DryRunEngine):
    """An engine with a one-shot scan pending: it refuses another request."""

    def request_one_shot(self, mode: int) -> bool:
        return False


def test_apply_settings_in_order_skipping_what_changes_nothing() -> None:
    eng = DryRunEngine()  # records every store's engine call, in order
    apply_settings(AttributeTable(eng), {"one_shot_scanning": 2, "run": 8, "use_zero_pages": "y",
                                         "max_page_sharing": 256, "pages_to_scan": "+7"})
    # plain tunables first, then run, then the one-shot request; 256 is already the value
    assert list(eng.applied.items()) == [("pages_to_scan", 7), ("use_zero_pages", 1), ("run", 8),
                                         ("one_shot_scanning", 2)]
    eng = DryRunEngine()
    apply_settings(AttributeTable(eng), {"one_shot_scanning": 0, "run": 0})
    assert eng.applied == {"run": 0}  # 0 is "no request"; run is always stored
    assert list(SETTING_ORDER) == sorted(writable_names(), key=SETTING_ORDER.index)


def test_apply_settings_stores_nothing_when_one_value_is_bad() -> None:
    eng = DryRunEngine()
    with pytest.raises(SettingError, match=r"^scan_boost: must be 100\.\.10000 \(got 7\)$"):
        apply_settings(AttributeTable(eng), {"pages_to_scan": 5, "scan_boost": 7})
    with pytest.raises(SettingError, match="^pages_shared: read-only attribute"):
        apply_settings(AttributeTable(eng), {"pages_to_scan": 5, "pages_shared": 7})
    assert eng.applied == {} and eng.tunables == Tunables()


def test_apply_settings_says_where_and_what_the_engine_refused() -> None:
    eng = Busy()
    with pytest.raises(SettingError) as ei:
        apply_settings(AttributeTable(eng), {"one_shot_scanning": 1}, lambda n: f"x.yaml: tunables.{n}")
    # the store's EINVAL ("ksm is still scanning"), with where the value came from
    assert str(ei.value) == ("x.yaml: tunables.one_shot_scanning: refused by the engine: "
                             f"{os.strerror(errno.EINVAL)} (got 1)")


def _mount_error(*items: str) -> str:
    p = argparse.ArgumentParser()
    _add_arguments(p)
    with pytest.raises(SettingError) as ei:
        config_from_args(p.parse_args(["/mnt", *(a for i in items for a in ("--set", i))]))
    return str(ei.value)


@pytest.mark.parametrize("command", ["scan", "simulate"])
def test_a_wrong_name_lists_the_valid_ones_in_every_command(
        command: str, capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    from lksmfs.cli import main

    names = ", ".join(sorted(writable_names()))
    want = f"--set pages_to_scna=5: unknown attribute (writable ones: {names})"
    assert _mount_error("pages_to_scna=5") == want
    argv = [command, "--set", "pages_to_scna=5"]
    if command == "simulate":
        argv.insert(1, str(tmp_path / "never-read.yaml"))
    assert main(argv) == 2
    assert capsys.readouterr().err == f"lksmfs {command}: {want}\n"
