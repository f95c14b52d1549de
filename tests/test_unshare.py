"""Sharing and revoking a share (issue 17): `pqfs unshare PATH -r R` rewraps the file without
R's stanza (and says plainly that R, having read the file key before, could still decrypt the
object from the store); `--reencrypt` makes a new object under a new key so that not even that
works. Checked with the stock `age -d` and the recipients' own identity files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pqfs.errors import VaultError
from pqfs.format.agefile import BytesSource, read_header
from pqfs.format.keys import parse_identity_file, parse_recipient, unwrap
from pqfs.runtime.memory import wipe
from pqfs.vault import maintenance, rekey
from pqfs.vault.catalog import put_op
from pqfs.vault.objects import object_key
from pqfs.vault.vault import Vault

from .conftest import PASSPHRASE, run_pqfs
from .test_interop import age, age_keygen


@pytest.fixture
def film(pq_vault: Vault, tmp_path: Path) -> bytes:
    data = os.urandom(200_000)
    src = tmp_path / "film.mkv"
    src.write_bytes(data)
    pq_vault.commit([put_op(pq_vault.add_file(str(src), "film.mkv"))])
    return data


def obj(v: Vault, path: str = "film.mkv") -> Path:
    v.forget_catalog()
    return Path(v.location) / object_key(v.entry(path).object)


def opens(key: Path, v: Vault) -> bytes | None:
    proc = age("-d", "-i", str(key), str(obj(v)))
    return proc.stdout if proc.returncode == 0 else None


def test_unshare_takes_one_recipient_away_and_keeps_the_others(
    pq_vault: Vault, film: bytes, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    a, b = tmp_path / "a.key", tmp_path / "b.key"
    ra, rb = age_keygen(a), age_keygen(b)
    run_pqfs("share", pq_vault.location, "film.mkv", "-r", ra, "-r", rb, env=cli_env)
    assert opens(a, pq_vault) == film and opens(b, pq_vault) == film
    shared_object = obj(pq_vault)
    proc = run_pqfs("unshare", pq_vault.location, "film.mkv", "-r", ra, env=cli_env)
    err = proc.stderr.decode()
    assert "the content was not re-encrypted" in err and "--reencrypt" in err
    assert opens(a, pq_vault) is None and opens(b, pq_vault) == film
    assert not shared_object.exists()  # the object with A's stanza is gone from the store
    assert pq_vault.entry("film.mkv").shared == (rb,)
    assert run_pqfs("cat", pq_vault.location, "film.mkv", env=cli_env).stdout == film


def test_without_reencrypt_a_kept_file_key_still_opens_the_new_object(
    pq_vault: Vault, film: bytes, tmp_path: Path
) -> None:
    """What the message says: the payload and its key are the same."""
    a = tmp_path / "a.key"
    ra = parse_recipient(age_keygen(a))
    maintenance.share(pq_vault, "film.mkv", [ra])
    before = obj(pq_vault).read_bytes()
    kept = unwrap(read_header(BytesSource(before)), parse_identity_file(a.read_bytes()))
    maintenance.unshare(pq_vault, "film.mkv", [ra])
    after = obj(pq_vault).read_bytes()
    header = read_header(BytesSource(after))
    assert after[header.length :] == before[read_header(BytesSource(before)).length :]
    fk = pq_vault.file_key(pq_vault.entry("film.mkv"), header)
    assert bytes(fk) == bytes(kept)
    wipe(kept)


def test_reencrypt_makes_a_new_key_that_no_kept_key_opens(
    pq_vault: Vault, film: bytes, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    a = tmp_path / "a.key"
    ra = age_keygen(a)
    run_pqfs("share", pq_vault.location, "film.mkv", "-r", ra, env=cli_env)
    before = obj(pq_vault).read_bytes()
    kept = unwrap(read_header(BytesSource(before)), parse_identity_file(a.read_bytes()))
    proc = run_pqfs("unshare", "--reencrypt", pq_vault.location, "film.mkv", "-r", ra, env=cli_env)
    assert "encrypted again under a new key" in proc.stderr.decode()
    after = obj(pq_vault).read_bytes()
    header = read_header(BytesSource(after))
    assert bytes(pq_vault.file_key(pq_vault.entry("film.mkv"), header)) != bytes(kept)
    assert after[header.length :] != before[read_header(BytesSource(before)).length :]
    assert opens(a, pq_vault) is None
    assert run_pqfs("cat", pq_vault.location, "film.mkv", env=cli_env).stdout == film
    assert run_pqfs("verify", pq_vault.location, env=cli_env).returncode == 0


def test_a_vault_recipient_cannot_be_unshared(pq_vault: Vault, film: bytes) -> None:
    with pytest.raises(VaultError, match="vault recipient"):
        maintenance.unshare(pq_vault, "film.mkv", [pq_vault.recipients[0]])


def test_shares_survive_a_rekey(pq_vault: Vault, film: bytes, tmp_path: Path) -> None:
    a = tmp_path / "a.key"
    ra = parse_recipient(age_keygen(a))
    maintenance.share(pq_vault, "film.mkv", [ra])
    v = Vault.open(pq_vault.location)
    v.unlock(PASSPHRASE)
    rekey.rekey(v, PASSPHRASE)
    v.forget_catalog()
    assert opens(a, v) == film
    assert v.entry("film.mkv").shared == (ra.encode(),)
