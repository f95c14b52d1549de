"""What the commands share of their command lines: the parser class, the option groups (S3,
unlocking), the argument types, and turning parsed options into an open vault.

Defaults come from the options dataclasses (StorageOptions here, MountOptions in
mount_cmds.py) and a help text shows the dataclass's value: no default is written twice.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from pqfs.cli.messages import EXIT_USAGE, warn
from pqfs.cli.unlock import has_passphrase_env, identity_file, passphrase, writer_key_file
from pqfs.format.keys import Recipient, parse_recipient
from pqfs.mount.options import MountOptions
from pqfs.runtime.zeroize import wipe
from pqfs.storage.base import StorageOptions
from pqfs.vault.vault import Vault

Command = Callable[[argparse.Namespace], int]
Subparsers = Any  # argparse's _SubParsersAction[Parser], private to argparse


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def subcommand(sub: Subparsers, name: str, func: Command, help: str) -> Parser:
    """A subcommand's parser, whose parsed arguments go to `func`."""
    sp: Parser = sub.add_parser(name, help=help, description=help)
    sp.set_defaults(func=func)
    return sp


# ------------------------------------------------------------------ option groups ----


def s3_options(sp: argparse.ArgumentParser, mount: bool = False) -> None:
    g = sp.add_argument_group("S3 (VAULT = s3://bucket/prefix; credentials as for the AWS CLI)")
    g.add_argument(
        "--endpoint-url",
        metavar="URL",
        help="S3-compatible service (default: AWS_ENDPOINT_URL, the AWS config, or AWS)",
    )
    g.add_argument(
        "--timeout",
        type=parse_seconds,
        default=None,
        metavar="SECONDS",
        help="give up on a storage request after this long, retries included; a mount "
        f"gives up opening a file after {MountOptions.open_timeouts:g} times this, on any "
        "vault (default: "
        f"{StorageOptions.timeout:g})",
    )
    if mount:
        g.add_argument(
            "--disk-cache",
            metavar="DIR",
            help="keep fetched ciphertext in DIR, so reading a range again costs no request",
        )
        g.add_argument(
            "--disk-cache-size",
            type=parse_size,
            default=StorageOptions.disk_cache_size,
            metavar="SIZE",
            help=f"disk cache budget (default: {size_text(StorageOptions.disk_cache_size)})",
        )


def unlock_options(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("unlocking (default: prompt for the passphrase)")
    g.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
    g.add_argument(
        "-i",
        "--identity",
        metavar="FILE",
        help="an unencrypted identity file (mode 0600) instead of the passphrase",
    )


# ------------------------------------------------------------------ from the options ----


def storage_options(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(
        endpoint_url=getattr(args, "endpoint_url", None),
        timeout=getattr(args, "timeout", None) or StorageOptions.timeout,
        disk_cache=getattr(args, "disk_cache", None),
        disk_cache_size=getattr(args, "disk_cache_size", StorageOptions.disk_cache_size),
    )


def writer_options(sp: argparse.ArgumentParser) -> None:
    g = sp.add_argument_group("an ingest host without the identity")
    g.add_argument(
        "--writer-key",
        metavar="FILE",
        help="sign what is added with this host's writer key (from pqfs writer add)",
    )


def vault_arg(sp: argparse.ArgumentParser) -> None:
    """VAULT, the S3 options, and --vault-id: what every command on a vault takes."""
    sp.add_argument("vault", metavar="VAULT")
    s3_options(sp)
    vault_id_option(sp)


def vault_id_option(g: argparse.ArgumentParser) -> None:
    g.add_argument(
        "--vault-id",
        metavar="ID",
        help="the vault id that pqfs init printed: refuse a vault signed by any other key "
        "(default: the one this host pinned when it first used the vault)",
    )


def open_vault(args: argparse.Namespace, unlock: bool, legacy_warning: bool = True) -> Vault:
    vault_id = getattr(args, "vault_id", None)
    writer = None
    if getattr(args, "writer_key", None):
        writer, named = writer_key_file(args.writer_key)
        vault_id = vault_id or named
    try:
        v = Vault.open(args.vault, storage_options(args), vault_id=vault_id)
        if writer is not None:
            v.use_writer_key(writer)
            writer = None
    finally:
        if writer is not None:
            writer.wipe()
    v.on_warning = warn  # ops of the catalog that are ignored (pqfs: warning: catalog segment..)
    if not v.config.signed and legacy_warning:
        warn(
            f"{args.vault} is a version 1 vault: its catalog and config are not signed, so "
            "whoever can write to the store can change them (run: pqfs upgrade VAULT)"
        )
    if unlock:
        if getattr(args, "identity", None):
            v.unlock_with(identity_file(args.identity))
        else:
            pw = passphrase(getattr(args, "passphrase_file", None))
            try:
                v.unlock(pw)
            finally:
                wipe(pw)
    return v


def can_unlock(args: argparse.Namespace) -> bool:
    return bool(
        getattr(args, "identity", None)
        or getattr(args, "passphrase_file", None)
        or has_passphrase_env()
    )


def recipients(texts: Sequence[str] | None) -> list[Recipient]:
    out = []
    for t in texts or []:
        r = parse_recipient(t)
        if not r.post_quantum:
            warn(f"{t[:16]}... is an X25519 recipient: files wrapped to it are not post-quantum")
        out.append(r)
    return out


# ------------------------------------------------------------------ argument types ----

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_nonneg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return n


def parse_size(text: str) -> int:
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] != "" else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 64M, 1G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return int(value * _UNITS[unit])


def size_text(n: int) -> str:
    """`n` bytes as parse_size reads it back, in the largest unit that divides it (64M)."""
    for unit in ("T", "G", "M", "K"):
        if n and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds, from `90`, `90s`, `15m`, `24h` or `7d`."""
    unit = _DURATION_UNITS.get(text[-1:].lower())
    number = text[:-1] if unit is not None else text
    try:
        value = float(number) * (unit or 1.0)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (seconds, or with s, m, h or d: 24h)"
        ) from None
    if value < 0 or value != value or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite duration, not negative: {text}")
    return value


def parse_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value
