"""Where secrets come from, in this order: --passphrase-file, a systemd credential
($CREDENTIALS_DIRECTORY/passphrase), PQFS_PASSPHRASE, a prompt; or an identity file.

Passphrases are never echoed, logged or placed in exception messages, and never pass through
a `str` or `bytes` object: they are read into bytearrays that the caller wipes (zeroize.py).
"""

from __future__ import annotations

import hmac
import os
import stat
import sys

from pqfs.errors import PqfsError
from pqfs.format.keys import HybridIdentity, X25519Identity, parse_identity_file
from pqfs.runtime import zeroize
from pqfs.runtime.zeroize import ENV_PASSPHRASE
from pqfs.vault.signing import SigningKey

CREDENTIAL = "passphrase"  # the name in $CREDENTIALS_DIRECTORY (systemd LoadCredential=)


def _read_secret_file(path: str, what: str, limit: int = 1 << 16) -> bytearray:
    """A secret file's content as a bytearray (one trailing newline is the file's, not the
    secret's), read without a Python file object so that no other copy is made."""
    try:
        # A pipe is fine (`--passphrase-file <(pass show vault)`): it blocks until written.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as e:
        raise PqfsError(f"cannot read {what} {path}: {e.strerror}") from None
    try:
        data = zeroize.strip_newline(zeroize.read_fd(fd, limit))
    except OSError as e:
        raise PqfsError(f"cannot read {what} {path}: {e.strerror}") from None
    finally:
        os.close(fd)
    if not data:
        raise PqfsError(f"{what} {path} is empty")
    return data


def passphrase(
    file: str | None, env: str = ENV_PASSPHRASE, confirm: bool = False, prompt: str = "Passphrase"
) -> bytearray:
    """The passphrase as a bytearray the caller wipes when done with it."""
    if file:
        return _read_secret_file(file, "passphrase file")
    cred = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred and env == ENV_PASSPHRASE and os.path.exists(os.path.join(cred, CREDENTIAL)):
        # systemd's LoadCredential=passphrase:...: the secret never appears in a command line
        # or in an environment that other units could read.
        return _read_secret_file(os.path.join(cred, CREDENTIAL), "credential")
    value = zeroize.take_env(env)  # removed from the environment: a daemon must not keep it
    if value:
        return value
    if not sys.stdin.isatty():
        raise PqfsError(f"no passphrase: use --passphrase-file, set {env}, or run in a terminal")
    first = zeroize.prompt(prompt)
    if not first:
        raise PqfsError("the passphrase may not be empty")
    if confirm:
        again = zeroize.prompt(f"{prompt} (again)")
        same = hmac.compare_digest(first, again)
        zeroize.wipe(again)
        if not same:
            zeroize.wipe(first)
            raise PqfsError("the passphrases do not match")
    return first


def has_passphrase_env(env: str = ENV_PASSPHRASE) -> bool:
    """Whether the environment holds a passphrase (without making a copy of it)."""
    return bool(os.environb.get(os.fsencode(env)))


def identity_file(path: str) -> list[HybridIdentity | X25519Identity]:
    """The identities in an unencrypted identity file (which must be mode 0600)."""
    text = _identity_text(path)
    try:
        return _parsed(path, text)
    finally:
        zeroize.wipe(text)


def identity_file_bytes(path: str) -> bytearray:
    """The text of an identity file (mode 0600, checked to parse) as a bytearray to wipe."""
    text = _identity_text(path)
    try:
        for ident in _parsed(path, text):
            ident.wipe()
    except BaseException:
        zeroize.wipe(text)
        raise
    return text


def _parsed(path: str, text: bytearray) -> list[HybridIdentity | X25519Identity]:
    try:
        return parse_identity_file(text)
    except PqfsError:
        raise PqfsError(f"{path} is not an age identity file") from None


def _identity_text(path: str, what: str = "identity file") -> bytearray:
    try:
        st = os.stat(path)
    except OSError as e:
        raise PqfsError(f"cannot read {what} {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PqfsError(f"{what} {path} is accessible by group or others (run: chmod 600 {path})")
    return _read_secret_file(path, what, limit=1 << 20)


VAULT_ID_LINE = b"# vault-id: "


def writer_key_file(path: str) -> tuple[SigningKey, str | None]:
    """The writer key in a file `pqfs writer add` wrote (mode 0600), and the vault id it names
    (its `# vault-id:` line), which pins the vault on a host that never saw it."""
    text = _identity_text(path, "writer key file")
    try:
        key: SigningKey | None = None
        vault_id = None
        for line in _lines(text):
            if bytes(line[: len(VAULT_ID_LINE)]) == VAULT_ID_LINE:
                vault_id = bytes(line[len(VAULT_ID_LINE) :]).decode("ascii", "replace").strip()
            elif line and bytes(line[:1]) != b"#" and key is None:
                try:
                    key = SigningKey.decode(line)
                except PqfsError:
                    raise PqfsError(f"{path} is not a pqfs writer key file") from None
        if key is None:
            raise PqfsError(f"{path} is not a pqfs writer key file")
        return key, vault_id
    finally:
        zeroize.wipe(text)


def _lines(text: bytearray) -> list[memoryview]:
    """The lines of a secret's text as views into it (no copy of the secret)."""
    mv = memoryview(text)
    out, start = [], 0
    for i, c in enumerate(mv):
        if c == 0x0A:
            out.append(mv[start:i])
            start = i + 1
    out.append(mv[start:])
    return [ln[:-1] if len(ln) and ln[-1] == 0x0D else ln for ln in out]
