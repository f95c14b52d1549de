"""Where secrets come from, in this order: --passphrase-file, a systemd credential
($CREDENTIALS_DIRECTORY/passphrase), PQFS_PASSPHRASE, a prompt; or an identity file.

Passphrases are never echoed, logged or placed in exception messages.
"""

from __future__ import annotations

import getpass
import os
import stat
import sys

from .errors import PqfsError
from .keys import HybridIdentity, X25519Identity, parse_identity_file

ENV_PASSPHRASE = "PQFS_PASSPHRASE"
ENV_NEW_PASSPHRASE = "PQFS_NEW_PASSPHRASE"
CREDENTIAL = "passphrase"  # the name in $CREDENTIALS_DIRECTORY (systemd LoadCredential=)


def _read_secret_file(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(1 << 16)
    except OSError as e:
        raise PqfsError(f"cannot read {what} {path}: {e.strerror}") from None
    data = data.rstrip(b"\r\n")  # one trailing newline is the file's, not the passphrase's
    if not data:
        raise PqfsError(f"{what} {path} is empty")
    return data


def passphrase(
    file: str | None, env: str = ENV_PASSPHRASE, confirm: bool = False, prompt: str = "Passphrase"
) -> bytes:
    if file:
        return _read_secret_file(file, "passphrase file")
    cred = os.environ.get("CREDENTIALS_DIRECTORY")
    if cred and env == ENV_PASSPHRASE and os.path.exists(os.path.join(cred, CREDENTIAL)):
        # systemd's LoadCredential=passphrase:...: the secret never appears in a command line
        # or in an environment that other units could read.
        return _read_secret_file(os.path.join(cred, CREDENTIAL), "credential")
    value = os.environ.get(env)
    if value:
        return value.encode()
    if not sys.stdin.isatty():
        raise PqfsError(f"no passphrase: use --passphrase-file, set {env}, or run in a terminal")
    first = getpass.getpass(f"{prompt}: ").encode()
    if not first:
        raise PqfsError("the passphrase may not be empty")
    if confirm and getpass.getpass(f"{prompt} (again): ").encode() != first:
        raise PqfsError("the passphrases do not match")
    return first


def identity_file(path: str) -> list[HybridIdentity | X25519Identity]:
    try:
        st = os.stat(path)
    except OSError as e:
        raise PqfsError(f"cannot read identity file {path}: {e.strerror}") from None
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise PqfsError(
            f"identity file {path} is accessible by group or others (run: chmod 600 {path})"
        )
    try:
        with open(path, encoding="ascii") as f:
            text = f.read(1 << 20)
    except (OSError, UnicodeDecodeError):
        raise PqfsError(f"cannot read identity file {path}: not an age identity file") from None
    try:
        return parse_identity_file(text)
    except PqfsError:
        raise PqfsError(f"{path} is not an age identity file") from None
