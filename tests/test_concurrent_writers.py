"""Two writers on one vault: a mount commits on top of what another mount or a `pqfs add`
appended meanwhile (vault/rebase.py). Nothing either side wrote is lost: a file both changed
is kept twice (the other's at its path, this mount's as a conflict copy), a delete of what the
other changed leaves it, and unrelated changes simply merge.

The second mount is kept from reloading by a pending file (commit delay of an hour): it commits
against the catalog it loaded, as a busy mount does.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import mount_stats, mounted, run_pqfs
from tests.test_writes import wait_for

pytestmark = pytest.mark.fuse

SLOW = ("--commit-delay", "3600")
CONFLICT = re.compile(r"^(.*) \(conflict \d{4}-\d\d-\d\d \d{6} [^)]+\)(\.[a-z]+)?$")


def _seeded(v: str, tmp_path: Path, env: dict[str, str]) -> str:
    run_pqfs("init", v, env=env)
    seed = tmp_path / "seed"
    (seed / "Films").mkdir(parents=True)
    (seed / "Films" / "heat.nfo").write_bytes(b"v0 nfo")
    (seed / "Films" / "keep.srt").write_bytes(b"v0 srt")
    (seed / "Music").mkdir()
    (seed / "Music" / "a.flac").write_bytes(b"v0 flac")
    for d in ("Films", "Music"):
        run_pqfs("add", v, str(seed / d), d, env=env)
    return v


@pytest.fixture
def vault_dir(tmp_path: Path, cli_env: dict[str, str]) -> str:
    return _seeded(str(tmp_path / "vault"), tmp_path, cli_env)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def any_vault(
    request: pytest.FixtureRequest, tmp_path: Path, cli_env: dict[str, str]
) -> tuple[str, dict[str, str]]:
    """(vault location, environment for pqfs) on each backend."""
    if request.param == "local":
        return _seeded(str(tmp_path / "vault"), tmp_path, cli_env), cli_env
    bucket: str = request.getfixturevalue("s3_bucket")
    seaweed: Any = request.getfixturevalue("seaweed")
    env = {**cli_env, **seaweed.env()}
    return _seeded(f"s3://{bucket}/vault", tmp_path, env), env


def vault_files(v: str, env: dict[str, str]) -> dict[str, bytes]:
    """Every file of the vault and its plaintext, through the CLI (any backend)."""
    listing = run_pqfs("ls", "-R", "-l", v, env=env).stdout.decode().splitlines()
    out = {}
    for line in listing:
        if line.startswith("-"):
            path = line.split(None, 4)[-1]  # (mode size date time path)
            out[path] = run_pqfs("cat", v, path, env=env).stdout
    return out


def _conflicts(files: dict[str, bytes]) -> dict[str, bytes]:
    return {p: b for p, b in files.items() if CONFLICT.match(p.rpartition("/")[2])}


def test_both_mounts_change_one_file_and_both_versions_stay(
    any_vault: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    vault_dir, cli_env = any_vault
    with (
        mounted(vault_dir, tmp_path / "a", cli_env, *SLOW) as a,
        mounted(vault_dir, tmp_path / "b", cli_env, *SLOW) as b,
    ):
        (b / "Films" / "heat.nfo").write_bytes(b"from B")  # B holds it; no reload now
        (b / "Films" / "b-only.txt").write_bytes(b"B's new file")
        (b / "Films" / "keep.srt").unlink()  # A changes it first: the delete must not win
        (a / "Films" / "heat.nfo").write_bytes(b"from A")
        (a / "Films" / "keep.srt").write_bytes(b"A's new srt")
        (a / "Music" / "a-only.txt").write_bytes(b"A's new file")
        run_pqfs("sync", str(a), env=cli_env)
        run_pqfs("sync", str(b), env=cli_env)
        s = mount_stats(b, cli_env)
        assert s["commits_rebased"] >= 1 and s["conflict_copies"] == 1
        assert s["pending_files"] == 0 and s["commit_failures"] == 0
        # B shows its version under the conflict name at once, and A's at the path once it
        # reloads (nothing pending now: the next poll)
        names = sorted(p.name for p in (b / "Films").iterdir())
        copy = [n for n in names if CONFLICT.match(n)]
        assert len(copy) == 1 and copy[0].startswith("heat (conflict ") and copy[0].endswith(".nfo")
        assert (b / "Films" / copy[0]).read_bytes() == b"from B"
        wait_for(
            lambda: (
                (b / "Films" / "heat.nfo").exists()
                and (b / "Films" / "heat.nfo").read_bytes() == b"from A"
            ),
            "mount B to show A's version",
        )
        assert (b / "Music" / "a-only.txt").read_bytes() == b"A's new file"
    files = vault_files(vault_dir, cli_env)
    copies = _conflicts(files)
    assert list(copies.values()) == [b"from B"]
    rest = {p: v for p, v in files.items() if p not in copies}
    assert rest == {
        "Films/heat.nfo": b"from A",
        "Films/keep.srt": b"A's new srt",
        "Films/b-only.txt": b"B's new file",
        "Music/a.flac": b"v0 flac",
        "Music/a-only.txt": b"A's new file",
    }
    run_pqfs("verify", str(vault_dir), env=cli_env)


def test_a_directory_moved_away_keeps_what_another_writer_put_in_it(
    vault_dir: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    new = tmp_path / "new.flac"
    new.write_bytes(b"added elsewhere")
    with mounted(vault_dir, tmp_path / "b", cli_env, *SLOW) as b:
        (b / "pending.txt").write_bytes(b"keeps B from reloading")
        (b / "Music").rename(b / "Albums")
        run_pqfs("add", str(vault_dir), str(new), "Music/new.flac", env=cli_env)
        run_pqfs("sync", str(b), env=cli_env)
        assert mount_stats(b, cli_env)["commits_rebased"] >= 1
    files = vault_files(vault_dir, cli_env)
    assert files["Music/new.flac"] == b"added elsewhere"  # never deleted by B's move
    assert files["Albums/a.flac"] == b"v0 flac"
    assert files["pending.txt"] == b"keeps B from reloading"
    assert not _conflicts(files)
    run_pqfs("verify", str(vault_dir), env=cli_env)


def test_a_file_pqfs_add_put_first_is_not_overwritten(
    vault_dir: str, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    src = tmp_path / "ingested.mkv"
    src.write_bytes(b"ingest host's film")
    with mounted(vault_dir, tmp_path / "b", cli_env, *SLOW) as b:
        (b / "Films" / "film.mkv").write_bytes(b"mount's film")  # new on B, not committed
        run_pqfs("add", str(vault_dir), str(src), "Films/film.mkv", env=cli_env)
        run_pqfs("sync", str(b), env=cli_env)
    files = vault_files(vault_dir, cli_env)
    assert files["Films/film.mkv"] == b"ingest host's film"
    copies = _conflicts(files)
    assert list(copies.values()) == [b"mount's film"]
    (path,) = copies
    assert path.startswith("Films/film (conflict ") and path.endswith(".mkv")
    run_pqfs("verify", str(vault_dir), env=cli_env)
