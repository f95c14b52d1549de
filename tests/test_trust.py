"""Trust (issue 17): whoever can write to the store, without a secret, cannot inject files,
redirect new uploads, or roll the vault back undetected (FORMAT.md §5).

Each attack is made as such an attacker would make it: with the public recipients from
pqfs.json, the storage's own write calls, and any key of their own. Each must end in a clear
message and nothing of it served; the controls show the same steps work for the owner and
an authorized writer.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import pytest

from pqfs.cli.main import main
from pqfs.errors import PqfsError
from pqfs.format.agefile import encrypt_stream
from pqfs.format.keys import HybridIdentity, identity_file_text
from pqfs.vault import catalog as cat_mod
from pqfs.vault import maintenance, trust, upgrade, writers
from pqfs.vault.catalog import put_op
from pqfs.vault.config import ConfigError, VaultConfig, Writer
from pqfs.vault.objects import object_key
from pqfs.vault.signing import SigningKey
from pqfs.vault.vault import CONFIG, Vault

from .conftest import PASSPHRASE

# ---------------------------------------------------------------------------- helpers ----


@pytest.fixture
def owner(tmp_path: Path) -> Vault:
    """A version-2 vault holding two files, unlocked as its owner."""
    v = Vault.create(str(tmp_path / "vault"), PASSPHRASE, log_n=10)
    for name in ("film.mkv", "song.flac"):
        add(v, tmp_path, f"media/{name}", os.urandom(5000))
    return v


@pytest.fixture
def pw(tmp_path: Path) -> Path:
    path = tmp_path / "pw"
    path.write_bytes(PASSPHRASE)
    return path


def add(v: Vault, tmp: Path, dest: str, data: bytes) -> None:
    src = tmp / f"src-{os.urandom(4).hex()}"
    src.write_bytes(data)
    v.commit([put_op(v.add_file(str(src), dest))])


def root_of(v: Vault) -> Path:
    return Path(v.storage.root)  # type: ignore[attr-defined]


def attacker(v: Vault) -> Vault:
    """The vault as someone with write access to the store and no secret opens it."""
    return Vault.open(str(root_of(v)))


def forged_object(v: Vault, tmp: Path, data: bytes) -> dict[str, Any]:
    """A content object encrypted to the vault's public recipients and the put op naming it:
    what an injector writes (no secret needed)."""
    src = tmp / f"evil-{os.urandom(4).hex()}"
    src.write_bytes(data)
    return put_op(attacker(v).add_file(str(src), "media/evil.mkv"))


def raw_segment(v: Vault, doc: dict[str, Any], plain: bytes | None = None) -> int:
    """Store a segment after the tail, encrypted to the public recipients: `doc` (its seq and
    prev filled in) as a version-1 writer would, or `plain` as it is."""
    segs = cat_mod.list_segments(v.storage)
    seq = segs[-1].seq + 1
    doc = {
        **doc,
        "seq": seq,
        "prev": hashlib.sha256(v.storage.read_bytes(segs[-1].key)).hexdigest(),
    }
    body = plain if plain is not None else json.dumps(doc).encode()
    out = io.BytesIO()
    encrypt_stream(io.BytesIO(body), out.write, attacker(v).recipients)
    v.storage.put_bytes(f"catalog/{seq:016d}.{doc['kind']}.age", out.getvalue(), exclusive=True)
    return seq


def writer_key_file(v: Vault, tmp: Path) -> Path:
    """A writer key authorized in `v`, in a file as `pqfs writer add` writes one."""
    path = tmp / "w.key"
    key = writers.add(v, "ingest")
    path.write_text(f"# vault-id: {v.config.vault_id}\n{key.encode()}\n")
    path.chmod(0o600)
    return path


def cli(capfd: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    """`pqfs ARGV` in-process: (status, stdout, stderr); never a traceback or internal error,
    and a failure is exactly one error line."""
    capfd.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capfd.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    assert rc in (0, 1), err
    assert err.count("pqfs: error:") == (rc == 1), err
    return rc, out, err


def listing(v: Vault) -> list[str]:
    fresh = Vault.open(str(root_of(v)))
    fresh.unlock(PASSPHRASE)
    return sorted(e.path for e in fresh.catalog().files())


REAL = ["media/film.mkv", "media/song.flac"]

# ------------------------------------------------------------------ forged segments ----


@pytest.mark.parametrize("how", ["unsigned (version-1 style)", "signed by the attacker's key"])
def test_a_forged_delta_is_ignored_and_nothing_of_it_served(
    owner: Vault, tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str], how: str
) -> None:
    op = forged_object(owner, tmp_path, b"a crafted demuxer exploit")
    if how.startswith("unsigned"):
        seq = raw_segment(owner, {"pqfs_catalog": 1, "kind": "delta", "ops": [op]})
    else:
        own_key = SigningKey.generate()  # a key of the attacker's, with the real vault id
        forged = cat_mod.Signer(own_key, owner.config.vault_id, owner.config.generation)
        written = cat_mod.append(attacker(owner).storage, owner.recipients, [op], signer=forged)
        assert written is not None
        seq = written.seq
    root = root_of(owner)
    rc, out, err = cli(capfd, "ls", "-R", root, "--passphrase-file", pw)
    assert rc == 0 and "evil" not in out and "film.mkv" in out
    assert f"pqfs: warning: catalog segment {seq} ignored: " in err
    assert cli(capfd, "cat", root, "media/evil.mkv", "--passphrase-file", pw)[0] == 1
    rc, out, err = cli(capfd, "verify", root, "--passphrase-file", pw)
    assert rc == 1 and f"catalog segment(s) {seq} are signed by no one the vault authorizes" in err
    # gc deletes the injected object, never a real one, and its compaction drops the segment.
    rc, _, err = cli(capfd, "gc", root, "--grace", "0", "--passphrase-file", pw)
    assert rc == 0 and "deleted 1 unreferenced object(s)" in err
    assert listing(owner) == REAL
    assert not (root / object_key(op["object"])).exists()
    rc, _, err = cli(capfd, "verify", root, "--passphrase-file", pw)
    assert rc == 0 and "warning" not in err


def test_a_forged_snapshot_hides_nothing_and_gc_deletes_nothing(
    owner: Vault, pw: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = root_of(owner)
    objects_before = sorted(k for k, _ in owner.storage.list("objects/"))
    raw_segment(owner, {"pqfs_catalog": 1, "kind": "snap", "ops": []})  # the issue's own forgery
    raw_segment(owner, {"pqfs_catalog": 2, "kind": "snap", "generation": 1, "ops": []})
    rc, out, _ = cli(capfd, "ls", "-R", root, "--passphrase-file", pw)
    assert rc == 0 and "film.mkv" in out and "song.flac" in out
    rc, _, err = cli(capfd, "verify", root, "--passphrase-file", pw)
    assert rc == 1 and "verified 2 file(s)" in err
    rc, _, err = cli(capfd, "gc", root, "--grace", "0", "--passphrase-file", pw)
    assert rc == 0 and "deleted 0 unreferenced object(s)" in err
    assert sorted(k for k, _ in owner.storage.list("objects/")) == objects_before
    assert listing(owner) == REAL


def test_a_snapshot_signed_by_a_writer_is_ignored(owner: Vault, tmp_path: Path) -> None:
    key = writers.add(owner, "ingest")
    host = attacker(owner)
    host.use_writer_key(key)
    with pytest.raises(PqfsError, match="snapshot needs the vault identity"):
        host.append([], snapshot=True)
    signer = cat_mod.Signer(key, owner.config.vault_id, owner.config.generation)
    cat_mod.append(host.storage, host.recipients, [], snapshot=True, signer=signer)
    owner.forget_catalog()
    cat = owner.catalog()
    assert sorted(e.path for e in cat.files()) == REAL
    assert any("a snapshot signed by writer ingest" in w for w in cat.warnings)


def test_a_segment_from_another_vault_is_not_accepted(tmp_path: Path) -> None:
    """A writer authorized in two vaults, both also wrapped to one shared recipient: a
    segment it signed for one, copied into the other, does not verify there (the signature
    covers the vault id)."""
    shared = HybridIdentity.generate()
    a = Vault.create(str(tmp_path / "a"), PASSPHRASE, [shared.recipient()], log_n=10)
    b = Vault.create(str(tmp_path / "b"), PASSPHRASE, [shared.recipient()], log_n=10)
    key = SigningKey.generate()
    for v in (a, b):
        config = VaultConfig(**{**vars(v.config), "writers": [Writer("both", key.verify_key)]})
        v.write_config(config)
    host_b = Vault.open(str(tmp_path / "b"))
    host_b.use_writer_key(key)
    add(host_b, tmp_path, "from-b.txt", b"b's file")
    seg_b = cat_mod.list_segments(b.storage)[-1]
    tail_a = cat_mod.list_segments(a.storage)[-1]
    a.storage.put_bytes(
        f"catalog/{tail_a.seq + 1:016d}.delta.age", b.storage.read_bytes(seg_b.key), exclusive=True
    )
    reader = Vault.open(str(tmp_path / "a"))
    reader.unlock_with([shared])  # a recipient, not the owner: it reads and cannot sign
    with pytest.raises(PqfsError, match="needs a signature"):
        reader.signer()
    cat = reader.catalog()
    assert [e.path for e in cat.files()] == []
    assert cat.unverified == [tail_a.seq + 1]
    assert "its signature does not verify" in cat.warnings[0]


def test_a_signed_segment_moved_to_another_position_is_damage(
    owner: Vault, pw: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    segs = cat_mod.list_segments(owner.storage)
    last, before = segs[-1], segs[-2]
    moved = owner.storage.read_bytes(before.key)
    owner.storage.delete(last.key)
    owner.storage.put_bytes(last.key, moved)
    trust.reset(owner.location)  # not the rollback check: the chain's own
    rc, _, err = cli(capfd, "ls", root_of(owner), "--passphrase-file", pw)
    assert rc == 1 and f"catalog segment {last.seq}" in err and "replaced or moved" in err


def test_a_writer_may_add_but_not_delete(owner: Vault, tmp_path: Path) -> None:
    key = writers.add(owner, "ingest")
    host = attacker(owner)
    host.use_writer_key(key)
    add(host, tmp_path, "new/by-writer.txt", b"new")
    host.commit([cat_mod.del_op("media")])
    owner.forget_catalog()
    cat = owner.catalog()
    assert sorted(e.path for e in cat.files()) == [*REAL, "new/by-writer.txt"]
    assert any("a writer may not delete" in w for w in cat.warnings)


def test_a_revoked_writer_is_refused_and_what_it_added_stays(
    owner: Vault, tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = root_of(owner)
    keyfile = tmp_path / "w.key"
    assert (
        cli(capfd, "writer", "add", root, "ingest", "-o", keyfile, "--passphrase-file", pw)[0] == 0
    )
    src = tmp_path / "new.txt"
    src.write_bytes(b"added by the ingest host")
    env_free = ["--writer-key", keyfile]
    assert cli(capfd, "add", root, src, "inbox/new.txt", *env_free)[0] == 0
    rc, _, err = cli(capfd, "writer", "rm", root, "ingest", "--passphrase-file", pw)
    assert rc == 0 and "revoked writer ingest" in err
    rc, _, err = cli(capfd, "add", root, src, "inbox/again.txt", *env_free)
    assert rc == 1 and "is not authorized in this vault" in err
    # The stolen key still signs, but nothing it signs is read.
    from pqfs.cli.unlock import writer_key_file

    stolen, _ = writer_key_file(str(keyfile))
    signer = cat_mod.Signer(stolen, owner.config.vault_id, owner.config.generation)
    op = forged_object(owner, tmp_path, b"after revocation")
    cat_mod.append(owner.storage, owner.recipients, [op], signer=signer)
    assert listing(owner) == sorted([*REAL, "inbox/new.txt"])
    rc, out, err = cli(capfd, "ls", "-R", root, "--passphrase-file", pw)
    assert "evil" not in out and "by a key the vault does not authorize" in err


# ------------------------------------------------------------------ the config ----


def test_recipients_swapped_in_the_config_are_refused(
    owner: Vault, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = root_of(owner)
    keyfile = writer_key_file(owner, tmp_path)
    theirs = HybridIdentity.generate().recipient().encode()
    doc = json.loads((root / CONFIG).read_text())
    doc["recipients"] = [theirs]
    (root / CONFIG).write_text(json.dumps(doc))
    objects_before = sorted(owner.storage.list("objects/"))
    src = tmp_path / "f"
    src.write_bytes(b"would be readable by the attacker")
    rc, _, err = cli(capfd, "add", root, src, "f", "--writer-key", keyfile)
    assert rc == 1 and "pqfs.json is damaged or forged (its signature does not verify)" in err
    assert sorted(owner.storage.list("objects/")) == objects_before
    with pytest.raises(ConfigError):
        Vault.open(str(root))


def test_a_config_resigned_with_another_key_is_refused(
    owner: Vault, tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    """The attacker writes a whole new, validly signed config with a key of their own (and
    their recipient): a host that pinned the vault, one given --vault-id, and the owner's
    identity each refuse it."""
    root = root_of(owner)
    real_id = owner.config.vault_id
    theirs = SigningKey.generate()
    forged = VaultConfig(
        2, [HybridIdentity.generate().recipient().encode()], owner=theirs.verify_key, generation=9
    )
    (root / CONFIG).write_bytes(forged.to_bytes(theirs))
    src = tmp_path / "f"
    src.write_bytes(b"x")
    rc, _, err = cli(capfd, "info", root)
    assert rc == 1 and "the vault's signing key changed" in err and real_id in err
    shutil.rmtree(state_dir)  # a host that never saw the vault...
    rc, _, err = cli(capfd, "info", root, "--vault-id", real_id)  # ...given the id
    assert rc == 1 and "the vault's signing key changed" in err
    shutil.rmtree(state_dir)
    rc, _, err = cli(capfd, "ls", root, "--passphrase-file", pw)  # ...or the identity
    assert rc == 1 and "pqfs.json is not signed by this vault's identity" in err


def test_a_config_rolled_back_is_refused(
    owner: Vault, tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    root = root_of(owner)
    old = (root / CONFIG).read_bytes()  # generation 1: no writer
    writers.add(owner, "ingest")
    add(owner, tmp_path, "later.txt", b"written under generation 2")
    (root / CONFIG).write_bytes(old)
    rc, _, err = cli(capfd, "info", root)
    assert rc == 1 and "went back from generation 2 to 1" in err
    assert "pqfs: hint: if the vault was restored from a backup on purpose" in err
    shutil.rmtree(state_dir)  # a fresh host: the catalog itself names the newer generation
    rc, _, err = cli(capfd, "ls", root, "--passphrase-file", pw)
    assert rc == 1 and "the config was rolled back" in err


# ------------------------------------------------------------------ rollback ----


def test_deleting_the_newest_segment_is_a_rollback_refused_loudly(
    owner: Vault, tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = root_of(owner)
    assert cli(capfd, "ls", root, "--passphrase-file", pw)[0] == 0  # this host saw the head
    segs = cat_mod.list_segments(owner.storage)
    owner.storage.delete(segs[-1].key)
    rc, _, err = cli(capfd, "ls", "-R", root, "--passphrase-file", pw)
    assert rc == 1 and f"went back from segment {segs[-1].seq} to {segs[-2].seq}" in err
    assert (
        f"pqfs: hint: if the vault was restored from a backup on purpose, run: pqfs trust {root} --reset"
        in err
    )
    # The explicit override.
    rc, _, err = cli(capfd, "trust", root, "--reset")
    assert rc == 0 and f"it had seen catalog segment {segs[-1].seq}" in err
    rc, out, _ = cli(capfd, "ls", "-R", root, "--passphrase-file", pw)
    assert rc == 0 and "film.mkv" in out and "song.flac" not in out


def test_an_ingest_host_refuses_to_append_after_a_rollback(
    owner: Vault, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = root_of(owner)
    keyfile = writer_key_file(owner, tmp_path)
    src = tmp_path / "f"
    src.write_bytes(b"one")
    assert cli(capfd, "add", root, src, "a.txt", "--writer-key", keyfile)[0] == 0
    segs = cat_mod.list_segments(owner.storage)
    owner.storage.delete(segs[-1].key)
    rc, _, err = cli(capfd, "add", root, src, "b.txt", "--writer-key", keyfile)
    assert rc == 1 and "the catalog went back from segment" in err
    assert cat_mod.list_segments(owner.storage)[-1].seq == segs[-2].seq  # nothing appended


def test_a_segment_replaced_at_a_seen_position_is_refused(owner: Vault, tmp_path: Path) -> None:
    """The newest segment swapped for another the owner signed (the attacker kept an older
    copy of the store): same number, other bytes."""
    owner.catalog(reload=True)  # pinned: the head and its digest
    head = cat_mod.list_segments(owner.storage)[-1]
    old_bytes = owner.storage.read_bytes(head.key)
    add(owner, tmp_path, "extra.txt", b"x")
    newer = cat_mod.list_segments(owner.storage)[-1]
    owner.catalog(reload=True)
    owner.storage.delete(newer.key)
    owner.storage.delete(head.key)
    owner.storage.put_bytes(head.key, old_bytes)
    with pytest.raises(trust.Rollback, match="went back"):
        owner.catalog(reload=True)


def test_the_vault_id_pins_a_host_that_never_saw_the_vault(
    owner: Vault, capfd: pytest.CaptureFixture[str]
) -> None:
    root = root_of(owner)
    rc, _, err = cli(capfd, "info", root, "--vault-id", "0" * 32)
    assert rc == 1 and "not by 00000000000000000000000000000000 (given with --vault-id)" in err
    rc, out, _ = cli(capfd, "trust", root, "--vault-id", owner.config.vault_id)
    assert rc == 0 and f"vault id: {owner.config.vault_id}" in out


# ------------------------------------------------------------------ gc ----


def test_gc_shows_what_it_would_delete_and_refuses_most_of_a_vault(
    owner: Vault, tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    root = root_of(owner)
    strays = [forged_object(owner, tmp_path, b"stray %d" % i)["object"] for i in range(12)]
    rc, out, err = cli(capfd, "gc", root, "--dry-run", "--grace", "0", "--passphrase-file", pw)
    assert rc == 0 and "would delete 12 unreferenced object(s)" in err
    assert sorted(line.split()[0] for line in out.splitlines()) == sorted(map(object_key, strays))
    rc, _, err = cli(capfd, "gc", root, "--grace", "0", "--passphrase-file", pw)
    assert rc == 1 and "gc would delete 12 of the vault's 14 objects" in err
    assert len(owner.storage.list("objects/")) == 14
    rc, _, err = cli(capfd, "gc", root, "--force", "--grace", "0", "--passphrase-file", pw)
    assert rc == 0 and "deleted 12 unreferenced object(s)" in err
    assert listing(owner) == REAL


def test_gc_keeps_unreferenced_objects_within_the_grace_period(
    owner: Vault, tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Another host's add writes its object before the segment naming it: gc must not delete
    such an object meanwhile. It keeps unreferenced objects younger than --grace (24 h)."""
    root = root_of(owner)
    stray = object_key(forged_object(owner, tmp_path, b"an upload in flight")["object"])
    for grace in ([], ["--grace", "1h"]):
        rc, _, err = cli(capfd, "gc", root, *grace, "--passphrase-file", pw)
        assert rc == 0 and "deleted 0 unreferenced object(s)" in err
        span = "24 h" if not grace else "1 h"
        assert f"kept 1 unreferenced object(s) written in the last {span}" in err
    assert owner.storage.exists(stray)
    old = time.time() - 2 * 3600
    os.utime(Path(owner.storage.describe()) / stray, (old, old))
    rc, _, err = cli(capfd, "gc", root, "--grace", "1h", "--passphrase-file", pw)
    assert rc == 0 and "deleted 1 unreferenced object(s)" in err and "kept" not in err
    assert not owner.storage.exists(stray) and listing(owner) == REAL
    capfd.readouterr()
    with pytest.raises(SystemExit) as bad:  # argparse's exit, as from the shell
        main(["gc", str(root), "--grace", "soon", "--passphrase-file", str(pw)])
    err = capfd.readouterr().err
    assert bad.value.code == 2 and "not a duration: 'soon'" in err
    assert len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------ version 1 and upgrade ----


def as_version_1(v: Vault) -> Vault:
    """`v`, new and empty, rewritten as pqfs 0.1 wrote vaults (unsigned config and catalog),
    opened again by a host that forgot it."""
    for key, _ in v.storage.list("catalog/"):
        v.storage.delete(key)
    cat_mod.append(v.storage, v.recipients, [], snapshot=True)
    doc = {"format": "pqfs-vault", "version": 1, "recipients": v.config.recipients}
    v.storage.put_bytes(CONFIG, json.dumps(doc).encode())
    trust.reset(v.location)
    return Vault.open(v.location)


def make_v1(tmp_path: Path) -> Vault:
    """A version-1 vault with two files, as pqfs 0.1 wrote it: unsigned config and catalog."""
    v = Vault.create(str(tmp_path / "old"), PASSPHRASE, classic=True, log_n=10)
    old = as_version_1(v)
    old.unlock(PASSPHRASE)
    for name in ("film.mkv", "song.flac"):
        add(old, tmp_path, f"media/{name}", os.urandom(70000))
    return old


def test_a_version_1_vault_opens_with_a_warning_and_upgrades(
    tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    old = make_v1(tmp_path)
    root = root_of(old)
    rc, out, err = cli(capfd, "ls", "-R", root, "--passphrase-file", pw)
    assert rc == 0 and "film.mkv" in out
    assert "is a version 1 vault: its catalog and config are not signed" in err
    rc, _, err = cli(capfd, "upgrade", root, "--passphrase-file", pw)
    assert rc == 0 and "upgraded" in err and "version 1" not in err
    v = Vault.open(str(root))
    v.unlock(PASSPHRASE)
    assert v.config.signed and v.config.generation == 1
    assert sorted(e.path for e in v.catalog().files()) == REAL
    assert all(seg.kind == "snap" for seg in cat_mod.list_segments(v.storage))
    rc, _, err = cli(capfd, "upgrade", root, "--passphrase-file", pw)
    assert rc == 0 and "already version 2" in err
    # A version-1 writer that did not upgrade: what it appends now is ignored.
    v1_op = forged_object(v, tmp_path, b"old writer")
    cat_mod.append(v.storage, v.recipients, [v1_op])
    assert listing(v) == REAL
    # The content objects are still age files the stock tool opens.
    ident = tmp_path / "id.txt"
    classic = [i for i in v.identities if not isinstance(i, HybridIdentity)]
    ident.write_text(identity_file_text(classic))  # type: ignore[arg-type]  # age 1.1: X25519
    e = v.catalog().get("media/film.mkv")
    assert e is not None
    proc = __import__("subprocess").run(
        ["age", "-d", "-i", str(ident), str(root / object_key(e.object))], capture_output=True
    )
    assert proc.returncode == 0 and len(proc.stdout) == 70000


def test_an_upgrade_interrupted_after_the_config_is_finished_by_a_second_run(
    tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    old = make_v1(tmp_path)
    root = root_of(old)
    hybrid = next(i for i in old.identities if isinstance(i, HybridIdentity))
    owner = SigningKey.owner_of(hybrid)
    config = VaultConfig(2, list(old.config.recipients), owner=owner.verify_key, generation=1)
    old.adopt_config(config, owner)  # step 1 done; the process died before the snapshot
    rc, _, err = cli(capfd, "ls", root, "--passphrase-file", pw)
    assert rc == 1 and "no snapshot signed by the vault owner" in err
    assert upgrade.upgrade(old)
    assert listing(old) == REAL


def test_gc_of_an_unsigned_vault_still_works(tmp_path: Path) -> None:
    old = make_v1(tmp_path)
    forged_object(old, tmp_path, b"stray")
    assert len(maintenance.gc(old, grace=0).doomed) == 1
    assert listing(old) == REAL


# ------------------------------------------------------------------ the mount, and S3 ----


def wait_until(cond: Any, what: str, timeout: float = 120.0) -> None:
    """Poll `cond` (the mount polls the catalog on its own schedule; a loaded machine is slow)."""
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.mark.fuse
def test_a_running_mount_serves_nothing_of_a_forged_segment(
    owner: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    from .conftest import mounted

    log = tmp_path / "mount.log"
    with mounted(root_of(owner), tmp_path / "mnt", cli_env, "--log-file", str(log)) as mp:
        op = forged_object(owner, tmp_path, b"injected")
        seq = raw_segment(owner, {"pqfs_catalog": 1, "kind": "delta", "ops": [op]})
        wait_until(lambda: f"catalog segment {seq} ignored" in log.read_text(), log.read_text())
        assert not (mp / "media" / "evil.mkv").exists()
        # Control: the owner's own add after it is served (the forged segment chains on).
        add(owner, tmp_path, "media/new.flac", b"genuine")
        wait_until(lambda: (mp / "media" / "new.flac").exists(), "the owner's add never showed")
        assert (mp / "media" / "new.flac").read_bytes() == b"genuine"
        assert not (mp / "media" / "evil.mkv").exists()


def test_on_s3_forgeries_and_rollbacks_are_refused(s3_vault_location: str, tmp_path: Path) -> None:
    loc = s3_vault_location
    v = Vault.create(loc, PASSPHRASE, log_n=10)
    for name in ("film.mkv", "song.flac"):
        add(v, tmp_path, f"media/{name}", os.urandom(5000))
    # A forged delta and a forged snapshot, with the public recipients only.
    thief = Vault.open(loc)
    src = tmp_path / "evil"
    src.write_bytes(b"injected")
    op = put_op(thief.add_file(str(src), "media/evil.mkv"))
    cat_mod.append(thief.storage, thief.recipients, [op])
    cat_mod.append(thief.storage, thief.recipients, [], snapshot=True)
    fresh = Vault.open(loc)
    fresh.unlock(PASSPHRASE)
    cat = fresh.catalog()
    assert sorted(e.path for e in cat.files()) == REAL and len(cat.unverified) == 2
    assert len(maintenance.gc(fresh, grace=0).doomed) == 1  # the injected object, nothing real
    fresh.forget_catalog()
    assert sorted(e.path for e in fresh.catalog().files()) == REAL
    # Recipients swapped in pqfs.json.
    raw = fresh.storage.read_bytes(CONFIG)
    doc = json.loads(raw)
    doc["recipients"] = [HybridIdentity.generate().recipient().encode()]
    fresh.storage.put_bytes(CONFIG, json.dumps(doc).encode())
    with pytest.raises(ConfigError, match="signature does not verify"):
        Vault.open(loc)
    fresh.storage.put_bytes(CONFIG, raw)
    # A revoked writer's key signs on: nothing it signs is read.
    key = writers.add(fresh, "ingest")
    writers.remove(fresh, "ingest")
    stolen = cat_mod.Signer(key, fresh.config.vault_id, fresh.config.generation)
    cat_mod.append(thief.storage, fresh.recipients, [op], signer=stolen)
    cat = fresh.catalog(reload=True)
    assert sorted(e.path for e in cat.files()) == REAL and cat.unverified
    # A signed segment moved to another position.
    maintenance.gc(fresh, grace=0)
    add(fresh, tmp_path, "media/later.txt", b"later")
    segs = cat_mod.list_segments(fresh.storage)
    moved, original = (fresh.storage.read_bytes(s.key) for s in segs[-2:])
    fresh.storage.delete(segs[-1].key)
    fresh.storage.put_bytes(segs[-1].key, moved)
    trust.reset(fresh.location)
    with pytest.raises(PqfsError, match="replaced or moved"):
        fresh.catalog(reload=True)
    fresh.storage.put_bytes(segs[-1].key, original)
    # The newest segment deleted, on a host that saw it.
    add(fresh, tmp_path, "media/latest.txt", b"latest")
    fresh.catalog(reload=True)
    fresh.storage.delete(cat_mod.list_segments(fresh.storage)[-1].key)
    with pytest.raises(trust.Rollback, match="went back from segment"):
        fresh.catalog(reload=True)


# ------------------------------------------------------------------ review findings ----


def test_an_old_vault_id_does_not_win_back_a_host_that_followed_a_rekey(
    owner: Vault, tmp_path: Path
) -> None:
    """After a rekey A -> B, whoever holds A's key (the reason for the rekey) writes a config
    signed by A; a host pinned to B refuses it even when told A (an old writer key file)."""
    from pqfs.vault import rekey

    old_id = owner.config.vault_id
    hybrid = next(i for i in owner.held_identities() if isinstance(i, HybridIdentity))
    stolen = SigningKey.owner_of(HybridIdentity(bytes(hybrid._seed)))
    rekey.rekey(owner, PASSPHRASE)
    Vault.open(owner.location)  # this host follows the rotation: pinned to B
    forged = VaultConfig(
        2, [HybridIdentity.generate().recipient().encode()], owner=stolen.verify_key, generation=99
    )
    owner.storage.put_bytes(CONFIG, forged.to_bytes(stolen))
    for given in (None, old_id):
        with pytest.raises(trust.KeyChanged, match="signing key changed"):
            Vault.open(owner.location, vault_id=given)


def test_a_writer_cannot_record_shares_replace_files_or_block_the_vault(
    owner: Vault, tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    key = writers.add(owner, "ingest")
    host = attacker(owner)
    host.use_writer_key(key)
    signer = cat_mod.Signer(key, owner.config.vault_id, owner.config.generation)
    real = owner.catalog(reload=True).get("media/film.mkv")
    assert real is not None
    theirs = HybridIdentity.generate().recipient().encode()
    alias = {**put_op(real), "path": "x/alias.mkv", "shared": [theirs]}  # share the owner's file
    replace = forged_object(owner, tmp_path, b"replaced")
    replace["path"] = "media/film.mkv"
    cat_mod.append(host.storage, host.recipients, [alias, replace], signer=signer)
    cat = owner.catalog(reload=True)
    assert cat.get("x/alias.mkv") is not None and cat.get("x/alias.mkv").shared == ()  # type: ignore[union-attr]
    assert cat.get("media/film.mkv") == real  # not replaced
    assert any("a writer may not replace a file" in w for w in cat.warnings)
    # A writer's segment that lies about its generation or position is ignored, not fatal.
    bogus = {"pqfs_catalog": 2, "kind": "delta", "generation": 10**6, "ops": []}
    segs = cat_mod.list_segments(owner.storage)
    seq = segs[-1].seq + 1
    prev = hashlib.sha256(owner.storage.read_bytes(segs[-1].key)).hexdigest()
    body = json.dumps({**bogus, "seq": seq, "prev": prev}).encode()
    raw_segment(owner, {"kind": "delta"}, plain=cat_mod.seal(body, key, owner.config.vault_id))
    rc, out, err = cli(capfd, "ls", "-R", root_of(owner), "--passphrase-file", pw)
    assert rc == 0 and "film.mkv" in out and f"catalog segment {seq} ignored" in err
    rc, _, err = cli(capfd, "writer", "rm", root_of(owner), "ingest", "--passphrase-file", pw)
    assert rc == 0, err


def test_a_malformed_config_is_one_clear_error(owner: Vault) -> None:
    root = root_of(owner)
    for text in ("[" * 100_000, json.dumps({"format": "pqfs-vault", "version": 2, "recipients": [],
                                             "owner": 3_000_000_000, "signature": "AA"})):  # fmt: skip
        (root / CONFIG).write_text(text)
        with pytest.raises(ConfigError):
            Vault.open(str(root))


def test_a_forged_config_seen_first_is_not_what_the_host_pins(
    owner: Vault, pw: Path, capfd: pytest.CaptureFixture[str], state_dir: Path
) -> None:
    root = root_of(owner)
    real = (root / CONFIG).read_bytes()
    theirs = SigningKey.generate()
    forged = VaultConfig(2, owner.config.recipients, owner=theirs.verify_key, generation=1)
    (root / CONFIG).write_bytes(forged.to_bytes(theirs))
    shutil.rmtree(state_dir)  # a host that never saw the vault
    rc, _, err = cli(capfd, "ls", root, "--passphrase-file", pw)
    assert rc == 1 and "not signed by this vault's identity" in err
    (root / CONFIG).write_bytes(real)
    rc, out, _ = cli(capfd, "ls", "-R", root, "--passphrase-file", pw)
    assert rc == 0 and "film.mkv" in out  # no --reset needed: the forgery was never pinned


def test_writer_add_refuses_an_existing_key_file_before_it_changes_the_config(
    owner: Vault, tmp_path: Path, pw: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    existing = tmp_path / "taken.key"
    existing.write_text("mine")
    before = (root_of(owner) / CONFIG).read_bytes()
    rc, _, err = cli(
        capfd, "writer", "add", root_of(owner), "ingest", "-o", existing, "--passphrase-file", pw
    )
    assert rc == 1 and "exists; refusing to overwrite" in err
    assert (root_of(owner) / CONFIG).read_bytes() == before and existing.read_text() == "mine"


def test_upgrade_with_a_backup_identity_is_refused(tmp_path: Path) -> None:
    backup = HybridIdentity.generate()
    v = Vault.create(str(tmp_path / "old"), PASSPHRASE, [backup.recipient()], log_n=10)
    old = as_version_1(v)
    old.unlock_with([backup])
    with pytest.raises(PqfsError, match="the vault's own post-quantum identity"):
        upgrade.upgrade(old)


def test_a_twin_segment_is_taken_back_by_the_writer_that_finds_it(owner: Vault) -> None:
    """A snapshot and a delta of one number can both be created (the key names the kind):
    the appender that finds the other after writing deletes its own and goes after it."""
    inner = owner.storage
    tail = cat_mod.list_segments(inner)[-1].seq

    class Racing:
        raced = False

        def __getattr__(self, name: str) -> object:
            return getattr(inner, name)

        def put_bytes(self, key: str, data: bytes, exclusive: bool = False) -> None:
            inner.put_bytes(key, data, exclusive)
            twin = key.replace(".delta.", ".snap.")
            if not self.raced:  # the compaction that raced us, once
                self.raced = True
                inner.put_bytes(twin, inner.read_bytes(cat_mod.list_segments(inner)[0].key))

    written = cat_mod.append(Racing(), owner.recipients, [], signer=owner.signer())  # type: ignore[arg-type]
    assert written is not None and written.seq == tail + 2
    kinds = {(s.seq, s.kind) for s in cat_mod.list_segments(inner)}
    assert (tail + 1, "delta") not in kinds and (tail + 2, "delta") in kinds
