"""Workloads: a YAML description of app memory, realised as simulated or real processes.

- schema:    the file format (load_workload, Workload, WorkloadError)
- model:     the content function both realisations share
- timeline:  the round/event player both realisations share (TimelinePlayer, Effects)
- simulated: a MemorySource of generated processes (SimulatedSource)
- driver:    the one way to drive the engine on simulated time (Driver, VirtualClock):
             `lksmfs simulate`, `lksmfs compare` and the tests
- paced:     the driver with the threads' timing (PacedDriver, PacedClock): `compare`
- spawn:     real child processes (child.py) in freezer cgroups (spawn_workload,
             `lksmfs workload spawn`)

Every package's __init__ is import-free: importing one module never loads its siblings.
"""
