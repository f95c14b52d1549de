"""kill -9 of the daemon while programs write through the mount, at random moments and at
named points of a commit (object written, made durable, delta appended): after each crash every
file is a version that was written whole, never a mix, and never older than its last fsync;
`pqfs verify` is clean; `pqfs gc` past its grace leaves no orphan.

The writer is tests/crash_workload.py, in a process of its own; each iteration remounts, runs
it, kills the daemon, clears the dead mount and checks the vault from the store.
PQFS_CRASH_ITERATIONS sets the number of random-moment iterations (CI runs a few dozen; the
acceptance run is 200).
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pqfs.vault.objects import open_reader
from pqfs.vault.vault import Vault
from tests.conftest import PASSPHRASE, daemon_pid, mount_type, run_pqfs

pytestmark = pytest.mark.fuse

ITERATIONS = int(os.environ.get("PQFS_CRASH_ITERATIONS", "24"))
POINTS = ["object-written:1", "durable:1", "appended:1", "object-written:3", "appended:2"]


def _journal(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """Per file, the digests begun in order; per file, the last digest fsynced."""
    begun: dict[str, list[str]] = {}
    synced: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            parts = line.split()
            if len(parts) < 3 or len(parts[2]) != 64:
                continue  # a line cut by the end of the writer
            kind, name, digest = parts[:3]
            if kind == "begin":
                begun.setdefault(name, []).append(digest)
            elif kind == "fsynced":
                synced[name] = digest
    return begun, synced


def _vault_state(vault_dir: Path | str) -> dict[str, str]:
    v = Vault.open(str(vault_dir))
    v.unlock(PASSPHRASE)
    try:
        out = {}
        for e in v.catalog(reload=True).files():
            with open_reader(v, e) as r:
                h = hashlib.sha256()
                for piece in r.iter_range(0, r.size):
                    h.update(piece)
            out[e.path] = h.hexdigest()
        return out
    finally:
        v.lock()


def _kill_and_clear(mp: Path) -> None:
    try:
        pid = daemon_pid(mp)
    except AssertionError:
        pid = None  # it killed itself at its crash point
    if pid is not None:
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while os.path.exists(f"/proc/{pid}") and time.monotonic() < deadline:
            time.sleep(0.02)
    if mount_type(mp) is not None:
        subprocess.run(["fusermount3", "-u", "-z", str(mp)], check=False)


def _iteration(
    vault_dir: Path | str,
    mp: Path,
    env: dict[str, str],
    journal: Path,
    seed: int,
    kill_after: float | None,
    point: str | None,
    before: dict[str, str],
    stream_size: int,
) -> dict[str, str]:
    """One mount, one writer, one kill; returns the vault's files (path -> digest) after it,
    checked against what the writer journaled."""
    journal.unlink(missing_ok=True)
    denv = dict(env)
    if point:
        denv["PQFS_TEST_CRASH_AT"] = point
    run_pqfs("mount", str(vault_dir), str(mp), "--commit-delay", "0.05", env=denv)
    writer = subprocess.Popen(
        [sys.executable, "-m", "tests.crash_workload", str(mp), str(journal), str(seed)],
        cwd=Path(__file__).parent.parent,
        env={**os.environ, "PQFS_CRASH_STREAM_SIZE": str(stream_size)},
    )
    try:
        if point is None:
            assert kill_after is not None
            time.sleep(kill_after)  # (the random moment itself is what is tested)
            _kill_and_clear(mp)
        else:  # the daemon kills itself at the point; a writer that outlives 120 s: stuck
            deadline = time.monotonic() + 120
            while mount_type(mp) is not None and time.monotonic() < deadline:
                try:
                    os.stat(mp)
                except OSError:
                    break  # ENOTCONN: the daemon is gone
                time.sleep(0.05)
            _kill_and_clear(mp)
        writer.wait(timeout=120)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
    begun, synced = _journal(journal)
    after = _vault_state(vault_dir)
    for name in set(begun) | set(before) | set(after):
        history = ([before[name]] if name in before else []) + begun.get(name, [])
        if name in synced:
            history = history[history.index(synced[name]) :]
        got = after.get(name)
        if got is None:
            if name.endswith(".tmp") and name not in synced:
                continue  # a temp file goes with its rename
            assert name not in before and name not in synced, (
                f"{name}: gone after the crash (it was committed{' and fsynced' if name in synced else ''})"
            )
            continue
        if got not in history:
            (journal.parent / "mismatch").write_text(f"{name} {got} {after_sizes(vault_dir, name)}")
        assert got in history, (
            f"{name}: after the crash its content is no version written whole "
            f"({'older than its last fsync' if got in begun.get(name, []) or got == before.get(name) else 'a mix, or unknown'})"
        )
    return after


def after_sizes(vault_dir: Path | str, name: str) -> int:
    v = Vault.open(str(vault_dir))
    v.unlock(PASSPHRASE)
    try:
        return v.catalog(reload=True).entries[name].size
    finally:
        v.lock()


def _check_clean(vault_dir: Path | str, env: dict[str, str], files: int) -> None:
    """verify is clean; after gc past its grace (0), one object per file and no leftover (a
    local temp file; on S3 an interrupted multipart upload, aborted by that gc)."""
    assert b"every chunk authentic" in run_pqfs("verify", str(vault_dir), env=env).stdout
    run_pqfs("gc", str(vault_dir), "--grace", "0", "--force", env=env)
    storage = Vault.open(str(vault_dir)).storage
    objects = [k for k, _size, _t in storage.list_dated("objects/")]
    assert len(objects) == files, f"{len(objects)} objects for {files} files after gc"
    if isinstance(vault_dir, Path):
        leftovers = [p for p in (vault_dir / "objects").rglob(".tmp-*")]
        assert not leftovers, leftovers
    else:  # an upload gc left would be aborted here (none: gc aborted them all)
        assert storage.abort_stale_uploads(older_than=0) == 0


def _run(
    tmp_path: Path,
    env: dict[str, str],
    schedule: list[tuple[float | None, str | None]],
    vault: Path | str | None = None,
    stream_size: int = 3_000_000,
) -> None:
    vault_dir = vault if vault is not None else tmp_path / "vault"
    run_pqfs("init", str(vault_dir), env=env)
    mp = tmp_path / "mnt"
    mp.mkdir()
    state: dict[str, str] = {}
    rng = random.Random(11)
    for i, (kill_after, point) in enumerate(schedule):
        state = _iteration(
            vault_dir,
            mp,
            env,
            tmp_path / "journal",
            rng.randrange(1 << 30),
            kill_after,
            point,
            state,
            stream_size,
        )
        if i % 6 == 5 or i == len(schedule) - 1:
            _check_clean(vault_dir, env, len(state))
    assert state, "no file survived any iteration: the writer never got to write"


def test_kill_at_random_moments(tmp_path: Path, cli_env: dict[str, str]) -> None:
    rng = random.Random(5)
    _run(tmp_path, cli_env, [(rng.uniform(0.3, 2.5), None) for _ in range(ITERATIONS)])


def test_kill_at_commit_points(tmp_path: Path, cli_env: dict[str, str]) -> None:
    _run(tmp_path, cli_env, [(None, p) for p in POINTS])


def test_kill_on_s3(
    s3_vault_location: str, seaweed: Any, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """The same on SeaweedFS: random moments, the commit points, and right after a part of a
    streamed file's multipart upload was sent (its streamed files are 20 MB: past two 8 MiB
    parts). PQFS_CRASH_S3_ITERATIONS sets the random ones (CI: a few). After gc past its grace
    no upload is left (_check_clean)."""
    env = {**cli_env, **seaweed.env()}
    rng = random.Random(6)
    n = int(os.environ.get("PQFS_CRASH_S3_ITERATIONS", "6"))
    points = [*POINTS, "part-sent:1", "part-sent:2"]
    schedule = [(rng.uniform(0.5, 3.0), None) for _ in range(n)] + [(None, p) for p in points]
    _run(tmp_path, env, schedule, vault=s3_vault_location, stream_size=20_000_000)
