"""Workloads: a YAML description of app memory, realised as simulated or real processes.

- schema:    the file format (load_workload, Workload, WorkloadError)
- model:     the content function both realisations share
- timeline:  the round/event player both realisations share (TimelinePlayer, Effects)
- simulated: a MemorySource of generated processes (SimulatedSource)
- spawn:     real child processes (child.py) in freezer cgroups (spawn_workload,
             `lksmfs workload spawn`)
"""

from lksmfs.workload.schema import (
    App,
    Event,
    Library,
    Section,
    Workload,
    WorkloadError,
    load_workload,
    parse_workload,
)

__all__ = [
    "App",
    "Event",
    "Library",
    "Section",
    "Workload",
    "WorkloadError",
    "load_workload",
    "parse_workload",
]
