"""The mount's figures in the Prometheus text exposition format (version 0.0.4).

node_exporter's `ksmd` collector reads only the mainline files it knows; this renders
every numeric attribute (what LKSM adds too), `region_share` and the processes that
merge most, for node_exporter's textfile collector.  Pure: a Snapshot in, text out;
taking the snapshot and writing the file are lksmfs.daemon.metrics_file's job.

Names: `lksm_<file name>` with the file's value (what `cat` would print at the same
instant), `lksm_region_share{region=...}`, `lksm_process_merging_pages{pid,comm}` and
`lksm_process_profit{pid,comm}` (the MAX_PROCESSES processes with the most merging
pages) and `lksm_last_scan_*`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAX_PROCESSES = 50  # a bounded label set, whatever the number of processes scanned
REGIONS = ("heap", "stack", "file_data", "file_bss", "conflicted")

# Attributes that only grow while the daemon runs (the kernel's are cumulative too);
# nr_regions counts regions ever allocated (the seed never decrements it).
COUNTERS = frozenset({"full_scans", "pages_scanned", "nr_regions", "pages_skipped"})

HELP = {
    "sleep_millisecs": "Milliseconds the scanner sleeps between two batches.",
    "pages_to_scan": "Pages scanned per scanner batch.",
    "pages_shared": "KSM pages in use (one per group of merged identical pages).",
    "pages_sharing": "Pages merged into KSM pages (the pages saved).",
    "pages_unshared": "Pages checked but unique, in the unstable tree.",
    "pages_volatile": "Pages changing too fast to be put in a tree.",
    "full_scans": "Full scans completed.",
    "run": "Scanning mode: 0 stop, 1 merge, 2 unmerge, 8 one-shot (LKSM only).",
    "merge_across_nodes": "Whether pages of different NUMA nodes may merge.",
    "max_page_sharing": "Mappings a KSM page may have before a duplicate is made.",
    "stable_node_chains": "Stable nodes that are chains of duplicates.",
    "stable_node_dups": "Duplicate KSM pages in stable node chains.",
    "stable_node_chains_prune_millisecs": "Milliseconds between two prunings of stable node chains.",
    "use_zero_pages": "Whether empty pages are merged with the zero page.",
    "scanning_process": "Processes registered with the engine (mm_slots).",
    "full_scan_interval": "Milliseconds between two periodic full scans.",
    "one_shot_scanning": "Pending one-shot request: 0 none, 1 partial, 2 full.",
    "scan_boost": "Pages per batch during a partial scan.",
    "pages_scanned": "Pages scanned since start.",
    "general_profit": "Bytes saved by merging minus the bytes of the metadata.",
    "ksm_zero_pages": "Empty pages merged with the zero page.",
    "nr_regions": "LKSM_FILTER regions allocated since start.",
    # mainline's (policy ksm)
    "pages_skipped": "Pages smart_scan skipped (visited, not scanned) since start.",
    "smart_scan": "Whether pages that keep failing to merge are skipped for a while.",
    "advisor_max_cpu": "The KSM advisor's CPU cap for the scanner, percent.",
    "advisor_min_pages_to_scan": "Where the KSM advisor starts pages_to_scan.",
    "advisor_max_pages_to_scan": "The most pages_to_scan the KSM advisor sets.",
    "advisor_target_scan_time": "Seconds the KSM advisor aims a full scan to take.",
}

LAST_SCAN = (  # key of Ksm.last_scan, metric suffix, help
    ("mode", "mode", "Mode of the last completed scan: 1 partial, 2 full."),
    ("slots_scanned", "processes", "Processes scanned by the last completed scan."),
    ("pages_scanned", "pages_scanned", "Pages scanned by the last completed scan."),
    ("merged", "merged", "Pages merged by the last completed scan."),
    ("broken", "broken", "Merges broken (copy-on-write) seen by the last completed scan."),
    ("wall_s", "duration_seconds", "Wall-clock duration of the last completed scan."),
    ("tasks_failed", "tasks_failed", "Processes the last completed scan dropped after an unexpected error."),
)


@dataclass
class Snapshot:
    """What the daemon copied out under the engine lock, in the mount's terms."""

    attributes: dict[str, int]  # numeric file name -> the value `cat` shows
    region_share: dict[str, int] | None = None  # None without LKSM_FILTER
    processes: list[Mapping[str, Any]] = field(default_factory=list)  # Ksm.per_process() rows
    last_scan: dict[str, float | int] = field(default_factory=dict)


def escape_label(value: str) -> str:
    r"""Label value escaping of the text format: \ -> \\, " -> \", newline -> \n.
    The format is UTF-8: bytes of a comm that are not (os.fsdecode's surrogates)
    become U+FFFD."""
    value = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    r"""HELP escaping of the text format: \ -> \\, newline -> \n."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float | int) -> str:
    return str(value) if isinstance(value, int) else repr(float(value))


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[str, float | int]]) -> list[str]:
    lines = [f"# HELP {name} {escape_help(help_text)}", f"# TYPE {name} {kind}"]
    lines += [f"{name}{labels} {_number(value)}" for labels, value in samples]
    return lines


def top_processes(rows: Iterable[Mapping[str, Any]], limit: int = MAX_PROCESSES) -> list[Mapping[str, Any]]:
    """The newest slot of each pid (as proc/PID shows it), then the `limit` with the most
    merging pages; ties go to the lower pid, so the choice is stable between writes."""
    newest: dict[int, Mapping[str, Any]] = {}
    for row in rows:
        pid = int(row["pid"])
        old = newest.get(pid)
        if old is None or int(row.get("start_time", 0)) >= int(old.get("start_time", 0)):
            newest[pid] = row
    ranked = sorted(newest.values(), key=lambda r: (-int(r["merging_pages"]), int(r["pid"])))
    return ranked[:limit]


def render(snap: Snapshot) -> str:
    """The whole textfile: one family per numeric attribute, then the extras."""
    lines: list[str] = []
    for name, value in snap.attributes.items():
        kind = "counter" if name in COUNTERS else "gauge"
        lines += _family(f"lksm_{name}", kind, HELP.get(name, f"The {name} file."), [("", value)])
    if snap.region_share is not None:
        lines += _family(
            "lksm_region_share", "gauge", "Merged pages per LKSM_FILTER region type (region_share).",
            [(f'{{region="{r}"}}', snap.region_share.get(r, 0)) for r in REGIONS],
        )
    top = top_processes(snap.processes)
    lines += _family(
        "lksm_process_merging_pages", "gauge",
        f"Pages of the process merged into KSM pages (proc/PID/merging_pages), top {MAX_PROCESSES}.",
        [(f'{{pid="{int(r["pid"])}",comm="{escape_label(str(r.get("comm", "")))}"}}', int(r["merging_pages"]))
         for r in top],
    )
    lines += _family(
        "lksm_process_profit", "gauge",
        f"Bytes the process saves less its rmap items (proc/PID/ksm_process_profit), top {MAX_PROCESSES}.",
        [(f'{{pid="{int(r["pid"])}",comm="{escape_label(str(r.get("comm", "")))}"}}', int(r["profit"]))
         for r in top if "profit" in r],
    )
    for key, suffix, help_text in LAST_SCAN:
        if key in snap.last_scan:
            lines += _family(f"lksm_last_scan_{suffix}", "gauge", help_text, [("", snap.last_scan[key])])
    return "\n".join(lines) + "\n"
