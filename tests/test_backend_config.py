"""The vault config chooses the ML-KEM backend; an unavailable one is a clear error."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pqfs.errors import PqfsError
from pqfs.format import kem
from pqfs.vault.catalog import put_op
from pqfs.vault.objects import open_reader
from pqfs.vault.vault import CONFIG, Vault

from .conftest import PASSPHRASE


@pytest.fixture(autouse=True)
def _reset_backend(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("PQFS_KEM_BACKEND", raising=False)
    yield
    kem.set_default_backend("auto")


def _set_backend(location: str, name: str) -> None:
    path = Path(location) / CONFIG
    config = json.loads(path.read_text())
    config["kem_backend"] = name
    path.write_text(json.dumps(config))


def test_config_backend_is_used_and_reads_files(pq_vault: Vault, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(os.urandom(70000))
    pq_vault.commit([put_op(pq_vault.add_file(str(src), "f"))])
    location = pq_vault.storage.describe()
    _set_backend(location, "cryptography-mlkem")
    v = Vault.open(location)
    assert kem.default_backend() == "cryptography-mlkem"
    v.unlock(PASSPHRASE)
    with open_reader(v, "f") as r:
        assert r.read(0, 70000) == src.read_bytes()


def test_unavailable_backend_is_a_clear_error(pq_vault: Vault) -> None:
    location = pq_vault.storage.describe()
    _set_backend(location, "no-such-backend")
    with pytest.raises(PqfsError, match="not available"):
        Vault.open(location)


def test_auto_detects_native_backend() -> None:
    kem.set_default_backend("auto")
    assert kem.default_backend() == "cryptography"
