"""What lksmfs knows about the host, one module per topic (drgn's helpers/linux/ layout).

- proc:     /proc task facts: stat, schedstat, status, comm; task identity; the one
            errno -> ProcessGone/AccessDenied mapping (psutil's wrap_exceptions)
- mounts:   /proc/self/mountinfo, read right; is-a-mountpoint; the lazy unmount fallback
- cgroups:  the v1 freezer and cgroup2: discovery, membership, freeze/thaw, removal
- waiting:  polling the kernel for a condition with a deadline

Nothing here imports the rest of lksmfs: every other package builds on it.
"""
