"""What `pqfs lock` leaves in the daemon's memory: nothing of the passphrase, the identity, or
any file or payload key. The test reads the running daemon's memory through /proc/PID/mem
(as root, as an attacker with the machine would) after each way of unlocking, and searches it
for every secret it knows from the vault itself."""

from __future__ import annotations

import errno
import os
import re
import socket
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from pqfs.errors import PqfsError
from pqfs.format.agefile import pread, read_header
from pqfs.format.encoding import bech32_decode
from pqfs.format.keys import unwrap
from pqfs.mount import control
from pqfs.runtime import zeroize
from pqfs.vault.objects import object_key
from pqfs.vault.vault import Vault
from tests.conftest import PASSPHRASE, daemon_pid, mounted, run_pqfs, sha_file

pytestmark = pytest.mark.fuse


def _secrets(vault_dir: Path, identity_file: Path) -> dict[str, bytes]:
    """Every secret a scan must not find: the passphrase, the identity line (as exported and
    lower-cased, as a Bech32 decoder sees it), the identity seed, and for every file its file
    key and its payload key (derived as the format says)."""
    v = Vault.open(str(vault_dir))
    v.unlock(PASSPHRASE)
    found = {"passphrase": PASSPHRASE}
    line = next(x for x in identity_file.read_text().splitlines() if x.startswith("AGE-SECRET"))
    found["identity line"] = line.encode()
    found["identity line (lower case)"] = line.lower().encode()
    found["identity seed"] = bech32_decode(line)[1]
    for e in v.catalog().files():
        src = v.storage.open_source(object_key(e.object))
        try:
            header = read_header(src)
            fk = unwrap(header, v.identities)
            nonce = pread(src, header.length, 16)
        finally:
            src.close()
        found[f"file key of {e.path}"] = bytes(fk)
        found[f"payload key of {e.path}"] = HKDF(
            hashes.SHA256(), 32, salt=nonce, info=b"payload"
        ).derive(bytes(fk))
    return found


def _scan(pid: int, secrets: dict[str, bytes]) -> dict[str, list[str]]:
    """Where in the process's memory each secret occurs: {name: [mapping at address]}."""
    hits: dict[str, list[str]] = {}
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", 0) as mem:
        for line in maps:
            fields = line.split()
            if "r" not in fields[1] or (len(fields) > 5 and fields[5] in ("[vvar]", "[vsyscall]")):
                continue
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except OSError:
                continue
            for name, secret in secrets.items():
                for m in re.finditer(re.escape(secret), data):
                    where = fields[5] if len(fields) > 5 else "anonymous"
                    hits.setdefault(name, []).append(f"{where} at {lo + m.start():#x}")
    return hits


def _read_all(mp: Path, files: dict[str, str]) -> None:
    for name, digest in files.items():
        assert sha_file(mp / name) == digest


@pytest.fixture
def secret_vault(tmp_path: Path, cli_env: dict[str, str]) -> tuple[Path, Path, dict[str, str]]:
    vault_dir = tmp_path / "vault"
    run_pqfs("init", str(vault_dir), env=cli_env)
    files = {}
    for name, size in (("small.bin", 5000), ("film.bin", 3 << 20)):  # the film is prefetched
        src = tmp_path / name
        src.write_bytes(os.urandom(size))
        run_pqfs("add", str(vault_dir), str(src), name, env=cli_env)
        files[name] = sha_file(src)
    identity = tmp_path / "vault.key"
    run_pqfs("identity", str(vault_dir), "-o", str(identity), env=cli_env)
    return vault_dir, identity, files


@pytest.mark.parametrize("mount_with", ["PQFS_PASSPHRASE", "--identity"])
def test_lock_leaves_no_secret_in_the_daemon(
    tmp_path: Path,
    cli_env: dict[str, str],
    secret_vault: tuple[Path, Path, dict[str, str]],
    mount_with: str,
) -> None:
    vault_dir, identity, files = secret_vault
    secrets = _secrets(vault_dir, identity)
    pw_file = tmp_path / "passphrase"
    pw_file.write_bytes(PASSPHRASE + b"\n")
    no_env = {k: v for k, v in cli_env.items() if k != "PQFS_PASSPHRASE"}
    mp = tmp_path / "mnt"
    # Mounted with an identity file while PQFS_PASSPHRASE is set too: the daemon keeps no
    # passphrase it did not use either.
    args = [] if mount_with == "PQFS_PASSPHRASE" else ["-i", str(identity)]
    env = cli_env
    with mounted(vault_dir, mp, env, *args):
        pid = daemon_pid(mp)
        environ = Path(f"/proc/{pid}/environ").read_bytes()
        assert PASSPHRASE not in environ, "the passphrase stayed in the daemon's environment"
        unlocks = [
            (mount_with, None),
            ("an identity file", ["unlock", str(mp), "-i", str(identity)]),
            ("a passphrase file", ["unlock", str(mp), "--passphrase-file", str(pw_file)]),
            ("an identity file again", ["unlock", str(mp), "-i", str(identity)]),
        ]
        for how, argv in unlocks:
            if argv is not None:
                run_pqfs(*argv, env=no_env)
            _read_all(mp, files)
            # The control: unlocked, the key cache holds every file key, and the scan finds
            # them; a scan that found nothing here could not be trusted to after lock.
            held = _scan(pid, secrets)
            for name in files:
                assert f"file key of {name}" in held, f"unlocked with {how}: {sorted(held)}"
            run_pqfs("lock", str(mp), env=no_env)
            left = _scan(pid, secrets)
            assert not left, f"after unlocking with {how}, then pqfs lock: {left}"


def test_a_typed_line_too_long_is_refused_whole() -> None:
    """A passphrase typed at the prompt is one line of the terminal: one longer than the buffer
    is an error, never the passphrase cut short, and the rest of it is not left on the terminal
    for the shell to run as a command."""
    master, slave = os.openpty()  # canonical mode: a read returns at most one line
    try:
        os.write(master, b"x" * 1500 + b"\n" + b"next line\n")
        with pytest.raises(PqfsError, match="longer than 1023 bytes"):
            zeroize.read_line(slave)
        assert zeroize.read_line(slave) == bytearray(b"next line")  # nothing of the long one
        os.write(master, b"y" * 1023 + b"\n")  # the longest that fits, newline included
        assert zeroize.read_line(slave) == bytearray(b"y" * 1023)
    finally:
        os.close(master)
        os.close(slave)


def test_a_request_cut_off_leaves_no_secret_in_the_daemon(
    tmp_path: Path, cli_env: dict[str, str], secret_vault: tuple[Path, Path, dict[str, str]]
) -> None:
    """A client that sends half an unlock and stalls gets ETIMEDOUT (control_timeout, 10 s),
    and what the daemon had received of the secret is wiped with the request's buffer."""
    vault_dir, _identity, _files = secret_vault
    marker = b"stalled-secret-" + os.urandom(12).hex().encode()
    with mounted(vault_dir, tmp_path / "mnt", cli_env) as mp:
        pid = daemon_pid(mp)
        address = os.getxattr(mp, control.XATTR_CONTROL)
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(120)
            s.connect(b"\0" + address)
            # The marker well inside the buffer: malloc's own use of a freed block (its first
            # bytes) must not be what hides it.
            s.sendall(b"unlock\n" + b"p" * 200 + marker)  # and nothing more: no end of it
            answer = s.recv(4096)
        assert answer.split()[0] == str(errno.ETIMEDOUT).encode(), answer
        left = _scan(pid, {"the stalled request's secret": marker})
        assert not left, left
