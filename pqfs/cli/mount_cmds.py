"""The commands on a mount (mount umount lock unlock stats), each followed by its parser.

The daemon and everything that imports trio or pyfuse3 are imported only when a command
runs: parsing any command line stays as fast as the vault commands need.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import shlex

from pqfs.cli.args import (
    Subparsers,
    open_vault,
    parse_seconds,
    parse_size,
    s3_options,
    size_text,
    subcommand,
    unlock_options,
    vault_id_option,
)
from pqfs.cli.messages import Hinted, info
from pqfs.cli.progress import human
from pqfs.cli.unlock import identity_file_bytes, passphrase
from pqfs.errors import PqfsError
from pqfs.mount import client
from pqfs.mount.options import MountOptions
from pqfs.runtime import zeroize
from pqfs.runtime.zeroize import wipe

MIN_REFRESH = 0.1  # seconds: checking the vault more often than this is a busy loop
MAX_IDLE_POLL_US = 10_000  # polling longer than this saves nothing a sleep would not
IDLE_POLL_US = round(MountOptions.idle_poll * 1e6)  # the default, in --idle-poll's unit


def _refresh(text: str) -> float:
    value = parse_seconds(text)
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


def _whole(text: str, most: int, what: str) -> int:
    """A whole number from 0 to `most` (`what` it counts, for the error)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number{what}: {text!r}") from None
    if not 0 <= value <= most:
        raise argparse.ArgumentTypeError(f"must be between 0 and {most}: {text}")
    return value


def _microseconds(text: str) -> int:
    return _whole(text, MAX_IDLE_POLL_US, " of microseconds")


def _id(text: str) -> int:
    return _whole(text, 2**32 - 2, " (a user or group id)")


def _umask(text: str) -> int:
    try:
        value = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mask: {text!r}") from None
    if not 0 <= value <= 0o777:
        raise argparse.ArgumentTypeError(f"must be between 000 and 777: {text}")
    return value


MAX_OPEN_AHEAD = 256  # each file opened ahead holds a descriptor (the soft limit: 1024)


def _count(text: str) -> int:
    return _whole(text, MAX_OPEN_AHEAD, "")


# ------------------------------------------------------------------ mount, umount ----


def cmd_mount(args: argparse.Namespace) -> int:
    from pqfs.mount import daemon

    if args.cache_size < MountOptions.MIN_CACHE:  # before the passphrase is asked for
        raise PqfsError(f"--cache-size must be at least {size_text(MountOptions.MIN_CACHE)}")
    daemon.check_mountpoint(args.mountpoint)
    write_cache_size = None if args.read_only else _write_cache(args)
    v = open_vault(args, unlock=True)
    zeroize.discard_env()  # the daemon keeps no passphrase, however it was unlocked
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
        catalog_poll=args.refresh,
        large_blksize_from=args.large_blksize_from,
        open_ahead=args.open_ahead,
        read_only=args.read_only,
        write_buffer=args.write_buffer,
        write_cache=os.path.abspath(args.write_cache),
        write_cache_size=MountOptions.write_cache_size
        if write_cache_size is None
        else write_cache_size,
        commit_delay=args.commit_delay,
        uid=args.uid,
        gid=args.gid,
        umask=args.umask,
    )
    mp = os.path.abspath(args.mountpoint)

    def mounted() -> None:
        if not args.foreground:
            info(f"mounted {args.vault} at {mp} (unmount: pqfs umount {mp})")

    return daemon.run(
        v,
        mp,
        opts,
        args.foreground,
        allow_other=args.allow_other,
        log_file=args.log_file,
        debug=args.debug,
        on_mounted=mounted,
    )


def _write_cache(args: argparse.Namespace) -> int:
    """The write cache's bound, checked before the passphrase is asked for: the directory
    must take unlinked files (O_TMPFILE); by default min(20 GiB, half its free space)."""
    path = args.write_cache
    try:
        os.close(os.open(path, os.O_TMPFILE | os.O_RDWR, 0o600))
        st = os.statvfs(path)
    except OSError as e:
        raise PqfsError(
            f"--write-cache {path}: {e.strerror} (a directory where unlinked files can be made)"
        ) from None
    if args.write_cache_size is not None:
        return int(args.write_cache_size)
    return min(MountOptions.write_cache_size, st.f_bavail * st.f_frsize // 2)


def parse_mount(sub: Subparsers) -> None:
    sp = subcommand(sub, "mount", cmd_mount, "mount the vault as plain files (FUSE)")
    sp.add_argument("vault", metavar="VAULT")
    s3_options(sp, mount=True)
    vault_id_option(sp)
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument(
        "-f",
        "--foreground",
        action="store_true",
        help="stay in the foreground (systemd, debugging)",
    )
    sp.add_argument(
        "--cache-size",
        type=parse_size,
        default=MountOptions.cache_size,
        metavar="SIZE",
        help="memory for decrypted chunks, whatever the number of open files (default: "
        f"{size_text(MountOptions.cache_size)})",
    )
    sp.add_argument(
        "--key-ttl",
        type=parse_seconds,
        default=MountOptions.key_ttl,
        metavar="SECONDS",
        help="keep unwrapped file keys this long after last use; 0: only while open (default: "
        f"{MountOptions.key_ttl:g})",
    )
    cache_mode = sp.add_mutually_exclusive_group()
    cache_mode.add_argument(
        "--direct-io",
        dest="direct_io",
        action="store_true",
        default=MountOptions.direct_io,
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
        default=IDLE_POLL_US,
        metavar="MICROSECONDS",
        help="after answering a read, and while a disk read is in flight, poll this long "
        "before sleeping: spares the wake-up of an idle CPU (20-40 us in a VM) on random "
        f"reads, for that much CPU time (default: {IDLE_POLL_US}; 0: never)",
    )
    sp.add_argument(
        "--large-blksize-from",
        type=parse_size,
        default=MountOptions.large_blksize_from,
        metavar="SIZE",
        help="files at least this large report a 1 MiB block size, so that cp reads them in "
        "1 MiB requests; smaller ones 128 KiB, what buffered readers then read at each seek "
        f"(default: {size_text(MountOptions.large_blksize_from)})",
    )
    sp.add_argument(
        "--open-ahead",
        type=_count,
        default=MountOptions.open_ahead,
        metavar="N",
        help="while files of a directory are opened one after another (a media server's "
        "library scan), open the next N in the background, so that each open waits for "
        f"nothing (default: {MountOptions.open_ahead}; 0: never; off with --key-ttl 0)",
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
        help="let other users (a media server) use the mount (needs user_allow_other unless root)",
    )
    sp.add_argument(
        "--uid",
        type=_id,
        default=-1,
        metavar="UID",
        help="show files as owned by this user (with --allow-other: a media server's account, "
        "so that it may write; default: who mounted)",
    )
    sp.add_argument("--gid", type=_id, default=-1, metavar="GID", help="likewise, the group")
    sp.add_argument(
        "--umask",
        type=_umask,
        default=-1,
        metavar="OCTAL",
        help="clear these permission bits from every mode shown (e.g. 007: nothing for others)",
    )
    sp.add_argument(
        "--log-file", metavar="FILE", help="log here (default: stderr with -f, else syslog)"
    )
    sp.add_argument(
        "--refresh",
        type=_refresh,
        default=MountOptions.catalog_poll,
        metavar="SECONDS",
        help="how often to check the vault for files added or removed elsewhere "
        f"(default: {MountOptions.catalog_poll:g})",
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
    sp.add_argument(
        "--read-only",
        action="store_true",
        help="refuse every change (the kernel mount is ro)",
    )
    sp.add_argument(
        "--write-buffer",
        type=parse_size,
        default=MountOptions.write_buffer,
        metavar="SIZE",
        help="memory for written data not yet committed, wiped once it is (default: "
        f"{size_text(MountOptions.write_buffer)}; files past "
        f"{size_text(MountOptions.write_buffer_file)} go to --write-cache)",
    )
    sp.add_argument(
        "--write-cache",
        default=MountOptions.write_cache,
        metavar="DIR",
        help="where larger written files wait for their commit, encrypted under a key only "
        f"the daemon holds, in files that have no name (default: {MountOptions.write_cache})",
    )
    sp.add_argument(
        "--write-cache-size",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="at most this much in --write-cache; writers wait for commits past it "
        "(default: 20G or half its free space, whichever is less)",
    )
    sp.add_argument(
        "--commit-delay",
        type=parse_seconds,
        default=MountOptions.commit_delay,
        metavar="SECONDS",
        help="commit a closed file once it was left alone this long (fsync and pqfs sync "
        f"commit at once; default: {MountOptions.commit_delay:g})",
    )
    sp.add_argument("--debug", action="store_true", help="verbose logging")
    unlock_options(sp)


def cmd_umount(args: argparse.Namespace) -> int:
    from pqfs.mount import daemon

    if _live(args.mountpoint):
        # Commit what was written while the mount still answers, so that a failure is this
        # command's error (and the mount stays, with the data), not a line in the daemon's log.
        _control(args.mountpoint, "sync")
    info(f"{daemon.umount(args.mountpoint, args.lazy)} {args.mountpoint}")
    return 0


def parse_umount(sub: Subparsers) -> None:
    sp = subcommand(sub, "umount", cmd_umount, "unmount a pqfs mount (also clears a stale one)")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument(
        "-z", "--lazy", action="store_true", help="detach now even if files are still open"
    )


# ------------------------------------------------------------------ a running mount ----


def _mount_attr(mountpoint: str, name: bytes) -> bytes:
    """An attribute of a running pqfs mount's root (its statistics, its control socket)."""
    kind = client.mount_type(mountpoint)
    if kind != client.FSTYPE:
        raise PqfsError(f"{mountpoint} is not a pqfs mount")
    try:
        return os.getxattr(mountpoint, name.decode())
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise Hinted(
                f"{mountpoint}: the mount is stale (its daemon died)",
                hint=f"run: pqfs umount {mountpoint}",
            ) from None
        raise PqfsError(f"{mountpoint}: {e.strerror}") from None


def _live(mountpoint: str) -> bool:
    """A pqfs mount whose daemon answers (not stale, not something else)."""
    try:
        os.stat(mountpoint)
    except OSError:
        return False
    return client.mount_type(mountpoint) == client.FSTYPE


def _control(mountpoint: str, command: str, secret: bytes | bytearray = b"") -> None:
    """Lock or unlock a running mount through its daemon's control socket."""
    address = _mount_attr(mountpoint, client.XATTR_CONTROL)
    answer = client.request(address, command, secret)
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


def parse_lock(sub: Subparsers) -> None:
    sp = subcommand(
        sub, "lock", cmd_lock, "wipe keys and decrypted data of a mount; reads fail until unlock"
    )
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")


def cmd_sync(args: argparse.Namespace) -> int:
    _control(args.mountpoint, "sync")
    info(f"{args.mountpoint}: everything written is committed to the vault")
    return 0


def parse_sync(sub: Subparsers) -> None:
    sp = subcommand(
        sub, "sync", cmd_sync, "commit everything written to a mount now, and wait until it is"
    )
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")


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


def parse_unlock(sub: Subparsers) -> None:
    sp = subcommand(sub, "unlock", cmd_unlock, "unlock a locked mount")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    unlock_options(sp)


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
    ("decrypted per byte read", "decrypted_per_byte_read", "{}"),
    ("chunk cache hit rate", "cache_hit_rate", "pct"),
    ("chunk cache", "cache_bytes", "human"),
    ("chunk cache budget", "cache_budget", "human"),
    ("prefetched chunks", "prefetch_chunks", "{}"),
    ("prefetch hits", "prefetch_hits", "{}"),
    ("key cache entries", "key_entries", "{}"),
    ("key cache hits", "key_hits", "{}"),
    ("key cache misses", "key_misses", "{}"),
    ("  derived (no KEM)", "keys_derived", "{}"),
    ("files opened ahead", "opened_ahead", "{}"),
    ("  taken by an open", "opened_ahead_used", "{}"),
    ("  closed unused", "opened_ahead_wasted", "{}"),
    ("authentication failures", "auth_failures", "{}"),
    ("failed reads (storage)", "read_errors", "{}"),
    ("files not committed yet", "pending_files", "{}"),
    ("  their size", "pending_bytes", "human"),
    ("  the oldest for", "oldest_pending_s", "{} s"),
    ("operations not committed", "pending_ops", "{}"),
    ("staged in memory", "staged_memory", "human"),
    ("staged in write cache", "staged_spill", "human"),
    ("writes that waited", "staging_waits", "{}"),
    ("commits (catalog deltas)", "commits", "{}"),
    ("files committed", "files_committed", "{}"),
    ("bytes committed", "bytes_committed", "human"),
    ("  streamed as written", "bytes_streamed", "human"),
    ("  rebased on others' work", "commits_rebased", "{}"),
    ("  conflict copies made", "conflict_copies", "{}"),
    ("failed commits", "commit_failures", "{}"),
    ("  last failure", "last_commit_failure", "{}"),
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
    raw = _mount_attr(args.mountpoint, client.XATTR_STATS)
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


def parse_stats(sub: Subparsers) -> None:
    sp = subcommand(sub, "stats", cmd_stats, "live statistics of a mount")
    sp.add_argument("mountpoint", metavar="MOUNTPOINT")
    sp.add_argument("--json", action="store_true", help="machine-readable output")


# In `pqfs --help` order.
PARSERS = (parse_mount, parse_umount, parse_lock, parse_unlock, parse_sync, parse_stats)
