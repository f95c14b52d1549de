"""The mount daemon: pyfuse3 and trio over a vault. fuseops.py is the thin FUSE adapter and
the one error boundary; vfs.py the core it calls, which knows nothing of FUSE, a facade over
tree.py, openfile.py, reader.py, sources.py, readahead.py and replies.py. daemon.py runs a
mount (background.py forks it, logs.py says where it logs); options.py holds every bound."""
