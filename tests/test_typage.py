"""Post-quantum interop with an independent age implementation, both ways: typage (npm
`age-encryption` 0.3.1, by age's author, on Node) decrypts a pqfs content object with the
vault's exported identity, and a file it encrypts to the vault recipient imports into the
vault without re-encryption. Debian's age 1.1.1 knows no post-quantum keys, so this is the
suite's only check that pqfs's mlkem768x25519 stanzas are the ones the age ecosystem writes.
These tests fail, not skip, when typage is missing: `./test.sh` installs it."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from pqfs.vault.objects import object_key
from pqfs.vault.vault import Vault
from tests.conftest import PASSPHRASE, ROOT, run_pqfs

pytestmark = pytest.mark.interop

SCRIPT = ROOT / "tests" / "interop" / "typage.mjs"
TYPAGE_DIR = ROOT / ".venv" / "typage"


def typage(*args: str) -> None:
    node = shutil.which("node")
    assert node, "node is missing: ./test.sh installs nodejs"
    assert (TYPAGE_DIR / "node_modules" / "age-encryption").is_dir(), (
        "typage is missing: ./test.sh installs it (npm age-encryption) into .venv/typage"
    )
    env = dict(os.environ, TYPAGE_DIR=str(TYPAGE_DIR))
    proc = subprocess.run([node, str(SCRIPT), *args], env=env, capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")


@pytest.fixture
def pq_vault_dir(tmp_path: Path, cli_env: dict[str, str]) -> Path:
    vault_dir = tmp_path / "vault"
    run_pqfs("init", str(vault_dir), env=cli_env)  # post-quantum identity only
    return vault_dir


def test_typage_decrypts_a_content_object(
    tmp_path: Path, cli_env: dict[str, str], pq_vault_dir: Path
) -> None:
    data = os.urandom(3 * 65536 + 123)  # several chunks and a short final one
    src = tmp_path / "clip.bin"
    src.write_bytes(data)
    run_pqfs("add", str(pq_vault_dir), str(src), "clip.bin", env=cli_env)
    identity = tmp_path / "vault.key"
    run_pqfs("identity", str(pq_vault_dir), "-o", str(identity), env=cli_env)
    assert "AGE-SECRET-KEY-PQ-1" in identity.read_text()
    v = Vault.open(str(pq_vault_dir))
    v.unlock(PASSPHRASE)
    entry = v.entry("clip.bin")
    out = tmp_path / "out.bin"
    typage("decrypt", str(identity), str(pq_vault_dir / object_key(entry.object)), str(out))
    assert out.read_bytes() == data


def test_file_encrypted_by_typage_imports(
    tmp_path: Path, cli_env: dict[str, str], pq_vault_dir: Path
) -> None:
    data = os.urandom(2 * 65536)  # a full final chunk
    src = tmp_path / "song.flac"
    src.write_bytes(data)
    v = Vault.open(str(pq_vault_dir))
    (recipient,) = [r.encode() for r in v.recipients]
    assert recipient.startswith("age1pq1")
    enc = tmp_path / "song.flac.age"
    typage("encrypt", recipient, str(src), str(enc))
    run_pqfs("import", str(pq_vault_dir), str(enc), "music/song.flac", env=cli_env)
    got = run_pqfs("cat", str(pq_vault_dir), "music/song.flac", env=cli_env).stdout
    assert got == data
    run_pqfs("verify", str(pq_vault_dir), env=cli_env)
