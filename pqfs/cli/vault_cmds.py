"""The commands on a vault itself (init keygen add import ls cat get rm verify info passwd share
gc identity), each followed by its parser. They parse, prompt, print and call the vault; what
they do to it is in pqfs/vault/."""

from __future__ import annotations

import argparse
import contextlib
import os
import stat
import sys
from datetime import UTC, datetime, timedelta

from pqfs.cli.args import (
    Subparsers,
    can_unlock,
    open_vault,
    parse_duration,
    parse_nonneg,
    recipients,
    s3_options,
    storage_options,
    subcommand,
    unlock_options,
    vault_arg,
    writer_options,
)
from pqfs.cli.messages import info, warn
from pqfs.cli.progress import Progress, human
from pqfs.cli.unlock import passphrase
from pqfs.errors import NotFound, PayloadError, PqfsError, VaultError
from pqfs.format.keys import HybridIdentity, X25519Identity, identity_file_text
from pqfs.runtime.zeroize import ENV_NEW_PASSPHRASE, wipe
from pqfs.vault import ingest, maintenance
from pqfs.vault.catalog import normpath, shown
from pqfs.vault.objects import open_reader
from pqfs.vault.schema import Entry
from pqfs.vault.vault import Vault

# ------------------------------------------------------------------ helpers ----


def _write_secret(output: str | None, text: str) -> None:
    """An identity to stdout, or to a new file created mode 0600 (never over an existing one)."""
    if not output or output == "-":
        sys.stdout.write(text)
        return
    try:
        fd = os.open(output, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise PqfsError(f"{output} exists; refusing to overwrite an identity") from None
    with os.fdopen(fd, "w") as f:
        f.write(text)


def _stream(v: Vault, path: str, offset: int = 0, length: int | None = None) -> None:
    fd = sys.stdout.fileno()
    with open_reader(v, path) as reader:
        for piece in reader.iter_range(offset, reader.size if length is None else length):
            _write_all(fd, piece)


def _write_all(fd: int, data: memoryview | bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


# ------------------------------------------------------------------ init, keygen ----


def cmd_init(args: argparse.Namespace) -> int:
    extra = recipients(args.recipient)
    pw = passphrase(args.passphrase_file, confirm=True, prompt="New vault passphrase")
    if args.classic:
        warn("--classic adds an X25519 identity: files are also wrapped to a non-post-quantum key")
    try:
        v = Vault.create(args.vault, pw, extra, classic=args.classic, options=storage_options(args))
    finally:
        wipe(pw)
    info(f"created vault {shown(args.vault)}")
    info(f"  vault id: {v.config.vault_id} (ingest hosts: --vault-id, or a writer key)")
    for r in v.recipients:
        text = r.encode()
        short = text if len(text) <= 80 else f"{text[:24]}...{text[-12:]} (full text: pqfs info)"
        info(f"  recipient: {short}")
    return 0


def parse_init(sub: Subparsers) -> None:
    sp = subcommand(sub, "init", cmd_init, "create a new vault with a fresh post-quantum identity")
    sp.add_argument("vault", metavar="VAULT")
    s3_options(sp)
    sp.add_argument(
        "-r",
        "--recipient",
        action="append",
        metavar="R",
        help="also encrypt every file to this age recipient (repeatable)",
    )
    sp.add_argument(
        "--classic",
        action="store_true",
        help="also create an X25519 identity, so plain age (without PQ) can open files",
    )
    sp.add_argument("--passphrase-file", metavar="FILE", help="read the new passphrase from FILE")


def cmd_keygen(args: argparse.Namespace) -> int:
    ident: HybridIdentity | X25519Identity = (
        X25519Identity.generate() if args.classic else HybridIdentity.generate()
    )
    _write_secret(args.output, identity_file_text([ident]))
    info(f"Public key: {ident.recipient().encode()}")
    if args.classic:
        warn("an X25519 identity is not post-quantum")
    return 0


def parse_keygen(sub: Subparsers) -> None:
    sp = subcommand(
        sub, "keygen", cmd_keygen, "generate an age identity (mlkem768x25519 by default)"
    )
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE (mode 0600)")
    sp.add_argument("--classic", action="store_true", help="an X25519 identity (not post-quantum)")


# ------------------------------------------------------------------ add, import ----


def cmd_add(args: argparse.Namespace) -> int:
    src = args.src
    if not os.path.exists(src):
        raise PqfsError(f"no such file or directory: {shown(src)}")
    extra = recipients(args.recipient)
    v = open_vault(args, unlock=can_unlock(args))
    todo = ingest.plan(v, src, args.dest, on_skip=_skipping)
    progress = Progress(todo.total, "")
    try:
        done = ingest.Ingest(v, todo, extra).run(lambda dest, n: progress.update(n, shown(dest)))
    finally:
        progress.finish()
    note = f", {done.unchanged} unchanged skipped" if done.unchanged else ""
    info(f"added {done.added} file(s), {human(todo.total)} to {shown(args.vault)}{note}")
    return 0


def _skipping(s: ingest.Skip) -> None:
    warn(f"skipping {s.kind} {shown(s.path)}")


def parse_add(sub: Subparsers) -> None:
    sp = subcommand(sub, "add", cmd_add, "encrypt a file or a directory tree into the vault")
    vault_arg(sp)
    sp.add_argument("src", metavar="SRC")
    sp.add_argument(
        "dest", metavar="DEST", nargs="?", help="path in the vault (default: the name of SRC)"
    )
    sp.add_argument(
        "-r",
        "--recipient",
        action="append",
        metavar="R",
        help="also encrypt to this age recipient (repeatable)",
    )
    unlock_options(sp)
    writer_options(sp)


def cmd_import(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=True)
    dest = args.dest if args.dest is not None else os.path.basename(args.src).removesuffix(".age")
    entry = maintenance.import_age(v, args.src, dest)
    info(
        f"imported {shown(args.src)} as {shown(entry.path)} ({human(entry.size)}, not re-encrypted)"
    )
    return 0


def parse_import(sub: Subparsers) -> None:
    sp = subcommand(
        sub, "import", cmd_import, "import an age file (no re-encryption) into the vault"
    )
    vault_arg(sp)
    sp.add_argument("src", metavar="AGEFILE")
    sp.add_argument("dest", metavar="DEST", nargs="?")
    unlock_options(sp)


# ------------------------------------------------------------------ ls, cat, get ----

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def _fmt_entry(e: Entry, long: bool, name: str | None = None) -> str:
    """One line of `pqfs ls`. The name is escaped as `ls -b` does (catalog.shown): a name in
    the vault can carry control characters, an escape sequence for the terminal."""
    if name is None:
        name = e.path.rsplit("/", 1)[-1]
    name = shown(name) + ("/" if e.type == "dir" else "")
    if not long:
        return name
    mode = stat.filemode((stat.S_IFDIR if e.type == "dir" else stat.S_IFREG) | e.mode)
    # Arithmetic, not fromtimestamp: any int64 of nanoseconds (years 1677-2262) is a date.
    when = (EPOCH + timedelta(microseconds=e.mtime_ns // 1000)).strftime("%Y-%m-%d %H:%M")
    return f"{mode} {e.size:>14} {when} {name}"


def cmd_ls(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=True)
    cat = v.catalog()
    path = normpath(args.path or "")
    e = cat.get(path)
    if e is None:
        raise NotFound(f"no such file in the vault: {shown(path)}")
    if e.type == "file":
        lines = [_fmt_entry(e, args.long)]
    elif args.recursive:
        prefix = path + "/" if path else ""
        lines = [_fmt_entry(x, args.long, x.path[len(prefix) :]) for x in cat.walk(path)]
    else:
        lines = [_fmt_entry(x, args.long) for x in cat.listdir(path)]
    if lines:
        sys.stdout.write("\n".join(lines) + "\n")
    return 0


def parse_ls(sub: Subparsers) -> None:
    sp = subcommand(sub, "ls", cmd_ls, "list a directory of the vault")
    vault_arg(sp)
    sp.add_argument("path", metavar="PATH", nargs="?")
    sp.add_argument("-l", "--long", action="store_true", help="mode, size and mtime")
    sp.add_argument("-R", "--recursive", action="store_true", help="the whole tree")
    unlock_options(sp)


def cmd_cat(args: argparse.Namespace) -> int:
    _stream(open_vault(args, unlock=True), args.path, args.offset, args.length)
    return 0


def parse_cat(sub: Subparsers) -> None:
    sp = subcommand(
        sub, "cat", cmd_cat, "write a file's plaintext (or a byte range of it) to stdout"
    )
    vault_arg(sp)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("--offset", type=parse_nonneg, default=0, metavar="N")
    sp.add_argument("--length", type=parse_nonneg, default=None, metavar="N")
    unlock_options(sp)


def cmd_get(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=True)
    if args.out == "-":
        _stream(v, args.path)
        return 0
    if os.path.exists(args.out) and not args.force:
        raise PqfsError(f"{args.out} exists (use --force to overwrite)")
    with open_reader(v, args.path) as reader:
        tmp = f"{args.out}.pqfs-partial-{os.getpid()}"
        progress = Progress(reader.size, args.path)
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                for piece in reader.iter_range(0, reader.size):
                    _write_all(fd, piece)
                    progress.update(len(piece))
                os.fsync(fd)
            finally:
                os.close(fd)
            e = v.entry(args.path)
            os.chmod(tmp, e.mode)
            os.utime(tmp, ns=(e.mtime_ns, e.mtime_ns))
            os.replace(tmp, args.out)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        finally:
            progress.finish()
    return 0


def parse_get(sub: Subparsers) -> None:
    sp = subcommand(sub, "get", cmd_get, "decrypt a file of the vault to OUT")
    vault_arg(sp)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("out", metavar="OUT")
    sp.add_argument("-f", "--force", action="store_true", help="overwrite OUT")
    unlock_options(sp)


# ------------------------------------------------------------------ rm, verify, info ----


def cmd_rm(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=True)
    e = v.entry(args.path)
    if e.type == "dir" and not args.recursive:
        raise VaultError(f"{shown(e.path) or '/'} is a directory (use -r)")
    gone = maintenance.remove(v, args.path)
    maintenance.maybe_compact(v)
    info(f"removed {len([g for g in gone if g.type == 'file'])} file(s)")
    return 0


def parse_rm(sub: Subparsers) -> None:
    sp = subcommand(sub, "rm", cmd_rm, "remove a file (or with -r a directory) from the vault")
    vault_arg(sp)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("-r", "--recursive", action="store_true")
    unlock_options(sp)


def cmd_verify(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=True)
    failed = checked = 0
    total = 0
    for e, err in maintenance.verify(v, args.path or ""):
        checked += 1
        total += e.size
        if err is not None:
            failed += 1
            where = (
                f" (chunk {err.chunk})"
                if isinstance(err, PayloadError) and err.chunk is not None
                else ""
            )
            print(f"FAILED {shown(e.path)}{where}: {err}")
    if failed:  # the FAILED lines are the output; the verdict is the command's one error line
        raise PqfsError(f"{failed} of {checked} file(s) failed verification")
    forged = v.catalog().unverified
    if forged:
        raise PqfsError(
            f"verified {checked} file(s), but catalog segment(s) {', '.join(map(str, forged))} "
            "are signed by no one the vault authorizes: forged, or by a revoked writer (their "
            "ops were ignored; pqfs gc removes them)"
        )
    print(f"verified {checked} file(s), {human(total)}: every chunk authentic")
    return 0


def parse_verify(sub: Subparsers) -> None:
    sp = subcommand(sub, "verify", cmd_verify, "authenticate every chunk; exit 1 if any file fails")
    vault_arg(sp)
    sp.add_argument("path", metavar="PATH", nargs="?")
    unlock_options(sp)


def cmd_info(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=can_unlock(args))
    for k, val in v.stats().items():
        if isinstance(val, list):
            for item in val:
                print(f"{k}: {item}")
        elif k.endswith("bytes") and isinstance(val, int):
            print(f"{k}: {val} ({human(val)})")
        else:
            print(f"{k}: {val}")
    return 0


def parse_info(sub: Subparsers) -> None:
    sp = subcommand(sub, "info", cmd_info, "show the vault's format, recipients and sizes")
    vault_arg(sp)
    unlock_options(sp)


# ------------------------------------------------------------------ keys and space ----


def cmd_passwd(args: argparse.Namespace) -> int:
    v = Vault.open(args.vault, storage_options(args))
    pw = passphrase(args.passphrase_file, prompt="Current passphrase")
    try:
        v.unlock(pw)
    finally:
        wipe(pw)
    new = passphrase(
        args.new_passphrase_file, env=ENV_NEW_PASSPHRASE, confirm=True, prompt="New passphrase"
    )
    try:
        v.passwd(new)
    finally:
        wipe(new)
    info("passphrase changed")
    return 0


def parse_passwd(sub: Subparsers) -> None:
    sp = subcommand(sub, "passwd", cmd_passwd, "change the vault passphrase")
    vault_arg(sp)
    sp.add_argument("--passphrase-file", metavar="FILE", help="the current passphrase")
    sp.add_argument(
        "--new-passphrase-file", metavar="FILE", help="the new passphrase (or PQFS_NEW_PASSPHRASE)"
    )


def cmd_share(args: argparse.Namespace) -> int:
    extra = recipients(args.recipient)
    v = open_vault(args, unlock=True)
    e = maintenance.share(v, args.path, extra)
    info(f"{shown(e.path)}: added {len(extra)} recipient(s); content not re-encrypted")
    return 0


def parse_share(sub: Subparsers) -> None:
    sp = subcommand(sub, "share", cmd_share, "add recipients to one file without re-encrypting it")
    vault_arg(sp)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("-r", "--recipient", action="append", metavar="R", required=True)
    unlock_options(sp)


def cmd_unshare(args: argparse.Namespace) -> int:
    gone = recipients(args.recipient)
    v = open_vault(args, unlock=True)
    done = maintenance.unshare(v, args.path, gone, reencrypt=args.reencrypt)
    for r in done.unrecorded:
        warn(f"{r[:16]}... was not recorded as a share of this file; any stanza for it is gone")
    name = shown(done.entry.path)
    if done.reencrypted:
        info(f"{name}: {len(gone)} recipient(s) removed; content encrypted again under a new key")
    else:
        info(
            f"{name}: {len(gone)} recipient(s) removed; the content was not re-encrypted, so "
            "whoever read its file key before can still decrypt it from the store (to stop "
            "that too: --reencrypt)"
        )
    return 0


def parse_unshare(sub: Subparsers) -> None:
    sp = subcommand(sub, "unshare", cmd_unshare, "take recipients' access to one file away")
    vault_arg(sp)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("-r", "--recipient", action="append", metavar="R", required=True)
    sp.add_argument(
        "--reencrypt",
        action="store_true",
        help="a new object under a new file key, so that not even a key they kept opens it",
    )
    unlock_options(sp)


def _span(seconds: float) -> str:
    for unit, size, least in (("d", 86400, 2 * 86400), ("h", 3600, 3600), ("min", 60, 60)):
        if seconds >= least and seconds % size == 0:  # (24 h reads better than 1 d)
            return f"{seconds // size:g} {unit}"
    return f"{seconds:g} s"


def cmd_gc(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=True)
    done = maintenance.gc(v, force=args.force, dry_run=args.dry_run, grace=args.grace)
    n, freed = len(done.doomed), human(done.freed)
    if args.dry_run:
        for key, size in done.doomed:
            print(f"{key} {size}")
        note = f" (of {done.total}: most of the vault, so gc needs --force)" if done.mass else ""
        info(f"would delete {n} unreferenced object(s), {freed}{note}")
    else:
        info(f"deleted {n} unreferenced object(s), {freed} freed; catalog compacted")
    if done.young:
        info(
            f"kept {done.young} unreferenced object(s) written in the last {_span(done.grace)}: "
            "an add or a mount elsewhere may not have recorded them yet (--grace 0 deletes them)"
        )
    if args.dry_run:
        return 0
    aborted = v.storage.abort_stale_uploads(args.grace)
    if aborted:
        info(f"cleaned up {aborted} upload(s) left by interrupted writes")
    return 0


def parse_gc(sub: Subparsers) -> None:
    sp = subcommand(sub, "gc", cmd_gc, "delete unreferenced objects and compact the catalog")
    vault_arg(sp)
    sp.add_argument(
        "-n", "--dry-run", action="store_true", help="list what would be deleted; change nothing"
    )
    sp.add_argument(
        "--force", action="store_true", help="delete even when that is most of the vault's objects"
    )
    sp.add_argument(
        "--grace",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="keep unreferenced objects written less than this long ago: another host's add "
        "writes its objects before the catalog names them (default: 24h; 0: delete them too)",
    )
    unlock_options(sp)


def cmd_identity(args: argparse.Namespace) -> int:
    v = open_vault(args, unlock=True)
    _write_secret(args.output, v.identity_text(classic_only=args.classic_only))
    return 0


def parse_identity(sub: Subparsers) -> None:
    sp = subcommand(
        sub, "identity", cmd_identity, "export the vault identity (for use with age -d)"
    )
    vault_arg(sp)
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE (mode 0600)")
    sp.add_argument(
        "--classic-only",
        action="store_true",
        help="only the X25519 identity (for age releases without post-quantum support)",
    )
    unlock_options(sp)


# In `pqfs --help` order.
PARSERS = (
    parse_init,
    parse_keygen,
    parse_add,
    parse_import,
    parse_ls,
    parse_cat,
    parse_get,
    parse_rm,
    parse_verify,
    parse_info,
    parse_passwd,
    parse_share,
    parse_unshare,
    parse_gc,
    parse_identity,
)
