"""Workloads: a YAML description of app memory, realised as simulated or real processes.

- schema: the file format (load_workload, Workload, WorkloadError)
- model: the content function both realisations share
- spawn: real child processes in freezer cgroups (spawn_workload, `lksmfs workload spawn`)
The simulated MemorySource is lksmfs.workload.simulated.SimulatedSource.
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
