"""Daemon configuration: a YAML file, then command-line overrides.

Every tunable value is validated by the *same* code that validates a write to the
mounted file (lksmfs.sysfs.attrs.check_setting: AttributeTable.store on a dry-run
engine), so a value that `echo VALUE > FILE` would refuse is refused at start too, with
the file, the key and the reason in the message.  Unknown keys are errors: a typo must
not silently fall back to a default.  Which files exist depends on the scheduling policy
(`policy: lksm|ksm`): a tunable the chosen policy has no file for is an error too.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from lksmfs.engine.params import POLICIES, POLICY_LKSM, Tunables
from lksmfs.sysfs.attrs import SettingError, check_setting, setting_order
from lksmfs.system import cgroups

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class ConfigError(SettingError):
    """A bad configuration: the message names where (file, key) and why."""


@dataclass
class TunablesConfig(Tunables):
    """Initial values of the writable attributes: the engine's own fields and defaults
    (SPEC §1).  `one_shot_scanning` 0 means "no request at start"; 1 or 2 queues one."""

    def items(self, policy: str = POLICY_LKSM) -> list[tuple[str, int]]:
        """(name, value) of `policy`'s writable files, in application order."""
        return [(name, getattr(self, name)) for name in setting_order(policy)]


@dataclass
class ScopeConfig:
    """Which processes are scanned: empty pids and cgroups mean every user process."""

    pids: list[int] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    exclude_comms: list[str] = field(default_factory=list)


@dataclass
class FreezerConfig:
    """Where frozen-task hints come from (the freeze_task/__thaw_task hooks).

    Roots None (the default): every v1 freezer hierarchy and every cgroup2 mount found
    in /proc/self/mountinfo.  A list overrides that kind: exactly those directories
    (each an existing group of the right hierarchy; [] watches none of that kind)."""

    enabled: bool = True
    v1_roots: list[str] | None = None
    v2_roots: list[str] | None = None
    treat_sigstop_as_frozen: bool = False
    poll_interval_ms: int = 100


@dataclass
class Config:
    policy: str = POLICY_LKSM  # LKSM's crawler, or mainline's ksmd ("ksm")
    tunables: TunablesConfig = field(default_factory=TunablesConfig)
    # the tunables a file set, with where (re-checked when --policy changes the policy)
    tunables_set: dict[str, str] = field(default_factory=dict, compare=False)
    filter: bool = True  # CONFIG_LKSM_FILTER
    scope: ScopeConfig = field(default_factory=ScopeConfig)
    freezer: FreezerConfig = field(default_factory=FreezerConfig)
    source: str = "procfs"  # or "simulated:WORKLOAD.yaml"
    log_level: str = "INFO"
    metrics_textfile: str | None = None  # Prometheus textfile, rewritten after each event


# -- loading -------------------------------------------------------------------


def _check_keys(data: Mapping[str, Any], cls: type, where: str) -> None:
    allowed = {f.name for f in fields(cls)}
    for key in data:
        if key not in allowed:
            raise ConfigError(
                f"{where}{key}: unknown key (expected one of: {', '.join(sorted(allowed))})"
            )


def _section(data: Any, name: str, src: str) -> Mapping[str, Any]:
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{src}: {name}: must be a mapping (got {type(data).__name__})")
    return data


def _expect(value: Any, typ: type | tuple[type, ...], what: str, where: str) -> Any:
    if isinstance(value, bool) and typ is int:
        raise ConfigError(f"{where}: must be {what} (got {value})")
    if not isinstance(value, typ):
        raise ConfigError(f"{where}: must be {what} (got {value!r})")
    return value


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where}: must be a list of non-empty strings (got {value!r})")
    return list(value)


def config_from_dict(data: Any, src: str = "<config>") -> Config:
    """Build and validate a Config from parsed YAML; `src` names the file in errors."""
    data = _section(data, "top level", src)
    _check_keys(data, Config, f"{src}: ")
    cfg = Config()

    if "policy" in data:
        where = f"{src}: policy"
        cfg.policy = check_policy(_expect(data["policy"], str, "a string", where), where)

    tun = _section(data.get("tunables"), "tunables", src)
    _check_keys(tun, TunablesConfig, f"{src}: tunables.")
    for name, raw in tun.items():
        where = f"{src}: tunables.{name}"
        try:
            setattr(cfg.tunables, name, check_setting(name, raw, where, cfg.policy))
        except SettingError as e:
            raise ConfigError(str(e)) from None
        cfg.tunables_set[name] = where

    if "filter" in data:
        cfg.filter = _expect(data["filter"], bool, "true or false", f"{src}: filter")

    scope = _section(data.get("scope"), "scope", src)
    _check_keys(scope, ScopeConfig, f"{src}: scope.")
    pids = scope.get("pids") or []
    if not isinstance(pids, list) or not all(
        isinstance(p, int) and not isinstance(p, bool) and p > 0 for p in pids
    ):
        raise ConfigError(f"{src}: scope.pids: must be a list of positive integers (got {pids!r})")
    cfg.scope.pids = list(pids)
    cfg.scope.cgroups = _str_list(scope.get("cgroups"), f"{src}: scope.cgroups")
    cfg.scope.exclude_comms = _str_list(scope.get("exclude_comms"), f"{src}: scope.exclude_comms")

    frz = _section(data.get("freezer"), "freezer", src)
    for old in ("v1_root", "v2_root"):
        if old in frz:
            raise ConfigError(f"{src}: freezer.{old}: replaced by {old}s, a list of directories; leave "
                              f"it out to watch the hierarchies found in /proc/self/mountinfo")
    _check_keys(frz, FreezerConfig, f"{src}: freezer.")
    for key in ("enabled", "treat_sigstop_as_frozen"):
        if key in frz:
            value = _expect(frz[key], bool, "true or false", f"{src}: freezer.{key}")
            setattr(cfg.freezer, key, value)
    for key, v2 in (("v1_roots", False), ("v2_roots", True)):
        if frz.get(key) is not None:
            where = f"{src}: freezer.{key}"
            setattr(cfg.freezer, key, [check_cgroup_root(r, v2, where) for r in _str_list(frz[key], where)])
    if "poll_interval_ms" in frz:
        where = f"{src}: freezer.poll_interval_ms"
        ms = _expect(frz["poll_interval_ms"], int, "an integer 1..60000", where)
        if not 1 <= ms <= 60000:
            raise ConfigError(f"{src}: freezer.poll_interval_ms: must be 1..60000 (got {ms})")
        cfg.freezer.poll_interval_ms = ms

    if "source" in data:
        where = f"{src}: source"
        cfg.source = check_source(_expect(data["source"], str, "a string", where), where)

    if "log_level" in data:
        cfg.log_level = check_log_level(
            _expect(data["log_level"], str, "a string", f"{src}: log_level"), f"{src}: log_level"
        )

    if data.get("metrics_textfile") is not None:
        where = f"{src}: metrics_textfile"
        cfg.metrics_textfile = check_metrics_textfile(_expect(data["metrics_textfile"], str, "a path", where), where)
    return cfg


def check_policy(value: str, where: str) -> str:
    """`lksm` or `ksm`."""
    if value not in POLICIES:
        raise ConfigError(f"{where}: must be one of {', '.join(POLICIES)} (got {value!r})")
    return value


def recheck_tunables(cfg: Config) -> None:
    """The tunables a file set, checked again under the final policy (--policy)."""
    for name, where in cfg.tunables_set.items():
        try:
            check_setting(name, getattr(cfg.tunables, name), where, cfg.policy)
        except SettingError as e:
            raise ConfigError(str(e)) from None


def check_metrics_textfile(value: str, where: str) -> str:
    """A file path in an existing directory (the temp file of each write goes there)."""
    if not value or value.endswith("/"):
        raise ConfigError(f"{where}: must be a file path (got {value!r})")
    directory = os.path.dirname(os.path.abspath(value))
    if not os.path.isdir(directory):
        raise ConfigError(f"{where}: directory {directory} does not exist (got {value!r})")
    if os.path.isdir(value):
        raise ConfigError(f"{where}: is a directory, expected a file path (got {value!r})")
    return value


def check_cgroup_root(path: str, v2: bool, where: str) -> str:
    """A directory of a cgroup2 (`v2`) or v1 freezer hierarchy, as mountinfo says."""
    kind = "cgroup2" if v2 else "cgroup v1 freezer"
    if not os.path.isdir(path):
        raise ConfigError(f"{where}: {path}: no such directory (expected a {kind} group)")
    if cgroups.hierarchy_of(path) is not v2:
        raise ConfigError(f"{where}: {path}: not in a {kind} hierarchy (see /proc/self/mountinfo)")
    return path


def check_source(value: str, where: str) -> str:
    """`procfs` or `simulated:PATH`."""
    if value == "procfs":
        return value
    if value.startswith("simulated:") and len(value) > len("simulated:"):
        return value
    raise ConfigError(f"{where}: must be 'procfs' or 'simulated:WORKLOAD.yaml' (got {value!r})")


def check_log_level(value: str, where: str) -> str:
    level = value.upper()
    if level not in LOG_LEVELS:
        raise ConfigError(f"{where}: must be one of {', '.join(LOG_LEVELS)} (got {value!r})")
    return level


def load_config(path: str | Path | None) -> Config:
    """Read and validate a YAML config file (None: every default)."""
    if path is None:
        return Config()
    src = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{src}: cannot read: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{src}: not valid YAML: {e}") from None
    return config_from_dict(data, src)

