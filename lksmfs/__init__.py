"""lksmfs: Samsung's Lightweight KSM in user space (shadow mode), with the LKSM sysfs ABI on FUSE."""
