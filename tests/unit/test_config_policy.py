"""`policy: lksm|ksm` in the config and `--policy` on the command line: which files
exist follows the policy, and a value for a file the policy lacks names file, key and
reason."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lksmfs.commands.mount import _add_arguments, config_from_args
from lksmfs.config import Config, ConfigError, config_from_dict, load_config
from lksmfs.sysfs.attrs import SettingError, parse_set

REPO = Path(__file__).resolve().parents[2]


def test_policy_ksm_takes_mainline_tunables() -> None:
    cfg = config_from_dict({"policy": "ksm", "tunables": {"smart_scan": "n", "run": 2}}, "c.yaml")
    assert cfg.policy == "ksm"
    assert cfg.tunables.smart_scan == 0 and cfg.tunables.run == 2
    assert Config().policy == "lksm"
    assert [n for n, _ in cfg.tunables.items("ksm")] == [
        "advisor_max_cpu", "advisor_min_pages_to_scan", "advisor_max_pages_to_scan", "advisor_target_scan_time",
        "pages_to_scan", "sleep_millisecs", "max_page_sharing", "stable_node_chains_prune_millisecs",
        "use_zero_pages", "merge_across_nodes", "smart_scan", "advisor_mode", "run"]
    scan_time = config_from_dict({"policy": "ksm", "tunables": {"advisor_mode": "scan-time"}}, "c.yaml")
    assert scan_time.tunables.advisor_mode == 1


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"policy": "uksm"}, "c.yaml: policy: must be one of lksm, ksm (got 'uksm')"),
        ({"policy": 1}, "c.yaml: policy: must be a string (got 1)"),
        ({"policy": "ksm", "tunables": {"run": 8}},
         "c.yaml: tunables.run: must be an integer 0..2 (0 stop, 1 merge, 2 unmerge) (got 8)"),
        ({"policy": "ksm", "tunables": {"scan_boost": 100}},
         "c.yaml: tunables.scan_boost: not a file under policy ksm (only under policy lksm)"),
        ({"tunables": {"smart_scan": 1}},
         "c.yaml: tunables.smart_scan: not a file under policy lksm (only under policy ksm)"),
        ({"policy": "ksm", "tunables": {"smart_scan": 2}}, "c.yaml: tunables.smart_scan: must be 0 or 1 (got 2)"),
    ],
)
def test_bad_policy_settings(data: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data, "c.yaml")
    assert message in str(ei.value)


def _args(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    _add_arguments(p)
    return p.parse_args(["/mnt", *argv])


def test_command_line_policy_rechecks_what_the_file_set(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("tunables: {scan_boost: 300}\n")
    with pytest.raises(ConfigError) as ei:
        config_from_args(_args("--config", str(f), "--policy", "ksm"))
    assert str(ei.value).startswith(f"{f}: tunables.scan_boost: not a file under policy ksm")
    # the shipped file sets no LKSM-only value: it works under both policies
    cfg = config_from_args(_args("--config", str(REPO / "config" / "lksmfs.yaml"), "--policy", "ksm",
                                 "--set", "smart_scan=0"))
    assert cfg.policy == "ksm" and cfg.tunables.smart_scan == 0
    with pytest.raises(SettingError, match=r"--set smart_scan=0: not a file under policy lksm"):
        config_from_args(_args("--set", "smart_scan=0"))
    with pytest.raises(ConfigError, match=r"^--policy: must be one of lksm, ksm"):
        config_from_args(_args("--policy", "mainline"))


def test_shipped_config_loads_under_both_policies(tmp_path: Path) -> None:
    text = (REPO / "config" / "lksmfs.yaml").read_text()
    assert "\npolicy: lksm" in text
    f = tmp_path / "k.yaml"
    f.write_text(text.replace("\npolicy: lksm", "\npolicy: ksm"))
    assert load_config(f).policy == "ksm"
    assert parse_set(["run=1", "smart_scan=1"], "ksm") == {"run": 1, "smart_scan": 1}
