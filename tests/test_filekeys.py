"""Derived file keys (pqfs.vault.filekeys, FORMAT.md §2.2): the identity's holder writes objects
whose file key it can derive, and opens them without a KEM; everything else still opens by its
stanzas, and a derived key is used only once the header MAC verifies with it."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from pqfs.errors import HeaderMacError, Locked
from pqfs.format.agefile import read_header
from pqfs.format.header import Header
from pqfs.format.keys import HybridIdentity, unwrap
from pqfs.storage.local import FileSource
from pqfs.vault import writers
from pqfs.vault.catalog import put_op
from pqfs.vault.filekeys import DerivedKeys
from pqfs.vault.objects import object_key, open_reader
from pqfs.vault.vault import Vault

from .test_vfs import ino_of, running


def test_derivation_vector() -> None:
    """FORMAT.md §2.2's vector: the all-zero identity seed's key for two object ids."""
    d = DerivedKeys(HybridIdentity(bytes(32)))
    assert d.for_object("00" * 16).hex() == "f0e672311ce6b730fd551330e476580f"
    assert d.for_object("ff" * 16).hex() == "8bc9584af604ac2c6205277cab050f8d"


def _add(v: Vault, tmp: Path, name: str, data: bytes) -> str:
    src = tmp / name.replace("/", "_")
    src.write_bytes(data)
    e = v.add_file(str(src), name)
    v.commit([put_op(e)])
    return e.object


def _header(v: Vault, object_id: str) -> Header:
    src = FileSource(Path(v.storage.describe()) / object_key(object_id))
    try:
        return read_header(src)
    finally:
        src.close()


def test_the_owner_writes_derived_keys_that_the_stanzas_also_wrap(
    vault: Vault, tmp_path: Path
) -> None:
    a = _add(vault, tmp_path, "a.bin", os.urandom(70_000))
    b = _add(vault, tmp_path, "b.bin", os.urandom(10))
    d = vault._derived_keys()
    assert d is not None
    for obj in (a, b):
        header = _header(vault, obj)
        derived = d.opening(obj, header)
        assert derived is not None
        # an ordinary age file: its stanzas wrap the same key, for every identity
        assert unwrap(header, vault.identities) == derived
    assert d.for_object(a) != d.for_object(b)
    # the derived key of one object does not open another
    assert d.opening(a, _header(vault, b)) is None


def test_an_object_with_a_random_key_opens_by_its_stanza(vault: Vault, tmp_path: Path) -> None:
    """A writer key's host holds no identity: its objects' keys are random, and the owner
    opens them by their stanzas (the KEM), with the right bytes."""
    key = writers.add(vault, "ingest")
    host = Vault.open(vault.storage.describe())
    host.use_writer_key(key)
    assert host.new_file_key("00" * 16) is None
    data = os.urandom(5000)
    obj = _add(host, tmp_path, "from-writer.bin", data)
    vault.forget_catalog()
    d = vault._derived_keys()
    assert d is not None and d.opening(obj, _header(vault, obj)) is None
    before = vault.keys_derived
    with open_reader(vault, "from-writer.bin") as r:
        assert b"".join(bytes(p) for p in r.iter_range(0, r.size)) == data
    assert vault.keys_derived == before


def test_a_header_whose_mac_does_not_verify_is_refused(vault: Vault, tmp_path: Path) -> None:
    """Neither the derived key nor a stanza's makes a changed MAC verify: HeaderMacError."""
    obj = _add(vault, tmp_path, "a.bin", b"x" * 1000)
    path = Path(vault.storage.describe()) / object_key(obj)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"\n--- ") + 5  # the MAC's first base64 character
    raw[at] = ord("B") if raw[at] == ord("A") else ord("A")
    path.write_bytes(raw)
    before = vault.keys_derived
    with pytest.raises(HeaderMacError):
        vault.unwrap_key(obj, _header(vault, obj))
    assert vault.keys_derived == before


def test_lock_wipes_the_derived_secret(vault: Vault, tmp_path: Path) -> None:
    obj = _add(vault, tmp_path, "a.bin", b"x")
    header = _header(vault, obj)
    d = vault._derived_keys()
    assert d is not None
    secret = d._secret
    assert any(secret)
    vault.lock()
    assert secret == bytearray(len(secret))
    assert vault._derived_keys() is None
    with pytest.raises(Locked):
        vault.unwrap_key(obj, header)
    with pytest.raises(Locked):  # a thread that still holds the wiped keys gets none from them
        d.for_object(obj)


async def test_a_scan_of_the_owners_files_needs_no_kem(vault: Vault, tmp_path: Path) -> None:
    files = {f"lib/{i:02d}.nfo": os.urandom(i * 100 + 1) for i in range(12)}
    for name, data in files.items():
        _add(vault, tmp_path, name, data)
    async with running(vault, open_ahead=0) as fs:
        for name, data in sorted(files.items()):
            fh = await fs.open(ino_of(fs, name), os.O_RDONLY)
            assert bytes(await fs.read(fh, 0, len(data))) == data
            fs.release(fh)
        s = fs.stats()
        assert s["key_misses"] == len(files)
        assert s["keys_derived"] == len(files)  # every key derived, no stanza unwrapped
