"""Running a mount: FUSE session, background daemon, readiness, signals, unmount.

Readiness means the mount answers: after pyfuse3 mounts, a worker thread stat()s the mountpoint,
which goes through the kernel to our own loop; only when that returns with the FUSE device's
st_dev is READY=1 sent (systemd, Type=notify) or the waiting `pqfs mount` parent released.
SIGTERM, SIGINT and SIGHUP send STOPPING=1, end the FUSE loop, wipe every secret and unmount.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import logging.handlers
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import pyfuse3
import trio

from . import idlepoll
from .errors import PqfsError
from .fuseops import Operations
from .memory import LARGE
from .vault import Vault
from .vfs import MountOptions, VaultFS

log = logging.getLogger("pqfs.mount")

FSTYPE = "fuse.pqfs"


# ------------------------------------------------------------------------- checks ----


def mount_type(path: str) -> str | None:
    """The filesystem type mounted exactly at `path` (from /proc/self/mountinfo), or None."""
    target = os.path.realpath(path)
    found = None
    try:
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                mp = fields[4].encode().decode("unicode_escape")
                if mp == target:
                    found = right.split()[0]  # the last mount on a path is the visible one
    except OSError:
        return None
    return found


def check_mountpoint(path: str) -> None:
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ENOTCONN:
            raise PqfsError(
                f"{path}: a previous mount is stale (its daemon died); run: pqfs umount {path}"
            ) from None
        raise PqfsError(f"mount point {path}: {e.strerror}") from None
    if not os.path.isdir(path):
        raise PqfsError(f"mount point {path} is not a directory")
    if mount_type(path) is not None:
        raise PqfsError(f"{path} is already a mount point")
    if not os.access(path, os.W_OK) or not os.access(path, os.X_OK):
        raise PqfsError(f"mount point {path}: permission denied")
    if not os.path.exists("/dev/fuse"):
        raise PqfsError("/dev/fuse is missing: install fuse3 (apt install fuse3)")


# ------------------------------------------------------------------------- systemd ----


def sd_notify(message: str) -> None:
    """Send a state line to systemd's NOTIFY_SOCKET, if there is one (Type=notify units)."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.connect(addr)
        s.sendall(message.encode())


# ------------------------------------------------------------------------- logging ----


def setup_logging(foreground: bool, log_file: str | None, debug: bool = False) -> None:
    logger = logging.getLogger("pqfs")
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler
    if log_file:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(
            logging.Formatter("%(asctime)s pqfs[%(process)d] %(levelname)s: %(message)s")
        )
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pqfs: %(levelname)s: %(message)s"))
    elif os.path.exists("/dev/log"):
        handler = logging.handlers.SysLogHandler("/dev/log")
        handler.setFormatter(logging.Formatter("pqfs[%(process)d]: %(levelname)s: %(message)s"))
    else:
        handler = logging.NullHandler()
    logger.handlers[:] = [handler]
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)


# ------------------------------------------------------------------------- serving ----


def fuse_options(allow_other: bool) -> set[str]:
    opts = {"fsname=pqfs", "subtype=pqfs", "default_permissions", "noatime", "nodev", "nosuid"}
    if allow_other:
        opts.add("allow_other")
    return opts


async def _answers(mountpoint: str, parent_dev: int) -> None:
    """Wait until a stat of the mountpoint is answered by this FUSE mount."""
    while True:
        st = await trio.to_thread.run_sync(os.stat, mountpoint)
        if st.st_dev != parent_dev:
            return
        await trio.sleep(0.005)


async def serve(
    fs: VaultFS,
    mountpoint: str,
    allow_other: bool,
    ready: Callable[[], None],
) -> None:
    ops = Operations(fs)
    parent_dev = os.stat(os.path.dirname(os.path.abspath(mountpoint)) or "/").st_dev
    pyfuse3.init(ops, mountpoint, fuse_options(allow_other))
    unmounted = False
    try:
        fs.fuse_fds = idlepoll.fuse_device_fds()
        async with trio.open_nursery() as nursery:

            async def run_fuse() -> None:
                nonlocal unmounted
                await pyfuse3.main()
                unmounted = True  # the loop ends when the kernel unmounts (umount, fusermount -u)
                nursery.cancel_scope.cancel()

            async def on_signals() -> None:
                with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as rx:
                    async for signum in rx:
                        log.info("%s: unmounting", signal.Signals(signum).name)
                        sd_notify("STOPPING=1")
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(run_fuse)
            nursery.start_soon(on_signals)
            await fs.start(nursery)
            await _answers(mountpoint, parent_dev)
            _set_readahead(mountpoint)
            sd_notify("READY=1\nSTATUS=serving " + mountpoint)
            log.info("mounted %s at %s", fs.vault.storage.describe(), mountpoint)
            ready()
    finally:
        fs.close()
        with contextlib.suppress(Exception):
            pyfuse3.close(unmount=not unmounted)
        log.info("unmounted %s", mountpoint)


MAX_BACKGROUND = 64  # the kernel's queue of asynchronous FUSE requests (its default: 12)


def _set_readahead(mountpoint: str) -> None:
    """Tune the kernel side of this mount (root only; best effort):
    * readahead of 1 MiB: larger reads, fewer round trips through FUSE for playback;
    * up to MAX_BACKGROUND readahead requests queued at once instead of 12: readahead waiting on
      a slow object would otherwise fill the queue, and reads of every other file (which go
      through readahead too) would wait behind it."""
    try:
        st = os.stat(mountpoint)
    except OSError:
        return
    ctl = "/sys/fs/fuse/connections"
    if os.geteuid() == 0 and os.path.isdir(ctl) and not os.path.ismount(ctl):
        # fusectl is not mounted (systemd mounts it at boot; containers often do not)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            subprocess.run(
                ["mount", "-t", "fusectl", "fusectl", ctl], capture_output=True, timeout=10
            )
    settings = (
        (f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}/read_ahead_kb", 1024),
        (f"/sys/fs/fuse/connections/{os.minor(st.st_dev)}/max_background", MAX_BACKGROUND),
        (
            f"/sys/fs/fuse/connections/{os.minor(st.st_dev)}/congestion_threshold",
            MAX_BACKGROUND * 3 // 4,
        ),
    )
    for path, value in settings:
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except OSError:
            pass


# glibc's malloc raises its mmap threshold to the size of the largest block freed, after which
# multi-MiB ciphertext buffers come from per-thread arenas that keep their peak forever: with 16
# S3 worker threads the daemon grew by ~50 MiB beyond its cache budget. A fixed threshold sends
# them to mmap (returned on free), and fewer arenas bound what small allocations retain.
M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8
MMAP_THRESHOLD = LARGE  # a buffer this large gets fresh pages: see memory.scratch
ARENA_MAX = 2


def bound_malloc() -> None:
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(M_ARENA_MAX, ARENA_MAX)
    except (OSError, AttributeError):  # not glibc: its own policy applies
        pass


def run(
    vault: Vault,
    mountpoint: str,
    options: MountOptions,
    foreground: bool,
    allow_other: bool = False,
    log_file: str | None = None,
    debug: bool = False,
    on_mounted: Callable[[], None] | None = None,
) -> int:
    """Serve the mount; in the background unless `foreground`. Returns an exit status."""
    bound_malloc()
    if foreground:
        setup_logging(True, log_file, debug)
        fs = VaultFS(vault, options)
        trio.run(
            serve,
            fs,
            mountpoint,
            allow_other,
            on_mounted or (lambda: None),
            instruments=[fs.stall, fs.idle],
        )
        return 0
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid:  # the parent: wait until the daemon reports the mount answers, or fails
        os.close(wfd)
        with os.fdopen(rfd, "rb") as r:
            msg = r.read().decode(errors="replace")
        if msg == "ok":
            if on_mounted:
                on_mounted()
            return 0
        raise PqfsError(msg or "the mount daemon exited before the mount was ready")
    # the daemon
    os.close(rfd)
    status = 0
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        os.chdir("/")
        setup_logging(False, log_file, debug)
        fs = VaultFS(vault, options)

        def ready() -> None:
            os.write(wfd, b"ok")
            os.close(wfd)

        trio.run(serve, fs, mountpoint, allow_other, ready, instruments=[fs.stall, fs.idle])
    except BaseException as e:  # report to the waiting parent, never a traceback
        with contextlib.suppress(OSError):
            os.write(wfd, _describe(e).encode())
        log.error("mount failed: %s", _describe(e))
        status = 1
    finally:
        os._exit(status)


def _describe(e: BaseException) -> str:
    if isinstance(e, PqfsError):
        return str(e)
    if isinstance(e, RuntimeError) and "fuse" in str(e).lower():
        return f"cannot mount: {e} (is /dev/fuse available and the mount point free?)"
    return f"mount failed: {type(e).__name__}: {e}"


# ------------------------------------------------------------------------- unmount ----


def umount(mountpoint: str, lazy: bool = False) -> str:
    """Unmount a pqfs mount, live or stale (daemon killed). Returns what was done."""
    stale = False
    try:
        os.stat(mountpoint)
    except OSError as e:
        if e.errno != errno.ENOTCONN:
            raise PqfsError(f"{mountpoint}: {e.strerror}") from None
        stale = True
    kind = mount_type(mountpoint)
    if kind is None:
        raise PqfsError(f"{mountpoint} is not mounted")
    if kind != FSTYPE:
        raise PqfsError(f"{mountpoint} is a {kind} mount, not pqfs; refusing to unmount it")
    tool = shutil.which("fusermount3") or shutil.which("fusermount")
    if tool is None:
        raise PqfsError("fusermount3 is missing: install fuse3 (apt install fuse3)")
    cmd = [tool, "-u", *(["-z"] if lazy else []), mountpoint]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        err = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
        if "busy" in err.lower():
            raise PqfsError(
                f"{mountpoint} is busy (files are open there); close them, or use --lazy"
            )
        raise PqfsError(f"cannot unmount {mountpoint}: {err or 'fusermount3 failed'}")
    return "cleared stale mount" if stale else "unmounted"
