"""lksmfs: Samsung's Lightweight KSM in user space (shadow mode), with the LKSM sysfs ABI on FUSE."""

__version__ = "0.1.0"
