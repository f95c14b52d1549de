"""The `pqfs` command. This is the error boundary for the CLI: every PqfsError / OSError becomes
one line on stderr and a non-zero exit; a traceback is printed only with PQFS_DEBUG=1."""

from __future__ import annotations

from pqfs.cli import interrupt

# isort: split
import argparse
import contextlib
import os
import shlex
import stat
import sys
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import NoReturn

from pqfs import __version__
from pqfs.cli.progress import Progress, human
from pqfs.cli.unlock import has_passphrase_env, identity_file, identity_file_bytes, passphrase
from pqfs.errors import IsADirectory, NotFound, PayloadError, PqfsError, VaultError
from pqfs.format.keys import (
    HybridIdentity,
    Recipient,
    X25519Identity,
    identity_file_text,
    parse_recipient,
)
from pqfs.runtime import memory
from pqfs.runtime.zeroize import ENV_NEW_PASSPHRASE, wipe
from pqfs.storage.base import StorageOptions
from pqfs.vault.catalog import Entry, check_appendable, normpath, put_op, shown
from pqfs.vault.vault import COMMIT_EVERY_FILES, COMMIT_EVERY_SECONDS, Vault

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70


def warn(msg: str) -> None:
    print(f"pqfs: warning: {msg}", file=sys.stderr)


def info(msg: str) -> None:
    print(msg, file=sys.stderr)


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


# ------------------------------------------------------------------------- helpers ----


def _recipients(texts: Sequence[str] | None) -> list[Recipient]:
    out = []
    for t in texts or []:
        r = parse_recipient(t)
        if not r.post_quantum:
            warn(f"{t[:16]}... is an X25519 recipient: files wrapped to it are not post-quantum")
        out.append(r)
    return out


def _storage_options(args: argparse.Namespace) -> StorageOptions:
    return StorageOptions(
        endpoint_url=getattr(args, "endpoint_url", None),
        timeout=getattr(args, "timeout", None) or StorageOptions.timeout,
        disk_cache=getattr(args, "disk_cache", None),
        disk_cache_size=getattr(args, "disk_cache_size", StorageOptions.disk_cache_size),
    )


def _open(args: argparse.Namespace, unlock: bool) -> Vault:
    v = Vault.open(args.vault, _storage_options(args))
    v.on_warning = warn  # ops of the catalog that are ignored (pqfs: warning: catalog segment..)
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


def _can_unlock(args: argparse.Namespace) -> bool:
    return bool(
        getattr(args, "identity", None)
        or getattr(args, "passphrase_file", None)
        or has_passphrase_env()
    )


def _nonneg(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if n < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return n


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
    reader = v.open_reader(path)
    fd = sys.stdout.fileno()
    try:
        for piece in reader.iter_range(offset, reader.size if length is None else length):
            _write_all(fd, piece)
    finally:
        reader.src.close()


def _write_all(fd: int, data: memoryview | bytes) -> None:
    mv = memoryview(data)
    while mv:
        n = os.write(fd, mv)
        mv = mv[n:]


# ------------------------------------------------------------------------- commands ----


def cmd_init(args: argparse.Namespace) -> int:
    extra = _recipients(args.recipient)
    pw = passphrase(args.passphrase_file, confirm=True, prompt="New vault passphrase")
    if args.classic:
        warn("--classic adds an X25519 identity: files are also wrapped to a non-post-quantum key")
    try:
        v = Vault.create(
            args.vault, pw, extra, classic=args.classic, options=_storage_options(args)
        )
    finally:
        wipe(pw)
    info(f"created vault {args.vault}")
    for r in v.recipients:
        text = r.encode()
        shown = text if len(text) <= 80 else f"{text[:24]}...{text[-12:]} (full text: pqfs info)"
        info(f"  recipient: {shown}")
    return 0


def cmd_keygen(args: argparse.Namespace) -> int:
    ident: HybridIdentity | X25519Identity = (
        X25519Identity.generate() if args.classic else HybridIdentity.generate()
    )
    _write_secret(args.output, identity_file_text([ident]))
    info(f"Public key: {ident.recipient().encode()}")
    if args.classic:
        warn("an X25519 identity is not post-quantum")
    return 0


def _walk(src: str) -> tuple[list[tuple[str, str]], list[str], int]:
    """(files as (path, relative), dirs as relative, total bytes) of a tree, sorted. Names
    that are not UTF-8 come as os.fsdecode gives them (surrogate escapes) and are stored so."""
    files: list[tuple[str, str]] = []
    dirs: list[str] = []
    total = 0
    for dirpath, dirnames, filenames in os.walk(src, onerror=_walk_error):
        dirnames.sort()
        rel = os.path.relpath(dirpath, src)
        dirs.append("" if rel == "." else rel)
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            st = os.lstat(full)
            if stat.S_ISLNK(st.st_mode):
                warn(f"skipping symbolic link {shown(full)}")
            elif not stat.S_ISREG(st.st_mode):
                warn(f"skipping special file {shown(full)}")
            else:
                files.append((full, os.path.relpath(full, src)))
                total += st.st_size
    return files, dirs, total


def _walk_error(e: OSError) -> None:
    raise e


def _sources(src: str, dest: str | None) -> tuple[str, list[tuple[str, str]], list[str], int]:
    """(vault path of SRC, files, dirs, total bytes) for `pqfs add SRC [DEST]` (see _walk)."""
    if os.path.isdir(src):
        base = normpath(dest if dest is not None else os.path.basename(os.path.abspath(src)))
        files, dirs, total = _walk(src)
    else:
        if dest is None:
            base = normpath(os.path.basename(src))
        elif dest.endswith("/"):
            base = normpath(dest + os.path.basename(src))
        else:
            base = normpath(dest)
        files, dirs, total = [(src, "")], [], os.path.getsize(src)
    if not base:
        raise VaultError("destination path is empty")
    return base, files, dirs, total


def _under(base: str, rel: str) -> str:
    return normpath(f"{base}/{rel}") if rel else base


def _check_dests(v: Vault, base: str, files: list[tuple[str, str]], dirs: list[str]) -> None:
    """Refuse, before anything is encrypted, every destination the catalog could not hold or
    (with the catalog known) that would put a file below a file or in place of a directory.
    The tree being added is itself consistent, so each is checked against the vault alone."""
    for rel in dirs:
        v.check_put(_under(base, rel), "dir")
    for _full, rel in files:
        try:
            v.check_put(_under(base, rel), "file")
        except IsADirectory as e:
            hint = "" if rel else " (to add into it, end DEST with /)"
            raise IsADirectory(f"{e}{hint}") from None


def cmd_add(args: argparse.Namespace) -> int:
    src = args.src
    if not os.path.exists(src):
        raise PqfsError(f"no such file or directory: {shown(src)}")
    extra = _recipients(args.recipient)
    v = _open(args, unlock=_can_unlock(args))
    check_appendable(v.storage)  # a tampered catalog is refused before any work
    known = {e.path: e for e in v.catalog().files()} if v.unlocked else {}
    base, files, dirs, total = _sources(src, args.dest)
    _check_dests(v, base, files, dirs)

    progress = Progress(total, "")
    ops: list[dict[str, object]] = []
    added = skipped = 0
    last_commit = time.monotonic()
    try:
        for rel in dirs:
            ops.append(put_op(v.dir_entry(os.path.join(src, rel), _under(base, rel))))
        for full, rel in files:
            dest = _under(base, rel)
            st = os.stat(full)
            old = known.get(dest)
            if old is not None and old.size == st.st_size and old.mtime_ns == st.st_mtime_ns:
                skipped += 1
                progress.update(st.st_size, shown(dest))
                continue
            progress.label = shown(dest)
            ops.append(put_op(v.add_file(full, dest, extra, progress.update)))
            added += 1
            now = time.monotonic()
            if len(ops) >= COMMIT_EVERY_FILES or now - last_commit > COMMIT_EVERY_SECONDS:
                v.commit(ops)
                ops, last_commit = [], now
    finally:
        # Whatever completed is recorded, even on Ctrl-C or an error: nothing is lost, and a
        # re-run with the identity available skips what is already in.
        v.commit(ops)
        progress.finish()
    note = f", {skipped} unchanged skipped" if skipped else ""
    info(f"added {added} file(s), {human(total)} to {args.vault}{note}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    v = _open(args, unlock=True)
    dest = args.dest if args.dest is not None else os.path.basename(args.src).removesuffix(".age")
    entry = v.import_age(args.src, dest)
    v.commit([put_op(entry)])
    info(f"imported {args.src} as {entry.path} ({human(entry.size)}, not re-encrypted)")
    return 0


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
    v = _open(args, unlock=True)
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


def cmd_cat(args: argparse.Namespace) -> int:
    _stream(_open(args, unlock=True), args.path, args.offset, args.length)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    v = _open(args, unlock=True)
    if args.out == "-":
        _stream(v, args.path)
        return 0
    if os.path.exists(args.out) and not args.force:
        raise PqfsError(f"{args.out} exists (use --force to overwrite)")
    reader = v.open_reader(args.path)
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
        reader.src.close()
        progress.finish()
    return 0


def cmd_rm(args: argparse.Namespace) -> int:
    v = _open(args, unlock=True)
    e = v.entry(args.path)
    if e.type == "dir" and not args.recursive:
        raise VaultError(f"{shown(e.path) or '/'} is a directory (use -r)")
    gone = v.remove(args.path)
    v.maybe_compact()
    info(f"removed {len([g for g in gone if g.type == 'file'])} file(s)")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    v = _open(args, unlock=True)
    failed = checked = 0
    total = 0
    for e, err in v.verify(args.path or ""):
        checked += 1
        total += e.size
        if err is not None:
            failed += 1
            where = (
                f" (chunk {err.chunk})"
                if isinstance(err, PayloadError) and err.chunk is not None
                else ""
            )
            print(f"FAILED {e.path}{where}: {err}")
    if failed:
        print(f"{failed} of {checked} file(s) failed verification")
        return EXIT_ERROR
    print(f"verified {checked} file(s), {human(total)}: every chunk authentic")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    v = _open(args, unlock=_can_unlock(args))
    for k, val in v.stats().items():
        if isinstance(val, list):
            for item in val:
                print(f"{k}: {item}")
        elif k.endswith("bytes") and isinstance(val, int):
            print(f"{k}: {val} ({human(val)})")
        else:
            print(f"{k}: {val}")
    return 0


def cmd_passwd(args: argparse.Namespace) -> int:
    v = Vault.open(args.vault, _storage_options(args))
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


def cmd_share(args: argparse.Namespace) -> int:
    recipients = _recipients(args.recipient)
    v = _open(args, unlock=True)
    e = v.share(args.path, recipients)
    info(f"{e.path}: added {len(recipients)} recipient(s); content not re-encrypted")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    v = _open(args, unlock=True)
    count, freed = v.gc()
    info(f"deleted {count} unreferenced object(s), {human(freed)} freed; catalog compacted")
    aborted = v.storage.abort_stale_uploads()
    if aborted:
        info(f"aborted {aborted} upload(s) left by interrupted adds")
    return 0


def cmd_identity(args: argparse.Namespace) -> int:
    v = _open(args, unlock=True)
    _write_secret(args.output, v.identity_text(classic_only=args.classic_only))
    return 0


# ------------------------------------------------------------------------- mount ----


def _size(text: str) -> int:
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in units and t[-1:] != "" else ""
    try:
        value = float(t[: len(t) - len(unit)] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 64M, 1G)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return int(value * units[unit])


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must not be negative: {text}")
    return value


MIN_REFRESH = 0.1  # seconds: checking the vault more often than this is a busy loop


def _refresh(text: str) -> float:
    value = _seconds(text)
    if value < MIN_REFRESH:
        raise argparse.ArgumentTypeError(f"must be at least {MIN_REFRESH}: {text}")
    return value


def _command(text: str) -> tuple[str, ...]:
    """A command line, split as a shell would split it (it is never run by a shell)."""
    try:
        argv = tuple(shlex.split(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"cannot split {text!r}: {e}") from None
    if not argv:
        raise argparse.ArgumentTypeError("empty command")
    return argv


MAX_IDLE_POLL_US = 10_000  # polling longer than this saves nothing a sleep would not


def _microseconds(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number of microseconds: {text!r}") from None
    if not 0 <= value <= MAX_IDLE_POLL_US:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_IDLE_POLL_US}: {text}")
    return value


def cmd_mount(args: argparse.Namespace) -> int:
    from pqfs.mount import daemon
    from pqfs.mount.options import MountOptions

    if args.cache_size < 4 << 20:
        raise PqfsError("--cache-size must be at least 4M")
    daemon.check_mountpoint(args.mountpoint)
    v = _open(args, unlock=True)
    if args.log_file:
        args.log_file = os.path.abspath(args.log_file)
    opts = MountOptions.for_storage(
        v.storage,
        cache_size=args.cache_size,
        key_ttl=args.key_ttl,
        direct_io=args.direct_io,
        idle_poll=args.idle_poll / 1e6,
        stall_detail=args.stall_detail,
        on_change=args.on_change or (),
        # The default is the dataclass's: the parser does not import vfs (trio) for every command.
        **({} if args.refresh is None else {"catalog_poll": args.refresh}),
    )
    mp = os.path.abspath(args.mountpoint)

    def mounted() -> None:
        if not args.foreground:
            info(f"mounted {args.vault} at {mp} (unmount: pqfs umount {mp})")

    return daemon.run(
        v, mp, opts, args.foreground, args.allow_other, args.log_file, args.debug, mounted
    )


def cmd_umount(args: argparse.Namespace) -> int:
    from pqfs.mount import daemon

    info(f"{daemon.umount(args.mountpoint, args.lazy)} {args.mountpoint}")
    return 0


def _mount_attr(mountpoint: str, name: str) -> bytes:
    """An attribute of a running pqfs mount's root (its statistics, its control socket)."""
    import errno

    from pqfs.mount import daemon

    kind = daemon.mount_type(mountpoint)
    if kind != daemon.FSTYPE:
        raise PqfsError(f"{mountpoint} is not a pqfs mount")
    try:
        return os.getxattr(mountpoint, name)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise PqfsError(
                f"{mountpoint}: the mount is stale; run: pqfs umount {mountpoint}"
            ) from None
        raise PqfsError(f"{mountpoint}: {e.strerror}") from None


def _control(mountpoint: str, command: str, secret: bytes | bytearray = b"") -> None:
    """Lock or unlock a running mount through its daemon's control socket."""
    import errno

    from pqfs.mount import control

    address = _mount_attr(mountpoint, control.XATTR_CONTROL.decode())
    answer = control.request(address, command, secret)
    if answer.code == 0:
        return
    if answer.code == errno.EACCES and command == "unlock":
        raise PqfsError("wrong passphrase")
    if answer.code == errno.EACCES and command == "unlock-identity":
        raise PqfsError("the identity file holds no identity of this vault")
    raise PqfsError(f"{mountpoint}: {answer.message or os.strerror(answer.code)}")


def cmd_lock(args: argparse.Namespace) -> int:
    _control(args.mountpoint, "lock")
    info(f"locked {args.mountpoint}: keys and decrypted data wiped; reads fail until unlock")
    return 0


def cmd_unlock(args: argparse.Namespace) -> int:
    secret, command = (
        (identity_file_bytes(args.identity), "unlock-identity")
        if args.identity
        else (passphrase(args.passphrase_file), "unlock")
    )
    try:
        _control(args.mountpoint, command, secret)
    finally:
        wipe(secret)
    info(f"unlocked {args.mountpoint}")
    return 0


STAT_LINES = [
    ("vault", "vault", "{}"),
    ("locked", "locked", "{}"),
    ("open files", "open_files", "{}"),
    ("reads", "reads", "{}"),
    ("reads decrypted inline", "reads_inline", "{}"),
    ("direct disk reads", "reads_direct", "{}"),
    ("read latency p50", "read_p50_ms", "{} ms"),
    ("read latency p99", "read_p99_ms", "{} ms"),
    ("bytes read", "bytes_read", "human"),
    ("bytes decrypted", "bytes_decrypted", "human"),
    ("chunk cache hit rate", "cache_hit_rate", "pct"),
    ("chunk cache", "cache_bytes", "human"),
    ("chunk cache budget", "cache_budget", "human"),
    ("prefetched chunks", "prefetch_chunks", "{}"),
    ("prefetch hits", "prefetch_hits", "{}"),
    ("key cache entries", "key_entries", "{}"),
    ("key cache hits", "key_hits", "{}"),
    ("key cache misses", "key_misses", "{}"),
    ("authentication failures", "auth_failures", "{}"),
    ("failed reads (storage)", "read_errors", "{}"),
    ("longest loop stall", "loop_stall_max_ms", "{} ms"),
    ("  of which on CPU", "loop_stall_max_cpu_ms", "{} ms"),
    ("  sleeps in it", "stall_detail_sleeps", "{}"),
    ("  preemptions in it", "stall_detail_preemptions", "{}"),
    ("  page faults in it", "stall_detail_faults", "{}"),
    ("  without host steal", "stall_detail_own_max_ms", "{} ms"),
    ("most CPU in one loop step", "loop_step_cpu_max_ms", "{} ms"),
    ("longest GC pause", "gc_pause_max_ms", "{} ms"),
    ("idle polls", "idle_polls", "{}"),
    ("idle polls answered", "idle_poll_hits", "{}"),
    ("time spent polling", "idle_poll_ms", "{} ms"),
    ("S3 GET requests", "s3_gets", "{}"),
    ("S3 GETs from the loop", "s3_loop_gets", "{}"),
    ("S3 bytes fetched", "s3_get_bytes", "human"),
    ("S3 retries", "s3_retries", "{}"),
    ("S3 failed requests", "s3_failures", "{}"),
    ("disk cache hits", "disk_cache_hits", "{}"),
    ("disk cache", "disk_cache_bytes", "human"),
    ("disk cache budget", "disk_cache_budget", "human"),
]


def cmd_stats(args: argparse.Namespace) -> int:
    import json

    raw = _mount_attr(args.mountpoint, "user.pqfs.stats")
    data = json.loads(raw)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for label, key, fmt in STAT_LINES:
        if key not in data and key.startswith(("s3_", "disk_cache", "stall_detail")):
            continue  # a local vault, no disk cache, or mounted without --stall-detail
        value = data.get(key)
        if value is None:
            shown = "-"
        elif fmt == "human":
            shown = human(int(value))
        elif fmt == "pct":
            shown = f"{value * 100:.1f}%"
        else:
            shown = fmt.format(value)
        print(f"{label + ':':26} {shown}")
    return 0


# ------------------------------------------------------------------------- parser ----


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="pqfs", description="Post-quantum encrypted vaults for media (age v1 format).")
    p.add_argument("--version", action="version", version=f"pqfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    sub.required = True

    def add(name: str, func: Callable[[argparse.Namespace], int], help: str) -> Parser:
        sp: Parser = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(func=func)
        return sp

    def s3_opts(sp: argparse.ArgumentParser, mount: bool = False) -> None:
        g = sp.add_argument_group("S3 (VAULT = s3://bucket/prefix; credentials as for the AWS CLI)")
        g.add_argument(
            "--endpoint-url",
            metavar="URL",
            help="S3-compatible service (default: AWS_ENDPOINT_URL, the AWS config, or AWS)",
        )
        g.add_argument(
            "--timeout",
            type=_seconds,
            default=None,
            metavar="SECONDS",
            help="give up on a storage request after this long, retries included; a mount "
            "gives up opening a file after twice this, on any vault (default: "
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
                type=_size,
                default=StorageOptions.disk_cache_size,
                metavar="SIZE",
                help="disk cache budget (default: 1G)",
            )

    def unlock_opts(sp: argparse.ArgumentParser) -> None:
        g = sp.add_argument_group("unlocking (default: prompt for the passphrase)")
        g.add_argument("--passphrase-file", metavar="FILE", help="read the passphrase from FILE")
        g.add_argument(
            "-i",
            "--identity",
            metavar="FILE",
            help="an unencrypted identity file (mode 0600) instead of the passphrase",
        )

    sp = add("init", cmd_init, "create a new vault with a fresh post-quantum identity")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
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

    sp = add("keygen", cmd_keygen, "generate an age identity (mlkem768x25519 by default)")
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE (mode 0600)")
    sp.add_argument("--classic", action="store_true", help="an X25519 identity (not post-quantum)")

    sp = add("add", cmd_add, "encrypt a file or a directory tree into the vault")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
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
    unlock_opts(sp)

    sp = add("import", cmd_import, "import an age file (no re-encryption) into the vault")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    sp.add_argument("src", metavar="AGEFILE")
    sp.add_argument("dest", metavar="DEST", nargs="?")
    unlock_opts(sp)

    sp = add("ls", cmd_ls, "list a directory of the vault")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    sp.add_argument("path", metavar="PATH", nargs="?")
    sp.add_argument("-l", "--long", action="store_true", help="mode, size and mtime")
    sp.add_argument("-R", "--recursive", action="store_true", help="the whole tree")
    unlock_opts(sp)

    sp = add("cat", cmd_cat, "write a file's plaintext (or a byte range of it) to stdout")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("--offset", type=_nonneg, default=0, metavar="N")
    sp.add_argument("--length", type=_nonneg, default=None, metavar="N")
    unlock_opts(sp)

    sp = add("get", cmd_get, "decrypt a file of the vault to OUT")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("out", metavar="OUT")
    sp.add_argument("-f", "--force", action="store_true", help="overwrite OUT")
    unlock_opts(sp)

    sp = add("rm", cmd_rm, "remove a file (or with -r a directory) from the vault")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("-r", "--recursive", action="store_true")
    unlock_opts(sp)

    sp = add("verify", cmd_verify, "authenticate every chunk; exit 1 if any file fails")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    sp.add_argument("path", metavar="PATH", nargs="?")
    unlock_opts(sp)

    sp = add("info", cmd_info, "show the vault's format, recipients and sizes")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    unlock_opts(sp)

    sp = add("passwd", cmd_passwd, "change the vault passphrase")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    sp.add_argument("--passphrase-file", metavar="FILE", help="the current passphrase")
    sp.add_argument(
        "--new-passphrase-file", metavar="FILE", help="the new passphrase (or PQFS_NEW_PASSPHRASE)"
    )

    sp = add("share", cmd_share, "add recipients to one file without re-encrypting it")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    sp.add_argument("path", metavar="PATH")
    sp.add_argument("-r", "--recipient", action="append", metavar="R", required=True)
    unlock_opts(sp)

    sp = add("gc", cmd_gc, "delete unreferenced objects and compact the catalog")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    unlock_opts(sp)

    sp = add("identity", cmd_identity, "export the vault identity (for use with age -d)")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp)
    sp.add_argument("-o", "--output", metavar="FILE", help="write to FILE (mode 0600)")
    sp.add_argument(
        "--classic-only",
        action="store_true",
        help="only the X25519 identity (for age releases without post-quantum support)",
    )
    unlock_opts(sp)

    sp = add("mount", cmd_mount, "mount the vault read-only as plain files (FUSE)")
    sp.add_argument("vault", metavar="VAULT")
    s3_opts(sp, mount=True)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (systemd, debugging)",
    )
    sp.add_argument(
        "--cache-size",
        type=_size,
        default=64 << 20,
        metavar="SIZE",
        help="memory for decrypted chunks, whatever the number of open files (default: 64M)",
    )
    sp.add_argument(
        "--key-ttl",
        type=_seconds,
        default=300.0,
        metavar="SECONDS",
        help="keep unwrapped file keys this long after last use; 0: only while open (default: 300)",
    )
    cache_mode = sp.add_mutually_exclusive_group()
    cache_mode.add_argument(
        "--direct-io",
        dest="direct_io",
        action="store_true",
        default=True,
        help="keep decrypted pages out of the kernel's page cache: plaintext stays only in the "
        "wiped --cache-size (the default; programs that mmap files MAP_SHARED get ENODEV)",
    )
    cache_mode.add_argument(
        "--page-cache",
        dest="direct_io",
        action="store_false",
        help="let the kernel cache decrypted pages, for programs that mmap files shared "
        "(MAP_SHARED, as Python's read-only mmap does), which otherwise get ENODEV, 'No such "
        "device' (plaintext then also lives in kernel memory until evicted or pqfs lock)",
    )
    sp.add_argument(
        "--idle-poll",
        type=_microseconds,
        default=200,
        metavar="MICROSECONDS",
        help="after answering a read, and while a disk read is in flight, poll this long "
        "before sleeping: spares the wake-up of an idle CPU (20-40 us in a VM) on random "
        "reads, for that much CPU time (default: 200; 0: never)",
    )
    sp.add_argument(
        "--stall-detail",
        action="store_true",
        help="for the longest event-loop stall, also count the loop thread's sleeps, "
        "preemptions and page faults, and report the longest stall with the time the host "
        "took the CPU away taken out (pqfs stats); costs ~0.4 us per loop step",
    )
    sp.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users (a media server) read the mount (needs user_allow_other unless root)",
    )
    sp.add_argument(
        "--log-file", metavar="FILE", help="log here (default: stderr with -f, else syslog)"
    )
    sp.add_argument(
        "--refresh",
        type=_refresh,
        default=None,
        metavar="SECONDS",
        help="how often to check the vault for files added or removed elsewhere "
        "(default: 10)",
    )
    sp.add_argument(
        "--on-change",
        type=_command,
        default=None,
        metavar="CMD",
        help="after a check finds changes, run CMD (split as by a shell, never run by one) "
        "with the changed paths, relative to the mount point, as arguments: FUSE raises no "
        "inotify events for them, so this is how a media server learns of new files",
    )
    sp.add_argument("--debug", action="store_true", help="verbose logging")
    unlock_opts(sp)

    sp = add("umount", cmd_umount, "unmount a pqfs mount (also clears a stale one)")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument(
        "-z", "--lazy", action="store_true", help="detach now even if files are still open"
    )

    sp = add("lock", cmd_lock, "wipe keys and decrypted data of a mount; reads fail until unlock")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")

    sp = add("unlock", cmd_unlock, "unlock a locked mount")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    unlock_opts(sp)

    sp = add("stats", cmd_stats, "live statistics of a mount")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    debug = bool(os.environ.get("PQFS_DEBUG"))
    try:
        # Every command may hold the identity, a passphrase or plaintext: none dumps core.
        memory.harden_process(for_good=False)  # the mount's daemon: for good (daemon.run)
        args = build_parser().parse_args(argv)
        rc: int = args.func(args)
        return rc
    except PqfsError as e:
        if debug:
            raise
        print(f"pqfs: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("pqfs: interrupted", file=sys.stderr)
        return interrupt.EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`pqfs cat ... | head`): not an error worth a message.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        if debug:
            raise
        where = f": {e.filename}" if e.filename else ""
        print(f"pqfs: error: {e.strerror or e}{where}", file=sys.stderr)
        return EXIT_ERROR
    except Exception as e:  # the last line of defence: never a traceback for a user
        if debug:
            raise
        print(
            f"pqfs: internal error: {type(e).__name__} (rerun with PQFS_DEBUG=1)", file=sys.stderr
        )
        return EXIT_INTERNAL
    except BaseExceptionGroup as e:  # trio's, around a KeyboardInterrupt in a task
        if debug or e.subgroup(KeyboardInterrupt) is None:
            raise
        print("pqfs: interrupted", file=sys.stderr)
        return interrupt.EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
