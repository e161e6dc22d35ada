"""Config loading: unknown keys and bad values fail naming file, key and reason."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from lksmfs.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]


def test_shipped_yaml_is_valid_and_holds_the_kernel_defaults() -> None:
    cfg = load_config(REPO / "config" / "lksmfs.yaml")
    assert cfg == Config()  # the shipped file documents the defaults, it changes none
    t = cfg.tunables
    assert (t.run, t.pages_to_scan, t.sleep_millisecs, t.scan_boost) == (0, 100, 20, 100)
    assert (t.full_scan_interval, t.max_page_sharing, t.one_shot_scanning) == (100, 256, 0)
    assert cfg.filter is True and cfg.source == "procfs"


def test_values_are_applied(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text(
        "tunables: {run: 8, pages_to_scan: 1000, use_zero_pages: 'on', scan_boost: '+300'}\n"
        "filter: false\nscope: {pids: [12, 34], exclude_comms: [sshd]}\n"
        "freezer: {treat_sigstop_as_frozen: true, poll_interval_ms: 20}\n"
        "source: simulated:w.yaml\nlog_level: debug\n"
    )
    cfg = load_config(f)
    assert cfg.tunables.run == 8 and cfg.tunables.pages_to_scan == 1000
    assert cfg.tunables.use_zero_pages == 1 and cfg.tunables.scan_boost == 300
    assert cfg.filter is False and cfg.scope.pids == [12, 34]
    assert cfg.scope.exclude_comms == ["sshd"]
    assert cfg.freezer.treat_sigstop_as_frozen is True and cfg.freezer.poll_interval_ms == 20
    assert cfg.source == "simulated:w.yaml" and cfg.log_level == "DEBUG"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (
            {"tunables": {"scan_boost": 5}},
            "config/x.yaml: tunables.scan_boost: must be 100..10000 (got 5)",
        ),
        ({"tunables": {"scan_boost": 10001}}, "scan_boost: must be 100..10000 (got 10001)"),
        ({"tunables": {"run": 9}}, "tunables.run: must be an integer 0..8"),
        ({"tunables": {"run": "x"}}, "(got x)"),
        ({"tunables": {"run": True}}, "tunables.run: must be an integer 0..8"),
        ({"tunables": {"max_page_sharing": 1}}, "max_page_sharing: must be an integer >= 2"),
        ({"tunables": {"pages_to_scan": -1}}, "tunables.pages_to_scan: must be an unsigned"),
        ({"tunables": {"pages_to_scan": 2**32}}, "(got 4294967296)"),
        ({"tunables": {"one_shot_scanning": 3}}, "tunables.one_shot_scanning: must be 0"),
        ({"tunables": {"use_zero_pages": "maybe"}}, "tunables.use_zero_pages: must be 0 or 1"),
        ({"tunables": {"pages_sharing": 1}}, "x.yaml: tunables.pages_sharing: unknown key"),
        ({"tunable": {}}, "x.yaml: tunable: unknown key"),
        ({"scope": {"pid": [1]}}, "x.yaml: scope.pid: unknown key"),
        ({"scope": {"pids": [0]}}, "scope.pids: must be a list of positive integers"),
        ({"scope": {"cgroups": "/sys/fs/cgroup/x"}}, "scope.cgroups: must be a list"),
        ({"freezer": {"enabled": "yes"}}, "freezer.enabled: must be true or false"),
        ({"freezer": {"poll_interval_ms": 0}}, "poll_interval_ms: must be 1..60000 (got 0)"),
        ({"freezer": {"v2_root": "/sys/fs/cgroup"}},
         "x.yaml: freezer.v2_root: replaced by v2_roots, a list of directories; leave it out to watch "
         "the hierarchies found in /proc/self/mountinfo"),
        ({"freezer": {"v1_roots": "/sys/fs/cgroup/freezer"}}, "freezer.v1_roots: must be a list"),
        ({"freezer": {"v2_roots": ["/nonexistent/cg"]}},
         "x.yaml: freezer.v2_roots: /nonexistent/cg: no such directory (expected a cgroup2 group)"),
        ({"freezer": {"v1_roots": ["/"]}},
         "x.yaml: freezer.v1_roots: /: not in a cgroup v1 freezer hierarchy (see /proc/self/mountinfo)"),
        ({"filter": 1}, "x.yaml: filter: must be true or false (got 1)"),
        ({"source": "sysfs"}, "x.yaml: source: must be 'procfs' or 'simulated:"),
        ({"log_level": "LOUD"}, "x.yaml: log_level: must be one of"),
        ({"tunables": [1, 2]}, "x.yaml: tunables: must be a mapping"),
        ([1, 2], "x.yaml: top level: must be a mapping"),
    ],
)
def test_bad_config_names_file_key_and_reason(data: object, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config_from_dict(data, "config/x.yaml")
    assert message in str(ei.value)


def test_freezer_roots_default_to_discovery_and_empty_lists_watch_none() -> None:
    """None: found in /proc/self/mountinfo at start; []: none of that kind (no check)."""
    assert (Config().freezer.v1_roots, Config().freezer.v2_roots) == (None, None)
    cfg = config_from_dict({"freezer": {"v1_roots": [], "v2_roots": None}}, "x.yaml")
    assert (cfg.freezer.v1_roots, cfg.freezer.v2_roots) == ([], None)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("# nothing\n")
    assert load_config(f) == Config()


def test_unreadable_and_invalid_yaml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml: cannot read"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("tunables: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: not valid YAML"):
        load_config(bad)


def test_command_line_overrides_file(tmp_path: Path) -> None:
    from lksmfs.commands.mount import _add_arguments, config_from_args

    f = tmp_path / "c.yaml"
    f.write_text("tunables: {pages_to_scan: 500, run: 1}\nscope: {pids: [7]}\n")
    p = argparse.ArgumentParser()
    _add_arguments(p)
    args = p.parse_args(
        ["/mnt", "--config", str(f), "--pid", "42", "--pid", "43", "--set", "run=8",
         "--no-filter", "--log-level", "warning", "--exclude-comm", "bash"]
    )
    cfg = config_from_args(args)
    assert cfg.tunables.pages_to_scan == 500  # from the file
    assert cfg.tunables.run == 8  # --set wins
    assert cfg.scope.pids == [42, 43] and cfg.scope.exclude_comms == ["bash"]
    assert cfg.filter is False and cfg.log_level == "WARNING"
    bad = p.parse_args(["/mnt", "--source", "nowhere"])
    with pytest.raises(ConfigError, match="--source: must be 'procfs'"):
        config_from_args(bad)


def test_metrics_textfile_from_file_and_command_line(tmp_path: Path) -> None:
    from lksmfs.commands.mount import _add_arguments, config_from_args

    prom = tmp_path / "lksm.prom"
    cfg = config_from_dict({"metrics_textfile": str(prom)}, "c.yaml")
    assert cfg.metrics_textfile == str(prom)
    assert config_from_dict({"metrics_textfile": None}, "c.yaml").metrics_textfile is None
    p = argparse.ArgumentParser()
    _add_arguments(p)
    other = tmp_path / "other.prom"
    f = tmp_path / "c.yaml"
    f.write_text(f"metrics_textfile: {prom}\n")
    args = p.parse_args(["/mnt", "--config", str(f), "--metrics-textfile", str(other)])
    assert config_from_args(args).metrics_textfile == str(other)  # the option wins
    with pytest.raises(ConfigError) as ei:
        config_from_args(p.parse_args(["/mnt", "--metrics-textfile", str(tmp_path / "no" / "x.prom")]))
    assert str(ei.value) == (f"--metrics-textfile: directory {tmp_path / 'no'} does not exist "
                             f"(got '{tmp_path / 'no' / 'x.prom'}')")


@pytest.mark.parametrize(
    ("value", "message"),
    [(5, "c.yaml: metrics_textfile: must be a path (got 5)"),
     ("", "c.yaml: metrics_textfile: must be a file path (got '')"),
     ("/nonexistent-dir/x.prom", "c.yaml: metrics_textfile: directory /nonexistent-dir does not exist"),
     ("/tmp", "c.yaml: metrics_textfile: is a directory, expected a file path (got '/tmp')")],
)
def test_bad_metrics_textfile(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config_from_dict({"metrics_textfile": value}, "c.yaml")
    assert message in str(ei.value)
