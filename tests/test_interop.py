"""Interoperability with the reference `age` tool (Debian's age 1.1.1: X25519 and scrypt only, no
post-quantum). These tests FAIL, rather than skip, when /usr/bin/age is missing: interop is a
property pqfs promises, not an optional extra."""

from __future__ import annotations

import os
import pty
import select
import signal
import stat
import subprocess
import time
import warnings
from pathlib import Path

import pytest

from pqfs.format import armor
from pqfs.format.header import parse_header
from pqfs.format.keys import parse_recipient
from pqfs.format.stream import CHUNK, NONCE_SIZE
from pqfs.vault.catalog import put_op
from pqfs.vault.objects import object_key, open_reader
from pqfs.vault.vault import Vault
from tests.conftest import PASSPHRASE, run_pqfs, tree_snapshot

pytestmark = pytest.mark.interop

AGE = "/usr/bin/age"
AGE_KEYGEN = "/usr/bin/age-keygen"


def _require(tool: str) -> str:
    assert os.path.isfile(tool) and os.access(tool, os.X_OK), (
        f"{tool} is missing: install Debian's `age` package to run the interop tests"
    )
    return tool


def age(*args: str, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([_require(AGE), *args], input=input, capture_output=True, timeout=120)


def age_keygen(path: Path) -> str:
    """A fresh X25519 identity file written by age-keygen; returns its recipient."""
    proc = subprocess.run([_require(AGE_KEYGEN), "-o", str(path)], capture_output=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    rcpt = (
        subprocess.run([AGE_KEYGEN, "-y", str(path)], capture_output=True, timeout=60, check=True)
        .stdout.decode()
        .strip()
    )
    # A classic recipient is "age" "1" data; its data may well begin with "pq" (1 in 1024: it
    # happened in CI). A hybrid one is "age1pq" "1" data, and bech32 data never holds a "1".
    assert rcpt.startswith("age1") and not rcpt.startswith("age1pq1")
    return rcpt


def age_encrypt_with_passphrase(src: Path, dst: Path, passphrase: bytes) -> None:
    """`age -e -p` reads the passphrase from the terminal only: drive it through a pty."""
    _require(AGE)
    with warnings.catch_warnings():  # the child execs at once: forking with threads is safe
        warnings.simplefilter("ignore", DeprecationWarning)
        pid, fd = pty.fork()
    if pid == 0:  # child: exec at once
        try:
            os.execv(AGE, [AGE, "-e", "-p", "-o", str(dst), str(src)])
        finally:
            os._exit(127)
    transcript = b""
    answered = 0
    deadline = time.monotonic() + 120
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                os.kill(pid, signal.SIGKILL)
                raise AssertionError(f"age -e -p timed out; terminal said {transcript!r}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if not ready:
                continue
            try:
                chunk = os.read(fd, 1024)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            transcript += chunk
            # "Enter passphrase ...:" then "Confirm passphrase:"
            while answered < min(2, transcript.count(b"passphrase")):
                os.write(fd, passphrase + b"\n")
                answered += 1
    finally:
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, transcript
    assert dst.read_bytes().startswith(b"age-encryption.org/v1\n-> scrypt ")


def obj_path(v: Vault, object_id: str) -> Path:
    return Path(v.storage.root) / object_key(object_id)  # type: ignore[attr-defined]


def add(v: Vault, tmp_path: Path, dest: str, data: bytes) -> Path:
    src = tmp_path / f"src-{os.urandom(4).hex()}"
    src.write_bytes(data)
    e = v.add_file(str(src), dest)
    v.commit([put_op(e)])
    return obj_path(v, e.object)


def key_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln and not ln.startswith("#")]


def assert_one_line_error(proc: subprocess.CompletedProcess[bytes]) -> str:
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode != 0, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("pqfs: error:"), err
    return lines[0]


def assert_import_refused(root: Path, enc: Path, env: dict[str, str], expect: str) -> None:
    """`pqfs import` of `enc` fails with one line containing `expect`; the vault is unchanged.
    stdin is not a terminal: pqfs must neither prompt for anything nor crash."""
    before = tree_snapshot(root)
    proc = run_pqfs("import", str(root), str(enc), env=env, check=False, input=b"")
    assert expect in assert_one_line_error(proc)
    assert tree_snapshot(root) == before


# ------------------------------------------------------------------------------ tests ----


def test_age_tools_present() -> None:
    proc = age("--version")
    assert proc.returncode == 0
    _require(AGE_KEYGEN)


def test_age_decrypts_objects_of_classic_vault(
    vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = Path(vault.storage.root)  # type: ignore[attr-defined]
    ident = tmp_path / "classic.key"
    run_pqfs("identity", str(root), "--classic-only", "-o", str(ident), env=cli_env)
    assert stat.S_IMODE(ident.stat().st_mode) == 0o600
    text = ident.read_text()
    assert key_lines(text) == key_lines(vault.identity_text(classic_only=True))
    assert len(key_lines(text)) == 1 and key_lines(text)[0].startswith("AGE-SECRET-KEY-1")

    for size in (0, 1, CHUNK, CHUNK + 1, 200000):
        data = os.urandom(size)
        obj = add(vault, tmp_path, f"f{size}", data)
        proc = age("-d", "-i", str(ident), str(obj))
        assert proc.returncode == 0, (size, proc.stderr)
        assert proc.stdout == data, f"age -d gave different bytes for size {size}"

    # The catalog segments are plain age files too.
    seg = sorted((root / "catalog").iterdir())[-1]
    proc = age("-d", "-i", str(ident), str(seg))
    assert proc.returncode == 0, proc.stderr
    assert b'"pqfs_catalog"' in proc.stdout


def test_pq_vault_with_age_keygen_recipient(tmp_path: Path, cli_env: dict[str, str]) -> None:
    key = tmp_path / "age.key"
    rcpt = age_keygen(key)
    root = tmp_path / "v"
    proc = run_pqfs("init", str(root), "--recipient", rcpt, env=cli_env)
    assert "not post-quantum" in proc.stderr.decode()
    v = Vault.open(str(root))
    recipients = [r.encode() for r in v.recipients]
    assert rcpt in recipients
    assert sum(r.post_quantum for r in v.recipients) == 1  # only the vault's own hybrid key
    data = os.urandom(3 * CHUNK + 77)
    v.unlock(PASSPHRASE)  # the owner signs the catalog segment; the object needs public keys only
    obj = add(v, tmp_path, "x/y.bin", data)
    proc = age("-d", "-i", str(key), str(obj))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data
    # and pqfs itself still opens it with the PQ identity
    with open_reader(v, "x/y.bin") as r:
        assert r.read(0, r.size) == data


def test_share_with_age_recipient_keeps_payload(
    pq_vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = Path(pq_vault.storage.root)  # type: ignore[attr-defined]
    key = tmp_path / "friend.key"
    rcpt = age_keygen(key)
    data = os.urandom(3 * CHUNK + 1234)
    old_obj = add(pq_vault, tmp_path, "media/clip.bin", data)
    old_e = pq_vault.entry("media/clip.bin")
    old_raw = old_obj.read_bytes()
    # Before sharing, the age key opens nothing (and age 1.1.1 has no PQ support at all).
    assert age("-d", "-i", str(key), str(old_obj)).returncode != 0

    run_pqfs("share", str(root), "media/clip.bin", "-r", rcpt, env=cli_env)

    v = Vault.open(str(root))
    v.unlock(PASSPHRASE)
    new_e = v.entry("media/clip.bin")
    assert new_e.object != old_e.object
    assert (new_e.size, new_e.mode, new_e.mtime_ns) == (old_e.size, old_e.mode, old_e.mtime_ns)
    assert not old_obj.exists(), "the old object should be deleted after sharing"
    new_raw = obj_path(v, new_e.object).read_bytes()

    proc = age("-d", "-i", str(key), str(obj_path(v, new_e.object)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == data
    assert run_pqfs("cat", str(root), "media/clip.bin", env=cli_env).stdout == data

    # Not re-encrypted: nonce and every payload byte are identical; the old stanzas are kept.
    assert new_raw[new_e.hlen :] == old_raw[old_e.hlen :]
    assert len(new_raw[new_e.hlen :]) > NONCE_SIZE + 3 * CHUNK
    old_h, new_h = parse_header(old_raw), parse_header(new_raw)
    assert new_h.stanzas[: len(old_h.stanzas)] == old_h.stanzas
    assert [s.args[0] for s in new_h.stanzas[len(old_h.stanzas) :]] == ["X25519"]


@pytest.mark.parametrize("armored", [False, True], ids=["binary", "armored"])
def test_import_file_encrypted_by_age(
    vault: Vault, tmp_path: Path, cli_env: dict[str, str], armored: bool
) -> None:
    root = Path(vault.storage.root)  # type: ignore[attr-defined]
    x25519 = [r.encode() for r in vault.recipients if not r.post_quantum]
    assert len(x25519) == 1
    plain = tmp_path / "movie.mkv"
    data = os.urandom(2 * CHUNK + 999)
    plain.write_bytes(data)
    enc = tmp_path / "movie.mkv.age"
    proc = age("-e", *(["-a"] if armored else []), "-r", x25519[0], "-o", str(enc), str(plain))
    assert proc.returncode == 0, proc.stderr
    assert enc.read_bytes().startswith(b"-----BEGIN AGE ENCRYPTED FILE-----") == armored

    run_pqfs("import", str(root), str(enc), "films/movie.mkv", env=cli_env)
    assert run_pqfs("cat", str(root), "films/movie.mkv", env=cli_env).stdout == data

    v = Vault.open(str(root))
    v.unlock(PASSPHRASE)
    e = v.entry("films/movie.mkv")
    assert e.size == len(data)
    raw, enc_raw = obj_path(v, e.object).read_bytes(), enc.read_bytes()
    if armored:
        enc_raw = armor.decode(enc_raw)
    assert raw[e.hlen :] == enc_raw[parse_header(enc_raw).length :], "import re-encrypted"
    # the imported object is wrapped to the vault's own (post-quantum) key as well
    assert "mlkem768x25519" in [s.args[0] for s in parse_header(raw).stanzas]


def test_import_file_for_unrelated_key_fails_cleanly(
    vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = Path(vault.storage.root)  # type: ignore[attr-defined]
    other = age_keygen(tmp_path / "other.key")
    plain = tmp_path / "p"
    plain.write_bytes(os.urandom(5000))
    enc = tmp_path / "p.age"
    assert age("-e", "-r", other, "-o", str(enc), str(plain)).returncode == 0
    assert_import_refused(root, enc, cli_env, "identity")


def test_import_passphrase_encrypted_file_fails_cleanly(
    vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    root = Path(vault.storage.root)  # type: ignore[attr-defined]
    plain = tmp_path / "secret.txt"
    plain.write_bytes(b"passphrase protected\n" * 100)
    enc = tmp_path / "secret.txt.age"
    age_encrypt_with_passphrase(plain, enc, b"interop-secret")
    assert_import_refused(root, enc, cli_env, "passphrase-encrypted")


def test_import_corrupted_age_file_fails_cleanly(
    vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """The import authenticates every chunk before anything lands in the vault."""
    root = Path(vault.storage.root)  # type: ignore[attr-defined]
    x25519 = next(r.encode() for r in vault.recipients if not r.post_quantum)
    plain = tmp_path / "p"
    plain.write_bytes(os.urandom(3 * CHUNK + 5))
    enc = tmp_path / "p.age"
    assert age("-e", "-r", x25519, "-o", str(enc), str(plain)).returncode == 0
    raw = bytearray(enc.read_bytes())
    raw[parse_header(bytes(raw)).length + NONCE_SIZE + CHUNK + 100] ^= 1  # inside chunk 1
    enc.write_bytes(bytes(raw))
    assert_import_refused(root, enc, cli_env, "chunk 1")


def test_import_of_tampered_armor_fails_cleanly(
    vault: Vault, tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """Armor is parsed strictly (it is malleable otherwise): text after the END line is refused
    with one line, and nothing is imported."""
    root = Path(vault.storage.root)  # type: ignore[attr-defined]
    x25519 = next(r.encode() for r in vault.recipients if not r.post_quantum)
    plain = tmp_path / "p"
    plain.write_bytes(os.urandom(5000))
    enc = tmp_path / "p.age"
    assert age("-e", "-a", "-r", x25519, "-o", str(enc), str(plain)).returncode == 0
    enc.write_bytes(enc.read_bytes() + b"appended\n")
    assert_import_refused(root, enc, cli_env, "after the END")


def test_parse_recipient_accepts_age_keygen_output(tmp_path: Path) -> None:
    rcpt = age_keygen(tmp_path / "k")
    r = parse_recipient(rcpt)
    assert r.encode() == rcpt and not r.post_quantum
