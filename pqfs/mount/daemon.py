"""Running a mount: FUSE session, background daemon, readiness, signals, unmount.

Readiness means the mount answers: after pyfuse3 mounts, a thread (trio.to_thread) stat()s the
mountpoint, which goes through the kernel to our own loop; only when that returns with the FUSE device's
st_dev is READY=1 sent (systemd, Type=notify) or the waiting `pqfs mount` parent released.
SIGTERM, SIGINT and SIGHUP send STOPPING=1, end the FUSE loop, wipe every secret and unmount.
Forking the daemon and waiting for its report: background.py; where it logs: logs.py.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

import pyfuse3
import trio

from pqfs.errors import PqfsError
from pqfs.mount import background, idlepoll
from pqfs.mount.background import STOP_SIGNALS, close_inherited_fds
from pqfs.mount.client import FSTYPE as FSTYPE
from pqfs.mount.client import mount_type as mount_type
from pqfs.mount.control import ControlServer
from pqfs.mount.fuseops import Operations
from pqfs.mount.logs import no_syslog_warning, setup_logging
from pqfs.mount.options import MountOptions
from pqfs.mount.vfs import VaultFS
from pqfs.runtime import memory
from pqfs.vault.vault import Vault

log = logging.getLogger("pqfs.mount")


# ------------------------------------------------------------------------- checks ----


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


# ------------------------------------------------------------------------- serving ----


def fuse_options(allow_other: bool, read_only: bool = False) -> set[str]:
    # ro (--read-only): the kernel refuses every change itself, and says so to `test -w`,
    # file managers and df. Lock and unlock go through the control socket (control.py)
    # either way, since the kernel refuses every setxattr on an ro mount.
    opts = {"fsname=pqfs", "subtype=pqfs", "default_permissions", "noatime", "nodev", "nosuid"}
    if read_only:
        opts.add("ro")
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
    """Mount, report readiness, serve until unmounted or a stop signal.

    The stop signals are taken from before the kernel mount exists until after it is gone: one
    arriving at any moment in between ends the mount cleanly (a default SIGTERM there would
    kill the daemon and leave the mount stale). Stopped before it was ready, the mount was
    never up: SIGINT raises KeyboardInterrupt (`pqfs: interrupted`), SIGTERM and SIGHUP
    StoppedEarly."""
    ops = Operations(fs)
    o = fs.options
    control = ControlServer(
        ops.control,
        fs.uid,
        max_request=o.control_request_bytes,
        timeout=o.control_timeout,
        connections=o.control_connections,
    )
    ops.control_name = control.name
    parent_dev = os.stat(os.path.dirname(os.path.abspath(mountpoint)) or "/").st_dev
    stopped_by: signal.Signals | None = None
    was_ready = False
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        pyfuse3.init(ops, mountpoint, fuse_options(allow_other, o.read_only))
        unmounted = False
        try:
            fs.fuse_fds = idlepoll.fuse_device_fds()
            async with trio.open_nursery() as nursery:

                async def run_fuse() -> None:
                    nonlocal unmounted
                    await pyfuse3.main()
                    unmounted = True  # the loop ends when the kernel unmounts (fusermount -u)
                    await _drain(fs)
                    nursery.cancel_scope.cancel()

                async def on_signals() -> None:
                    nonlocal stopped_by
                    async for signum in signals:
                        stopped_by = signal.Signals(signum)
                        log.info("%s: unmounting", stopped_by.name)
                        sd_notify("STOPPING=1")
                        await _drain(fs)  # requests are still answered meanwhile
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(run_fuse)
                nursery.start_soon(on_signals)
                nursery.start_soon(control.serve)
                await fs.start(nursery)
                await _answers(mountpoint, parent_dev)
                _set_readahead(mountpoint, fs.options)
                sd_notify("READY=1\nSTATUS=serving " + mountpoint)
                log.info("mounted %s at %s", fs.vault.storage.describe(), mountpoint)
                was_ready = True
                ready()
        finally:
            fs.close()
            with contextlib.suppress(Exception):
                pyfuse3.close(unmount=not unmounted)
            log.info("unmounted %s", mountpoint)
    if stopped_by is not None and not was_ready:
        if stopped_by == signal.SIGINT:
            raise KeyboardInterrupt
        raise StoppedEarly(f"stopped by {stopped_by.name} before the mount was ready")


async def _drain(fs: VaultFS) -> None:
    """Commit what was written before the mount ends; a failure is logged (by the commit,
    and by close() with what is lost)."""
    with contextlib.suppress(PqfsError):
        await fs.drain()


class StoppedEarly(PqfsError):
    """SIGTERM or SIGHUP ended the mount before it was ready: a failure for a `pqfs mount`
    waiting for its daemon, a requested stop (exit 0) for a foreground mount (systemd's)."""


def _set_readahead(mountpoint: str, options: MountOptions) -> None:
    """Tune the kernel side of this mount (root only; best effort):
    * readahead of `read_ahead_kb` (1 MiB): larger reads, fewer round trips through FUSE for
      playback;
    * up to `max_background` readahead requests queued at once instead of 12: readahead waiting
      on a slow object would otherwise fill the queue, and reads of every other file (which go
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
    bdi = f"/sys/class/bdi/{os.major(st.st_dev)}:{os.minor(st.st_dev)}"
    settings = (
        (f"{bdi}/read_ahead_kb", options.read_ahead_kb),
        (f"{ctl}/{os.minor(st.st_dev)}/max_background", options.max_background),
        (f"{ctl}/{os.minor(st.st_dev)}/congestion_threshold", options.max_background * 3 // 4),
    )
    for path, value in settings:
        try:
            with open(path, "w") as f:
                f.write(str(value))
        except OSError:
            pass


M_MMAP_THRESHOLD, M_ARENA_MAX = -3, -8  # mallopt's parameters


def bound_malloc(options: MountOptions) -> None:
    """A fixed mmap threshold sends large buffers to mmap (returned on free), and fewer arenas
    bound what small allocations retain (why: MountOptions.mmap_threshold)."""
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(M_MMAP_THRESHOLD, options.mmap_threshold)
        libc.mallopt(M_ARENA_MAX, options.arena_max)
    except (OSError, AttributeError):  # not glibc: its own policy applies
        pass


def run(
    vault: Vault,
    mountpoint: str,
    options: MountOptions,
    foreground: bool,
    *,
    allow_other: bool = False,
    log_file: str | None = None,
    debug: bool = False,
    on_mounted: Callable[[], None] | None = None,
) -> int:
    """Serve the mount; in the background unless `foreground`. Returns an exit status."""
    memory.harden_process()  # no core dump, in the parent as in the daemon (fork keeps it)
    bound_malloc(options)
    if not foreground:
        warning = no_syslog_warning(False, log_file)

        def serve_daemon(ready: Callable[[], None]) -> None:
            setup_logging(False, log_file, debug)
            _serve_on_trio(vault, mountpoint, options, allow_other, ready)

        background.start(serve_daemon, _describe)
        if warning:
            print(f"pqfs: warning: {warning}", file=sys.stderr)
        if on_mounted:
            on_mounted()
        return 0
    close_inherited_fds()
    setup_logging(True, log_file, debug)
    try:
        _serve_on_trio(vault, mountpoint, options, allow_other, on_mounted or (lambda: None))
    except StoppedEarly as e:
        log.info("%s", e)
    except BaseExceptionGroup as e:  # the cause, as a background mount reports it
        if not all(isinstance(c, Exception) for c in _leaves(e)):
            raise  # an interrupt (see _interrupted), not an error to word
        raise PqfsError(_describe(e)) from None
    except PqfsError:
        raise
    except Exception as e:  # pyfuse3.init's RuntimeError (allow_other refused, ...), an OSError
        raise PqfsError(_describe(e)) from None
    return 0


def _serve_on_trio(
    vault: Vault,
    mountpoint: str,
    options: MountOptions,
    allow_other: bool,
    ready: Callable[[], None],
) -> None:
    """serve(), on a trio loop of this thread's, with the mount's instruments."""
    fs = VaultFS(vault, options)
    sys.setswitchinterval(options.switch_interval)
    trio.run(serve, fs, mountpoint, allow_other, ready, instruments=[fs.stall, fs.idle])


def _describe(e: BaseException) -> str:
    """The one line a failed start reports, to the waiting parent and in the daemon's log: the
    cause itself, as the CLI would word it, out of the exception groups that trio's nurseries
    wrap it in (nested when the error came from a nested nursery); several causes, each."""
    causes = _leaves(e)
    if len(causes) == 1:
        return _cause(causes[0])
    return f"mount failed: {len(causes)} errors: " + "; ".join(_cause(c) for c in causes)


def _leaves(e: BaseException) -> list[BaseException]:
    if isinstance(e, BaseExceptionGroup):
        return [leaf for sub in e.exceptions for leaf in _leaves(sub)]
    return [e]


def _cause(e: BaseException) -> str:
    if isinstance(e, PqfsError):
        return str(e)
    if isinstance(e, OSError) and e.strerror:  # as `pqfs: error:` words it (main() in cli/main.py)
        return e.strerror + (f": {e.filename}" if e.filename else "")
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
