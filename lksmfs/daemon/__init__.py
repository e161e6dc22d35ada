"""The long-running parts behind `lksmfs mount`.

- service:      Daemon: the engine's threads (crawler, scanner), the engine lock, wiring
- freezer:      cgroup freezer transitions -> the engine's frozen/thawed hints
- lifecycle:    process exits, execs and madvise -> ksm_exit()/ksm_madvise()
- sigquit:      SIGQUIT stops the daemon as SIGTERM does
- notify:       sd_notify(3): READY, STATUS, WATCHDOG, STOPPING
- mountpoint:   the mountpoint made ready (created, a stale mount detached)
- metrics, metrics_file: the figures for node_exporter's textfile collector
- mounted:      the daemon as a child process (the demo, the test kit)
"""
