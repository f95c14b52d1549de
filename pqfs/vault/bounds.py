"""Every bound of the vault layer, in one place, each with its reason. `pqfs stats --json`
shows them (`vault_bounds`).

The modules read `BOUNDS` when they use a bound, not at import, so a test may replace it.
Limits that FORMAT.md sets (a segment's size, a header's, a name's) are rules of the format,
not bounds to tune: they stay beside the code that checks them (catalog, schema).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VaultBounds:
    # `pqfs add` commits what completed once this many files are held or this long has passed
    # (ingest.Batch). A commit is one syncfs (the batch's objects made durable at once: ~20 ms
    # on a virtio disk, so per 64 small files it was a third of the add) and one signed
    # catalog segment (every load reads and verifies each one); committing this often, a
    # kill -9 loses at most this much work (Ctrl-C none), and a running mount sees new files
    # within seconds.
    commit_every_files: int = 1024
    commit_every_seconds: float = 10.0
    compact_after: int = 32  # deltas since the last snapshot: beyond this, loading reads many
    append_attempts: int = 100  # exclusive creates lost to concurrent writers before giving up
    # After each lost race a writer waits a random time below first * 2^losses (at most max,
    # seconds) before it reads the tail again: writers that collided do not collide again in
    # lock step, and on S3 they do not hammer the bucket with LISTs.
    append_backoff_first: float = 0.005
    append_backoff_max: float = 0.5
    stuck_attempts: int = 3  # lost races with no new segment to show for them: not a writer
    # `pqfs gc` refuses, without --force, to delete more than this share of a vault's objects
    # once they are at least gc_mass_objects: a few leftovers of interrupted adds are routine,
    # losing most of a vault at once is what a forged or damaged catalog would cause.
    gc_mass_fraction: float = 0.5
    gc_mass_objects: int = 10
    # ... and keeps unreferenced objects written less than this long ago (seconds): another
    # writer (a `pqfs add` on another host, a mount committing a file) writes an object before
    # the catalog segment that names it, and gc must not delete it in between. `--grace`.
    gc_grace: float = 24 * 3600.0
    # Objects `pqfs rekey` copies at once: on S3 each is a few round trips (its header, its
    # copy), which overlap; a local disk gains little past the cores.
    rekey_parallel: int = 8


BOUNDS = VaultBounds()
