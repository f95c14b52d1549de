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
import fcntl
import io
import logging
import logging.handlers
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Collection
from typing import NoReturn, cast

import pyfuse3
import trio

from pqfs.errors import PqfsError
from pqfs.mount import idlepoll
from pqfs.mount.control import ControlServer
from pqfs.mount.fuseops import Operations
from pqfs.mount.options import MountOptions
from pqfs.mount.vfs import VaultFS
from pqfs.runtime import memory
from pqfs.runtime.memory import LARGE
from pqfs.vault.vault import Vault

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


def syslog_socket() -> str:
    """Where a background mount without --log-file logs: the host's syslog socket.
    PQFS_SYSLOG_SOCKET names another one (a test hook; also for hosts that keep it elsewhere)."""
    return os.environ.get("PQFS_SYSLOG_SOCKET") or "/dev/log"


def _syslog_answers(path: str) -> bool:
    """Whether a syslog daemon listens at `path` (SysLogHandler itself ignores one that
    does not, and then drops every line)."""
    for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
        with socket.socket(socket.AF_UNIX, kind) as s:
            try:
                s.connect(path)
                return True
            except OSError:
                continue
    return False


def _syslog_handler() -> logging.Handler | None:
    """A handler for the syslog socket, or None if nothing listens there (a container, a
    minimal host): then a background mount's log would go nowhere."""
    path = syslog_socket()
    if not _syslog_answers(path):
        return None
    handler = logging.handlers.SysLogHandler(path)
    handler.setFormatter(logging.Formatter("pqfs[%(process)d]: %(levelname)s: %(message)s"))
    return handler


def no_syslog_warning(foreground: bool, log_file: str | None) -> str | None:
    """The warning for a background mount whose log would be lost, else None."""
    if foreground or log_file or _syslog_answers(syslog_socket()):
        return None
    return (
        f"no syslog on this host ({syslog_socket()} does not answer): the mount logs nothing;"
        " use --log-file FILE"
    )


class _PrivateFileHandler(logging.FileHandler):
    """A log file created mode 0600: it names the files read through the mount (plaintext
    paths). A file that exists keeps its mode (logrotate's `create`, an administrator's)."""

    def _open(self) -> io.TextIOWrapper:
        def opener(path: str, flags: int) -> int:
            return os.open(path, flags | os.O_CLOEXEC, 0o600)

        stream = open(  # noqa: SIM115 - the handler owns and closes it
            self.baseFilename, self.mode, encoding=self.encoding, errors=self.errors, opener=opener
        )
        return cast(io.TextIOWrapper, stream)  # text mode: always one


def setup_logging(foreground: bool, log_file: str | None, debug: bool = False) -> None:
    logger = logging.getLogger("pqfs")
    logger.setLevel(logging.DEBUG if debug else logging.INFO)
    handler: logging.Handler | None
    if log_file:
        handler = _PrivateFileHandler(log_file)
        handler.setFormatter(
            logging.Formatter("%(asctime)s pqfs[%(process)d] %(levelname)s: %(message)s")
        )
    elif foreground:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("pqfs: %(levelname)s: %(message)s"))
    else:
        handler = _syslog_handler()  # None: the parent warned (no_syslog_warning)
    logger.handlers[:] = [handler or logging.NullHandler()]
    logging.getLogger("pyfuse3").setLevel(logging.WARNING)


# ------------------------------------------------------------------------- serving ----


def fuse_options(allow_other: bool) -> set[str]:
    # ro: the mount is read-only, and says so to `test -w`, file managers and df. Lock and
    # unlock therefore go through the control socket (control.py), since the kernel refuses
    # every setxattr on an ro mount.
    opts = {"fsname=pqfs", "subtype=pqfs", "default_permissions", "noatime", "nodev", "nosuid"}
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


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


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
    control = ControlServer(ops.control, fs.uid)
    ops.control_name = control.name
    parent_dev = os.stat(os.path.dirname(os.path.abspath(mountpoint)) or "/").st_dev
    stopped_by: signal.Signals | None = None
    was_ready = False
    with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
        pyfuse3.init(ops, mountpoint, fuse_options(allow_other))
        unmounted = False
        try:
            fs.fuse_fds = idlepoll.fuse_device_fds()
            async with trio.open_nursery() as nursery:

                async def run_fuse() -> None:
                    nonlocal unmounted
                    await pyfuse3.main()
                    unmounted = True  # the loop ends when the kernel unmounts (fusermount -u)
                    nursery.cancel_scope.cancel()

                async def on_signals() -> None:
                    nonlocal stopped_by
                    async for signum in signals:
                        stopped_by = signal.Signals(signum)
                        log.info("%s: unmounting", stopped_by.name)
                        sd_notify("STOPPING=1")
                        nursery.cancel_scope.cancel()
                        return

                nursery.start_soon(run_fuse)
                nursery.start_soon(on_signals)
                nursery.start_soon(control.serve)
                await fs.start(nursery)
                await _answers(mountpoint, parent_dev)
                _set_readahead(mountpoint)
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


class StoppedEarly(PqfsError):
    """SIGTERM or SIGHUP ended the mount before it was ready: a failure for a `pqfs mount`
    waiting for its daemon, a requested stop (exit 0) for a foreground mount (systemd's)."""


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
    memory.harden_process()  # no core dump, in the parent as in the daemon (fork keeps it)
    bound_malloc()
    if not foreground:
        return _background(vault, mountpoint, options, allow_other, log_file, debug, on_mounted)
    close_inherited_fds()
    setup_logging(True, log_file, debug)
    fs = VaultFS(vault, options)
    try:
        trio.run(
            serve,
            fs,
            mountpoint,
            allow_other,
            on_mounted or (lambda: None),
            instruments=[fs.stall, fs.idle],
        )
    except BaseExceptionGroup as e:  # the cause, as a background mount reports it
        if not all(isinstance(c, Exception) for c in _leaves(e)):
            raise  # an interrupt (see _interrupted), not an error to word
        raise PqfsError(_describe(e)) from None
    except StoppedEarly as e:
        log.info("%s", e)
    return 0


INTERRUPTED = b"interrupted"  # the daemon's report when SIGINT stopped its start-up


def _background(
    vault: Vault,
    mountpoint: str,
    options: MountOptions,
    allow_other: bool,
    log_file: str | None,
    debug: bool,
    on_mounted: Callable[[], None] | None,
) -> int:
    """Fork the daemon; return once it reports the mount answers (0), or raise why it failed
    (KeyboardInterrupt when a signal interrupted the start-up: the daemon is then stopped)."""
    warning = no_syslog_warning(False, log_file)
    rfd, wfd = os.pipe()
    # The parent's stop signals are watched from before the fork (other threads may take a
    # signal, and the parent must never die and leave a daemon it was not told about); they
    # are held in this thread until each side has its own handling, the daemon's restored.
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    watch = _SignalWatch()
    try:
        pid = os.fork()
    except BaseException:
        watch.close()
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.close(rfd)
        os.close(wfd)
        raise
    if pid == 0:
        watch.restore()
        signal.pthread_sigmask(signal.SIG_SETMASK, held)
        os.close(rfd)
        _daemon(vault, mountpoint, options, allow_other, log_file, debug, wfd)
    os.close(wfd)
    signal.pthread_sigmask(signal.SIG_SETMASK, held)
    try:
        msg, interrupted = _wait_for_daemon(rfd, pid, watch)
        if interrupted or msg == INTERRUPTED:
            _reap(pid, watch)  # whatever the daemon had mounted is gone once it has exited
    finally:
        # From here on the parent only reports and exits: a stop signal must neither change
        # its result nor kill it after "mounted". Ignored, not handled: Python's finalization
        # resets handled signals to their fatal default, and leaves ignored ones alone.
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        watch.close()
        os.close(rfd)
    if interrupted or msg == INTERRUPTED:
        raise KeyboardInterrupt
    if msg != b"ok":
        raise PqfsError(
            msg.decode(errors="replace") or "the mount daemon exited before the mount was ready"
        )
    if os.waitpid(pid, os.WNOHANG)[0] == pid:  # killed right after it reported readiness
        raise PqfsError("the mount daemon stopped right after the mount was ready")
    if warning:
        print(f"pqfs: warning: {warning}", file=sys.stderr)
    if on_mounted:
        on_mounted()
    return 0


class _SignalWatch:
    """The parent's stop signals, as bytes on a pipe it can wait on next to the daemon's
    report (signal.set_wakeup_fd); the Python-level handlers do nothing, so no
    KeyboardInterrupt can land anywhere in the parent while it waits."""

    def __init__(self) -> None:
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._handlers = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
        for sig in STOP_SIGNALS:
            signal.signal(sig, lambda _signum, _frame: None)
        self._old = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)

    def take(self) -> int:
        """How many stop signals arrived since the last call."""
        n = 0
        with contextlib.suppress(BlockingIOError):
            while chunk := os.read(self.fd, 64):
                n += len(chunk)
        return n

    def close(self) -> None:
        signal.set_wakeup_fd(self._old)
        os.close(self.fd)
        os.close(self._w)

    def restore(self) -> None:
        """In the daemon: the handlers as they were, and no watch."""
        self.close()
        for sig, handler in self._handlers.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _wait_for_daemon(rfd: int, pid: int, watch: _SignalWatch) -> tuple[bytes, bool]:
    """The daemon's report (b"ok" once the mount answers, or why it failed), read until it
    closes the pipe, and whether a stop signal interrupted the start-up. The first signal
    before "ok" stops the daemon (SIGTERM: it unmounts whatever it had mounted), a second one
    kills it; once "ok" has arrived the mount is up, and signals change nothing."""
    msg = b""
    signals = 0
    while True:
        readable, _, _ = select.select([rfd, watch.fd], [], [])
        if rfd in readable:
            chunk = os.read(rfd, 4096)
            if not chunk:
                return msg, signals > 0
            msg += chunk
        if watch.fd in readable and (n := watch.take()) and msg != b"ok":
            for _ in range(n):
                signals += 1
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM if signals == 1 else signal.SIGKILL)


def _reap(pid: int, watch: _SignalWatch) -> None:
    """Wait for the stopped daemon to exit (it unmounts first); another stop signal kills it."""
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return
        except ChildProcessError:
            return
        select.select([watch.fd], [], [], 0.05)
        if watch.take():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _daemon(
    vault: Vault,
    mountpoint: str,
    options: MountOptions,
    allow_other: bool,
    log_file: str | None,
    debug: bool,
    wfd: int,
) -> NoReturn:
    """The forked daemon: detach, serve, report to the parent through `wfd`; never returns."""
    report = _Report(wfd)
    status = 0
    try:
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.close(null)
        close_inherited_fds(keep={wfd})
        os.chdir("/")
        setup_logging(False, log_file, debug)
        fs = VaultFS(vault, options)
        trio.run(
            serve,
            fs,
            mountpoint,
            allow_other,
            lambda: report.send(b"ok"),
            instruments=[fs.stall, fs.idle],
        )
    except BaseException as e:  # report to the waiting parent, never a traceback
        if _interrupted(e):
            report.send(INTERRUPTED)
            log.info("mount interrupted")
        else:
            report.send(_describe(e).encode())
            log.error("mount failed: %s", _describe(e))
        status = 1
    finally:
        os._exit(status)


class _Report:
    """The daemon's one message to the parent; the pipe is closed after it, so a later
    message (an error after readiness) never goes to a descriptor since reused."""

    def __init__(self, fd: int) -> None:
        self.fd: int | None = fd

    def send(self, msg: bytes) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):  # the parent is gone: serve on regardless
            os.write(fd, msg)
        os.close(fd)


def _interrupted(e: BaseException) -> bool:
    """A KeyboardInterrupt, alone or as the only kind in an exception group (trio's)."""
    if isinstance(e, BaseExceptionGroup):
        rest = e.split(KeyboardInterrupt)[1]
        return rest is None
    return isinstance(e, KeyboardInterrupt)


def close_inherited_fds(keep: Collection[int] = ()) -> None:
    """Close the descriptors this process inherited from its caller (a shell's, a service
    manager's open files), except 0-2 and `keep`: a daemon holding them keeps pipes open and
    files busy for its whole life. Inherited ones are those without close-on-exec: everything
    opened through Python is close-on-exec (PEP 446), so nothing pqfs itself or a library
    opened (an S3 connection made while unlocking) is touched."""
    try:
        fds = [int(name) for name in os.listdir("/proc/self/fd")]
    except OSError:
        fds = list(range(3, 1024))
    for fd in fds:
        if fd <= 2 or fd in keep:
            continue
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue  # not open (the listing's own descriptor, closed since)
        if not flags & fcntl.FD_CLOEXEC:
            os.close(fd)


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
    if isinstance(e, OSError) and e.strerror:  # as `pqfs: error:` words it (cli.main)
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
