"""The `lksmfs` commands, one module per command, each a thin layer over the library:
it parses its options (`add_parser`) and prints what the library returns (`run`).

- scan:     `lksmfs scan`: the engine over real processes, in the foreground
- simulate: `lksmfs simulate`: a workload's timeline on simulated memory
- compare:  `lksmfs compare`: LKSM against mainline KSM on one workload
- share:    `lksmfs share`: where the shipped files are
- mount:    `lksmfs mount`: the daemon (lksmfs.daemon) serving the sysfs ABI
- workload: `lksmfs workload spawn`: real processes realising a workload
- output/:  what every command shares: parsers (helptext), tables, scan summaries, progress

lksmfs.cli picks the one module a command line needs, so `lksmfs scan` never imports
the daemon.
"""
