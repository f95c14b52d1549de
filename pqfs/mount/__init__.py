"""The mount daemon: pyfuse3 and trio over a vault. fuseops.py is the thin FUSE adapter and
the one error boundary; vfs.py the core it calls, which knows nothing of FUSE."""
