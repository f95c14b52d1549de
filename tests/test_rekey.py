"""`pqfs rekey` (issue 17): a new identity and owner key without re-encrypting content.

After a rekey every file reads with the new identity, `pqfs verify` is clean, no object or
segment opens with the old identity, content objects stay age files, hosts that pinned the old
vault id follow the signed rotation, and a rekey killed with SIGKILL at any point is finished
by a second run. On S3 the payload bytes are copied by the server (the bytes sent are counted).
"""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from pqfs.errors import NoIdentityMatch, PqfsError
from pqfs.format.agefile import BytesSource, read_header
from pqfs.format.keys import (
    HybridIdentity,
    X25519Identity,
    identity_file_text,
    parse_identity,
    unwrap,
)
from pqfs.storage.base import StorageOptions
from pqfs.vault import catalog as cat_mod
from pqfs.vault import rekey, writers
from pqfs.vault.catalog import put_op
from pqfs.vault.objects import OBJECTS, object_key, open_reader
from pqfs.vault.vault import Vault

from .conftest import PASSPHRASE, ROOT, run_pqfs

MiB = 1 << 20


def fill(v: Vault, tmp: Path, n: int, size: int = 20_000) -> dict[str, bytes]:
    rng = random.Random(n)
    files = {f"lib/{i:03d}.flac": rng.randbytes(size + i) for i in range(n)}
    ops = []
    for dest, data in files.items():
        src = tmp / "src.bin"
        src.write_bytes(data)
        ops.append(put_op(v.add_file(str(src), dest)))
    v.commit(ops)
    return files


def opened(v: Vault) -> Vault:
    fresh = Vault.open(v.location)
    fresh.unlock(PASSPHRASE)
    return fresh


def assert_rekeyed(v: Vault, files: dict[str, bytes], old: list[Any]) -> None:
    """Every file reads with the new identity; nothing in the store opens with the old one."""
    fresh = opened(v)
    cat = fresh.catalog()
    assert not cat.unverified and not cat.warnings
    assert sorted(e.path for e in cat.files()) == sorted(files)
    for e in cat.files():
        with open_reader(fresh, e) as r:
            assert r.read(0, r.size) == files[e.path]
    for key, _ in [*fresh.storage.list(OBJECTS), *fresh.storage.list("catalog/")]:
        header = read_header(BytesSource(fresh.storage.read_bytes(key)))
        with pytest.raises(NoIdentityMatch):
            unwrap(header, old)
    held = fresh.held_identities()
    assert len([i for i in held if isinstance(i, HybridIdentity)]) == 1
    assert not any(i.recipient().encode() == o.recipient().encode() for i in held for o in old)


def old_identities(v: Vault) -> list[Any]:
    """Copies of the vault's identities as they are now (to try on the store afterwards)."""
    return [parse_identity(i.encode()) for i in v.held_identities()]


def test_rekey_rewraps_everything_and_the_old_identity_opens_nothing(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    v = Vault.create(str(tmp_path / "v"), PASSPHRASE, classic=True, log_n=10)
    files = fill(v, tmp_path, 12)
    old_id = v.config.vault_id
    writer = writers.add(v, "ingest")
    keyfile = tmp_path / "ingest.key"
    keyfile.write_text(f"# vault-id: {old_id}\n{writer.encode()}\n")
    keyfile.chmod(0o600)
    old = old_identities(v)
    proc = run_pqfs("rekey", v.location, env=cli_env)
    err = proc.stderr.decode()
    assert "rekeyed" in err and "12 file(s) rewrapped" in err
    assert_rekeyed(v, files, old)
    new = opened(v)
    assert new.config.vault_id != old_id and new.config.succeeds(old_id)
    assert run_pqfs("verify", v.location, env=cli_env).returncode == 0
    # An ingest host that pinned the old vault id (its key file names it) follows the rotation.
    src = tmp_path / "late.flac"
    src.write_bytes(b"added after the rekey")
    env = {k: val for k, val in cli_env.items() if k != "PQFS_PASSPHRASE"}
    run_pqfs("add", "--writer-key", str(keyfile), v.location, str(src), "lib/late.flac", env=env)
    files["lib/late.flac"] = src.read_bytes()
    assert_rekeyed(v, files, old)
    # The stock age tool opens a content object with the new (classic) identity.
    classic = [i for i in opened(v).held_identities() if isinstance(i, X25519Identity)]
    ident = tmp_path / "new.txt"
    ident.write_text(identity_file_text(classic))
    e = opened(v).entry("lib/000.flac")
    age = subprocess.run(
        ["age", "-d", "-i", str(ident), str(Path(v.location) / object_key(e.object))],
        capture_output=True,
        check=True,
    )
    assert age.stdout == files["lib/000.flac"]


@pytest.mark.slow
def test_rekey_killed_at_random_points_is_finished_by_a_second_run(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    v = Vault.create(str(tmp_path / "v"), PASSPHRASE, log_n=10)
    killed_and_finished(v, fill(v, tmp_path, 40, size=200_000), cli_env)


@pytest.mark.slow
def test_on_s3_a_rekey_killed_at_random_points_is_finished_by_a_second_run(
    s3_vault_location: str, seaweed: Any, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    v = Vault.create(s3_vault_location, PASSPHRASE, log_n=10)
    files = fill(v, tmp_path, 30, size=200_000)
    src = tmp_path / "film.mkv"  # one object past a part: its payload copied by the server
    src.write_bytes(random.Random(9).randbytes(9 * MiB))
    v.commit([put_op(v.add_file(str(src), "film.mkv"))])
    files["film.mkv"] = src.read_bytes()
    killed_and_finished(v, files, {**cli_env, **seaweed.env()})


def killed_and_finished(v: Vault, files: dict[str, bytes], cli_env: dict[str, str]) -> None:
    """`pqfs rekey` killed (SIGKILL) ever later until a run finishes by itself: at every
    point the owner reads every file; at the end nothing opens with the old identity."""
    old = old_identities(v)
    rng = random.Random(17)
    delay, kills, finished = 0.05, 0, False
    cmd = [sys.executable, "-m", "pqfs", "rekey", v.location]
    while not finished and kills < 40:
        proc = subprocess.Popen(cmd, env=cli_env, cwd=ROOT, stderr=subprocess.PIPE)
        time.sleep(delay * rng.uniform(0.5, 1.5))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        _, err = proc.communicate()
        finished = proc.returncode == 0
        assert finished or proc.returncode == -signal.SIGKILL, err
        # Whatever the point, the owner still reads every file.
        fresh = opened(v)
        cat = fresh.catalog()
        assert sorted(e.path for e in cat.files()) == sorted(files)
        some = rng.choice(sorted(files))
        with open_reader(fresh, fresh.entry(some)) as r:
            assert r.read(0, r.size) == files[some]
        delay *= 1.4
    assert kills >= 3, "the rekey finished before it could be interrupted: a bigger vault is needed"
    if not finished:
        run_pqfs("rekey", v.location, env=cli_env)
    assert_rekeyed(v, files, old)
    assert run_pqfs("verify", v.location, env=cli_env).returncode == 0


def test_a_rekey_found_half_done_by_the_api_is_resumed(tmp_path: Path) -> None:
    """Step 1 done (identity.age holds the new identity before the old one), nothing else:
    the next rekey takes the same new identity and finishes."""
    v = Vault.create(str(tmp_path / "v"), PASSPHRASE, log_n=10)
    files = fill(v, tmp_path, 3)
    old = old_identities(v)
    new = HybridIdentity.generate()
    v.write_identities([new, *v.held_identities()], PASSPHRASE)
    again = opened(v)
    done = rekey.rekey(again, PASSPHRASE)
    assert done.resumed and done.files == 3
    assert_rekeyed(v, files, old)
    held = opened(v).held_identities()
    assert held[0].recipient().encode() == new.recipient().encode()


@pytest.mark.fuse
def test_a_running_mount_says_it_must_be_remounted_after_a_rekey(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    from .conftest import mounted

    v = Vault.create(str(tmp_path / "v"), PASSPHRASE, log_n=10)
    fill(v, tmp_path, 2)
    log = tmp_path / "mount.log"
    with mounted(Path(v.location), tmp_path / "mnt", cli_env, "--log-file", str(log)):
        run_pqfs("rekey", v.location, env=cli_env)
        deadline = time.monotonic() + 120
        while "the vault was rekeyed" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    assert "unmount and mount it again with the new identity" in log.read_text()


def test_rekey_on_s3_copies_the_payload_server_side(s3_vault_location: str, tmp_path: Path) -> None:
    loc = s3_vault_location
    v = Vault.create(loc, PASSPHRASE, log_n=10, options=StorageOptions())
    rng = random.Random(3)
    files = {"film.mkv": rng.randbytes(20 * MiB + 123), "song.flac": rng.randbytes(70_000)}
    for dest, data in files.items():
        src = tmp_path / "src"
        src.write_bytes(data)
        v.commit([put_op(v.add_file(str(src), dest))])
    old = old_identities(v)
    w = Vault.open(loc)
    w.unlock(PASSPHRASE)
    counters = w.storage.counters  # type: ignore[attr-defined]
    before = dict(counters)
    done = rekey.rekey(w, PASSPHRASE)
    payload = sum(len(d) for d in files.values())
    assert done.files == 2 and done.payload_bytes >= payload
    sent = counters["s3_put_bytes"] - before["s3_put_bytes"]
    copied = counters["s3_copy_bytes"] - before["s3_copy_bytes"]
    part = w.storage.bounds.part_size  # type: ignore[attr-defined]
    # The film's first part and the small file travel; the rest of the film the server copies.
    assert copied >= 20 * MiB - part, counters
    assert sent < part + 200_000 + 4 * 16384, counters  # + headers, the new snapshot, config
    assert_rekeyed(v, files, old)


def test_a_writer_that_appends_during_a_rekey_loses_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer's segment lands between the new snapshot and the new config (signed under
    the old vault id, its object wrapped to the old recipients): the rekey takes it up."""
    v = Vault.create(str(tmp_path / "v"), PASSPHRASE, log_n=10)
    files = fill(v, tmp_path, 3)
    key = writers.add(v, "ingest")
    old = old_identities(v)
    host = Vault.open(v.location)
    host.use_writer_key(key)
    switch = rekey._switch_config

    def writer_meanwhile(*args: Any) -> None:
        src = tmp_path / "late.flac"
        src.write_bytes(b"added while the rekey ran")
        host.commit([put_op(host.add_file(str(src), "lib/late.flac"))])
        files["lib/late.flac"] = src.read_bytes()
        switch(*args)

    monkeypatch.setattr(rekey, "_switch_config", writer_meanwhile)
    w = opened(v)
    rekey.rekey(w, PASSPHRASE)
    assert_rekeyed(v, files, old)


def test_a_writer_holding_the_old_config_is_told_to_run_again(tmp_path: Path) -> None:
    v = Vault.create(str(tmp_path / "v"), PASSPHRASE, log_n=10)
    files = fill(v, tmp_path, 2)
    key = writers.add(v, "ingest")
    host = Vault.open(v.location)
    host.use_writer_key(key)
    src = tmp_path / "late.flac"
    src.write_bytes(b"encrypted to the old recipients")
    entry = host.add_file(str(src), "lib/late.flac")
    rekey.rekey(opened(v), PASSPHRASE)
    with pytest.raises(PqfsError, match=r"the vault was rekeyed .* run the command again"):
        host.commit([put_op(entry)])
    # A segment that got in anyway (encrypted to the old recipients) cannot brick the vault.
    signer = cat_mod.Signer(key, host.config.vault_id, host.config.generation)
    cat_mod.append(host.storage, host.recipients, [put_op(entry)], signer=signer)
    cat = opened(v).catalog()
    assert sorted(e.path for e in cat.files()) == sorted(files)
    assert any("does not open with this vault's identity" in w for w in cat.warnings)
