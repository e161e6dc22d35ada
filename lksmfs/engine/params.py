"""Tunables and constants of the LKSM engine, with the kernel's names and defaults."""

from __future__ import annotations

from dataclasses import dataclass

# run flags (mm/lksm.c KSM_RUN_*)
KSM_RUN_STOP = 0
KSM_RUN_MERGE = 1
KSM_RUN_UNMERGE = 2
KSM_RUN_OFFLINE = 4
KSM_RUN_ONESHOT = 8

# enum lksm_scan_mode
LKSM_SCAN_NONE = 0
LKSM_SCAN_PARTIAL = 1
LKSM_SCAN_FULL = 2
SCAN_MODE_NAMES = {LKSM_SCAN_PARTIAL: "partial", LKSM_SCAN_FULL: "full"}  # as the log and simulate say them

# mm_slot states (KSM_MM_*)
KSM_MM_FROZEN = 0x01
KSM_MM_LISTED = 0x02
KSM_MM_NEWCOMER = 0x04
KSM_MM_SCANNED = 0x08

MERGE_WIN = 3  # merge window of an mm_slot
LKSM_DEFAULT_PAGES_TO_SCAN = 100  # lksm_default_pages_to_scan: after a partial scan
LKSM_MAX_VIPS = 20  # lksm_max_vips
INITIAL_ROUND = 3  # initial_round: full scans before the checksum gate is dropped
KSM_SHORT_TASK_TIME_MS = 100  # short_lived_thresh
DEFAULT_FULL_SCAN_INTERVAL = 60000  # set by the crawler once the initial rounds are done
INITIAL_FULL_SCAN_INTERVAL = 100
CRAWLER_SLEEP_S = 1.0  # crawler_sleep = msecs_to_jiffies(1000)
LKSM_CRAWL_FROZEN_EVENT_WAIT_S = 0.1  # batch frozen events for 100 ms
# CONFIG_HZ: the seed keeps its scan times in jiffies (lksm_proc_scan_time) and feeds
# them to msecs_to_jiffies(); lksmfs assumes Kconfig's default, 250 (LksmCrawler.hz)
LKSM_HZ = 250

# scheduling policies (Ksm(policy=...)): LKSM's ksm_crawld, or mainline's ksmd
POLICY_LKSM = "lksm"
POLICY_KSM = "ksm"
POLICIES = (POLICY_LKSM, POLICY_KSM)

# rmap_item size the kernel pays per tracked page (used by general_profit)
RMAP_ITEM_SIZE = 64

UINT_MAX = 2**32 - 1
ULONG_MAX = 2**64 - 1


@dataclass
class Tunables:
    """The writable attributes' current values (defaults as an LKSM kernel boots)."""

    run: int = KSM_RUN_STOP
    pages_to_scan: int = 100
    sleep_millisecs: int = 20
    scan_boost: int = 100  # lksm_boosted_pages_to_scan
    full_scan_interval: int = INITIAL_FULL_SCAN_INTERVAL
    one_shot_scanning: int = LKSM_SCAN_NONE
    max_page_sharing: int = 256
    stable_node_chains_prune_millisecs: int = 2000
    use_zero_pages: int = 0
    merge_across_nodes: int = 1
    smart_scan: int = 1  # mainline only (lksmfs.engine.ksmd): ksm_smart_scan, true by default
    # mainline only, the KSM advisor (lksmfs.engine.advisor; mm/ksm.c 6.7+)
    advisor_mode: int = 0  # enum ksm_advisor_type: 0 none, 1 scan-time
    advisor_max_cpu: int = 70  # ksm_advisor_max_cpu, percent
    advisor_min_pages_to_scan: int = 500
    advisor_max_pages_to_scan: int = 30000
    advisor_target_scan_time: int = 200  # seconds


def mode_name(mode: float | int) -> str:
    """A scan mode as people read it: "full", "partial" (the number if it is neither)."""
    return SCAN_MODE_NAMES.get(int(mode), str(mode))
