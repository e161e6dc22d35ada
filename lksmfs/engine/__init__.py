"""The LKSM algorithm, pure: no FUSE, no /proc, no threads (see ksm.py).

Importing the package loads nothing: the engine is `lksmfs.engine.ksm.Ksm`, its
constants and tunables `lksmfs.engine.params` (which a command that only needs those
imports without paying for numpy and the whole engine).  No module here imports the
package itself, so the engine's imports stay a tree (tests/unit/test_engine_tree.py)."""
