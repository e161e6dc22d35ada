"""What lksmfs knows about the host, one module per topic (drgn's helpers/linux/ layout).

- proc:     /proc task facts: stat, schedstat, status, comm; task identity; the one
            errno -> ProcessGone/AccessDenied mapping (psutil's wrap_exceptions)
- mounts:   /proc/self/mountinfo, read right; is-a-mountpoint; the lazy unmount fallback
- cgroups:  the v1 freezer and cgroup2: discovery (mountinfo), membership, freeze/thaw, removal
- waiting:  polling the kernel for a condition with a deadline
- privilege: the capabilities lksmfs needs (CapEff) and which are missing
- threads:  threads named for the log and for `ps -L` (prctl PR_SET_NAME)

Nothing here imports the rest of lksmfs: every other package builds on it.
"""
