"""The commands on a vault's trust (writer, trust, upgrade), each followed by its parser: who
may append to the vault, what this host has pinned of it, and bringing a version-1 vault to
signed version 2. What they do to the vault is in pqfs/vault/ (writers.py, trust.py,
upgrade.py)."""

from __future__ import annotations

import argparse
import os
from datetime import UTC, datetime

from pqfs.cli.args import (
    Subparsers,
    can_unlock,
    open_vault,
    storage_options,
    subcommand,
    unlock_options,
    vault_arg,
)
from pqfs.cli.messages import info, warn
from pqfs.cli.progress import Progress, human
from pqfs.cli.unlock import VAULT_ID_LINE, passphrase
from pqfs.errors import PqfsError
from pqfs.runtime.zeroize import wipe
from pqfs.storage import open_storage
from pqfs.vault import rekey as rekey_mod
from pqfs.vault import trust, upgrade, writers
from pqfs.vault.catalog import shown
from pqfs.vault.signing import SigningKey

# ------------------------------------------------------------------ writer ----


def cmd_writer_add(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=True)
    writers.check_new(v, args.name)
    key = SigningKey.generate()
    # The key file first (never over an existing file), then the config that authorizes it:
    # a failure in between leaves an unauthorized key file, never an authorized lost key.
    try:
        fd = os.open(args.output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PqfsError(f"{args.output} exists; refusing to overwrite a writer key") from None
    try:
        when = datetime.now(UTC).strftime("%Y-%m-%d")
        head = (
            f"# pqfs writer key {args.name!r}, created {when}: keep it secret, on its host only\n"
        )
        os.write(fd, (head + f"{VAULT_ID_LINE.decode()}{v.config.vault_id}\n").encode())
        os.write(fd, key.encode().encode() + b"\n")
        os.fsync(fd)
        os.close(fd)
        fd = -1
        writers.authorize(v, args.name, key.verify_key)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        os.unlink(args.output)
        raise
    finally:
        key.wipe()
    info(f"added writer {args.name} ({key.id}) to {shown(args.vault)}; its key is in {args.output}")
    info(f"on the ingest host: pqfs add --writer-key {os.path.basename(args.output)} VAULT SRC")
    return 0


def cmd_writer_rm(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=True)
    gone = writers.remove(v, args.name)
    info(
        f"revoked writer {gone.name} ({gone.key.id}): nothing it signs is read any more; what it "
        "added before is kept (remove it with pqfs rm)"
    )
    return 0


def cmd_writer_ls(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=can_unlock(args))
    if not v.config.signed:
        raise PqfsError("a version 1 vault has no writers (run: pqfs upgrade VAULT)")
    for w in v.config.writers:
        print(f"{w.name} {w.key.id}")
    return 0


def parse_writer(sub: Subparsers) -> None:
    sp = subcommand(sub, "writer", _need_action, "authorize or revoke ingest hosts' writer keys")
    acts = sp.add_subparsers(dest="action", metavar="ACTION", parser_class=type(sp))
    add = subcommand(acts, "add", cmd_writer_add, "authorize a new writer key, written to -o FILE")
    vault_arg(add)
    add.add_argument("name", metavar="NAME", help="what to call the host (letters, digits, . _ -)")
    add.add_argument("-o", "--output", metavar="FILE", required=True, help="the new key (0600)")
    unlock_options(add)
    rm = subcommand(acts, "rm", cmd_writer_rm, "revoke a writer: nothing it signs is read again")
    vault_arg(rm)
    rm.add_argument("name", metavar="NAME")
    unlock_options(rm)
    ls = subcommand(acts, "ls", cmd_writer_ls, "list the writers (name and key id)")
    vault_arg(ls)


def _need_action(args: argparse.Namespace) -> int:
    raise PqfsError("pqfs writer needs an action: add, rm or ls (see pqfs writer --help)")


# ------------------------------------------------------------------ trust ----


def cmd_trust(args: argparse.Namespace) -> int:
    location = open_storage(args.vault, storage_options(args)).describe()
    if args.reset:
        old = trust.reset(location)
        info(
            f"forgot what this host knew of {shown(args.vault)} (it had seen catalog segment "
            f"{old.seq}, config generation {old.generation}); its next use pins it again"
        )
        if not args.vault_id:
            return 0
    v = open_vault(args, unlock=can_unlock(args))
    if v.unlocked:
        v.read_catalog()  # pins the catalog's head too
    pin = trust.load(location)
    print(f"location: {pin.location}")
    print(f"vault id: {pin.vault_id or '(none: a version 1 vault)'}")
    print(f"config generation: {pin.generation}")
    print(f"catalog segment: {pin.seq}")
    return 0


def parse_trust(sub: Subparsers) -> None:
    sp = subcommand(
        sub, "trust", cmd_trust, "show (or pin, or forget) what this host trusts of a vault"
    )
    vault_arg(sp)
    sp.add_argument(
        "--reset",
        action="store_true",
        help="forget this host's pins (after restoring the vault from a backup on purpose)",
    )
    unlock_options(sp)


# ------------------------------------------------------------------ rekey ----


def cmd_rekey(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=False)
    pw = passphrase(args.passphrase_file, prompt="Vault passphrase")
    try:
        v.unlock(pw)
        in_progress = bool(rekey_mod.split(v.held_identities())[1])
        total = sum(e.size for e in v.catalog().files()) if not in_progress else 0
        progress = Progress(total, "rekey")
        try:
            done = rekey_mod.rekey(v, pw, progress.update)
        finally:
            progress.finish()
    finally:
        wipe(pw)
    again = " (an interrupted rekey, finished)" if done.resumed else ""
    info(
        f"rekeyed {shown(args.vault)}{again}: {done.files} file(s) rewrapped to the new identity, "
        f"{human(done.payload_bytes)} of content copied unchanged, {done.deleted} old object(s) "
        "and segment(s) deleted"
    )
    info(f"  vault id: {v.config.vault_id} (hosts that pinned the old one follow the rotation)")
    info("  the old identity no longer opens anything: export the new one (pqfs identity)")
    return 0


def parse_rekey(sub: Subparsers) -> None:
    sp = subcommand(
        sub, "rekey", cmd_rekey, "give the vault a new identity (no content re-encrypted)"
    )
    vault_arg(sp)
    sp.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")


# ------------------------------------------------------------------ upgrade ----


def cmd_upgrade(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=True, legacy_warning=False)
    if upgrade.upgrade(v):
        info(
            f"upgraded {shown(args.vault)} to format version 2: its config and catalog are "
            f"signed; vault id {v.config.vault_id}"
        )
    else:
        warn(f"{shown(args.vault)} is already version 2; nothing to do")
    return 0


def parse_upgrade(sub: Subparsers) -> None:
    sp = subcommand(sub, "upgrade", cmd_upgrade, "turn a version 1 vault into a signed version 2")
    vault_arg(sp)
    unlock_options(sp)


PARSERS = (parse_writer, parse_trust, parse_rekey, parse_upgrade)
