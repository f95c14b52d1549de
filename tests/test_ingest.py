"""The ingest policy as a component (pqfs/vault/ingest.py), without the CLI: `plan` returns what
it adds and what it leaves out as data, `Ingest.run` skips what the vault holds unchanged,
commits in batches, and commits what it completed when it fails."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pqfs.vault import bounds, ingest
from pqfs.vault import catalog as cat_mod
from pqfs.vault.bounds import VaultBounds
from pqfs.vault.objects import open_reader
from pqfs.vault.vault import Vault
from tests.conftest import PASSPHRASE, ROOT, run_pqfs, tree_snapshot


def make_tree(root: Path) -> dict[str, bytes]:
    """films/{a,b}.mkv, films/extra/c.txt, with different contents; their bytes by path."""
    files = {"a.mkv": os.urandom(70_000), "b.mkv": b"b" * 100, "extra/c.txt": b""}
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return files


def vault_root(v: Vault) -> Path:
    return Path(v.storage.describe())


def deltas(v: Vault) -> int:
    return sum(1 for s in cat_mod.list_segments(v.storage) if s.kind == "delta")


def test_plan_reports_what_it_leaves_out_as_data_and_writes_nothing(
    pq_vault: Vault, tmp_path: Path
) -> None:
    src = tmp_path / "films"
    make_tree(src)
    os.symlink("a.mkv", src / "link.mkv")
    os.mkfifo(src / "extra" / "pipe")
    before = tree_snapshot(vault_root(pq_vault))
    heard: list[ingest.Skip] = []
    plan = ingest.plan(pq_vault, str(src), None, on_skip=heard.append)
    assert plan.skipped == [
        ingest.Skip(str(src / "link.mkv"), "symbolic link"),
        ingest.Skip(str(src / "extra" / "pipe"), "special file"),
    ]
    assert heard == plan.skipped  # each as the walk found it, in the same order
    assert [f.dest for f in plan.files] == ["films/a.mkv", "films/b.mkv", "films/extra/c.txt"]
    assert [d.dest for d in plan.dirs] == ["films", "films/extra"]
    assert plan.total == 70_100
    assert not any(f.unchanged for f in plan.files)
    assert tree_snapshot(vault_root(pq_vault)) == before


def test_a_file_dest_ending_in_slash_goes_into_that_directory(
    pq_vault: Vault, tmp_path: Path
) -> None:
    (tmp_path / "x.mkv").write_bytes(b"x")
    plan = ingest.plan(pq_vault, str(tmp_path / "x.mkv"), "films/")
    assert [(f.dest, f.size) for f in plan.files] == [("films/x.mkv", 1)]
    assert plan.dirs == [] and plan.skipped == []


def test_a_second_run_skips_what_is_unchanged(pq_vault: Vault, tmp_path: Path) -> None:
    src = tmp_path / "films"
    files = make_tree(src)
    first = ingest.Ingest(pq_vault, ingest.plan(pq_vault, str(src), None)).run()
    assert (first.added, first.unchanged) == (3, 0)
    st = os.stat(src / "b.mkv")
    os.utime(src / "b.mkv", ns=(st.st_atime_ns, st.st_mtime_ns + 1))  # only its mtime moves
    again = ingest.plan(pq_vault, str(src), None)
    assert {f.dest: f.unchanged for f in again.files} == {
        "films/a.mkv": True,
        "films/b.mkv": False,
        "films/extra/c.txt": True,
    }
    seen: list[tuple[str, int]] = []
    second = ingest.Ingest(pq_vault, again).run(lambda dest, n: seen.append((dest, n)))
    assert (second.added, second.unchanged) == (1, 2)
    # progress hears of every file's bytes, the skipped ones' included
    assert sum(n for _, n in seen) == again.total
    assert {dest for dest, _ in seen} == {f.dest for f in again.files}
    for rel, data in files.items():
        with open_reader(pq_vault, f"films/{rel}") as r:
            assert r.read(0, r.size) == data


def test_what_completed_is_committed_when_a_run_fails(
    pq_vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a busy machine's pauses must not add commits
    monkeypatch.setattr(bounds, "BOUNDS", VaultBounds(commit_every_seconds=float("inf")))
    src = tmp_path / "films"
    make_tree(src)
    plan = ingest.plan(pq_vault, str(src), None)
    os.unlink(src / "extra" / "c.txt")  # gone between the plan and its turn
    before = deltas(pq_vault)
    with pytest.raises(FileNotFoundError):
        ingest.Ingest(pq_vault, plan).run()
    assert deltas(pq_vault) == before + 1  # one commit, in the batch's exit
    cat = pq_vault.catalog()
    assert sorted(e.path for e in cat.files()) == ["films/a.mkv", "films/b.mkv"]
    assert cat.get("films/extra") is not None


@pytest.mark.parametrize(
    ("every_files", "every_seconds", "count", "commits"),
    [
        # by count, 4 ops a batch: the directory's and 3 files, 4 files, the last 3 at the end
        (4, float("inf"), 10, 3),
        # by time, with every moment past due: one batch per file
        (10**6, -1.0, 3, 3),
    ],
)
def test_a_long_run_commits_in_batches(
    pq_vault: Vault,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    every_files: int,
    every_seconds: float,
    count: int,
    commits: int,
) -> None:
    monkeypatch.setattr(
        bounds,
        "BOUNDS",
        VaultBounds(commit_every_files=every_files, commit_every_seconds=every_seconds),
    )
    src = tmp_path / "many"
    src.mkdir()
    for i in range(count):
        (src / f"{i:03d}").write_bytes(b"%d" % i)
    before = deltas(pq_vault)
    done = ingest.Ingest(pq_vault, ingest.plan(pq_vault, str(src), None)).run()
    assert done.added == count
    assert deltas(pq_vault) == before + commits
    assert len(pq_vault.catalog().files()) == count


class RecordingStorage:
    """Wraps a vault's real storage and records the order of what a batch does: each object
    written without waiting for the disk, each make_durable, each catalog segment."""

    def __init__(self, inner: object) -> None:
        self._inner = inner
        self.events: list[str] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def writer(
        self, key: str, exclusive: bool = False, durable: bool = True, fresh: bool = False
    ) -> object:
        kind = "segment" if key.startswith("catalog/") else "object"
        self.events.append(f"{kind}{'' if durable else ' (not durable)'}")
        return self._inner.writer(key, exclusive, durable, fresh)  # type: ignore[attr-defined]

    def put_bytes(self, key: str, data: bytes, exclusive: bool = False) -> None:
        with self.writer(key, exclusive) as f:  # type: ignore[attr-defined]
            f.write(data)

    def make_durable(self) -> None:
        self.events.append("make_durable")
        self._inner.make_durable()  # type: ignore[attr-defined]


def test_a_batch_is_made_durable_before_the_segment_that_names_it(
    pq_vault: Vault, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        bounds, "BOUNDS", VaultBounds(commit_every_files=3, commit_every_seconds=float("inf"))
    )
    src = tmp_path / "many"
    src.mkdir()
    for i in range(5):
        (src / f"{i}").write_bytes(b"x" * i)
    rec = RecordingStorage(pq_vault.storage)
    pq_vault.storage = rec  # type: ignore[assignment]
    ingest.Ingest(pq_vault, ingest.plan(pq_vault, str(src), None)).run()
    # the directory op and 2 files, then 3 files: each batch's objects, one flush, its segment
    assert rec.events == [
        *["object (not durable)"] * 2, "make_durable", "segment",
        *["object (not durable)"] * 3, "make_durable", "segment",
    ]  # fmt: skip


@pytest.mark.slow
def test_an_add_killed_at_random_points_leaves_every_named_file_whole(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """kill -9 during a large add, again and again: whatever the catalog names verifies (an
    object written but not yet named is garbage for gc, never a torn file in the tree)."""
    src = tmp_path / "lib"
    rng = random.Random(5)
    for i in range(600):
        d = src / f"d{i // 50:02d}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"{i:04d}.flac").write_bytes(rng.randbytes(rng.randrange(1, 200_000)))
    root = vault_root(pq_vault)
    env = dict(cli_env)
    # How long a whole add takes here and now (into a scratch vault): the kills land at
    # fractions of it, whatever the machine's speed.
    scratch = tmp_path / "scratch"
    run_pqfs("init", str(scratch), env=env)
    t0 = time.monotonic()
    run_pqfs("add", str(scratch), str(src), "lib", env=env)
    whole = time.monotonic() - t0
    kills = 0
    for fraction in (0.3, 0.45, 0.6, 0.75, 0.9):
        proc = subprocess.Popen(
            [sys.executable, "-m", "pqfs", "add", str(root), str(src), "lib"],
            env=env,
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        time.sleep(whole * fraction * rng.uniform(0.8, 1.2))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate()
        verify = run_pqfs("verify", str(root), env=env, check=False)
        assert verify.returncode == 0, verify.stdout.decode() + verify.stderr.decode()
    assert kills >= 2, "every add finished before it could be killed: a bigger tree is needed"
    run_pqfs("add", str(root), str(src), "lib", env=env)
    v = Vault.open(str(root))
    v.unlock(PASSPHRASE)
    names = sorted(e.path for e in v.catalog().files())
    assert names == sorted(f"lib/{p.relative_to(src)}" for p in src.rglob("*.flac"))
    assert run_pqfs("verify", str(root), env=env).returncode == 0
