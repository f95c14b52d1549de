"""A mount in the background: fork the daemon, detach it, wait for its one report (ready, or
why not) while the parent's stop signals are watched. It knows nothing of what the daemon
serves (a callback) and never touches a vault, key or FUSE session itself.

Invariants (kept here):
  * the parent never dies and leaves a daemon it was not told about: its stop signals are
    watched from before the fork, and after "ok" they change nothing;
  * the first stop signal before "ok" stops the daemon (SIGTERM: it unmounts), a second kills
    it; the parent waits for it to exit before it reports the interruption;
  * the daemon sends one message, then closes the pipe: nothing later goes to a descriptor
    since reused; and it keeps no descriptor its caller left open (close_inherited_fds).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import select
import signal
from collections.abc import Callable, Collection
from typing import NoReturn

from pqfs.errors import PqfsError
from pqfs.runtime import files

log = logging.getLogger("pqfs.mount")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# What the daemon runs: serve the mount, calling ready() once it answers.
Serve = Callable[[Callable[[], None]], None]

INTERRUPTED = b"interrupted"  # the daemon's report when SIGINT stopped its start-up


def start(serve: Serve, describe: Callable[[BaseException], str]) -> None:
    """Fork the daemon, which detaches and runs `serve(ready)`; return once it has called
    ready() (the mount answers), or raise why it failed, worded by `describe`
    (KeyboardInterrupt when a signal interrupted the start-up: the daemon is then stopped)."""
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
        _daemon(serve, describe, wfd)
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


def _daemon(serve: Serve, describe: Callable[[BaseException], str], wfd: int) -> NoReturn:
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
        serve(lambda: report.send(b"ok"))
    except BaseException as e:  # report to the waiting parent, never a traceback
        if _interrupted(e):
            report.send(INTERRUPTED)
            log.info("mount interrupted")
        else:
            report.send(describe(e).encode())
            log.error("mount failed: %s", describe(e))
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
    files busy for its whole life. Only those it was started with (files.INHERITED_FDS) and
    that are still without close-on-exec: one that a library opened since without it (or that
    took a closed one's number) is not the caller's to lose."""
    for fd in sorted(files.INHERITED_FDS):
        if fd in keep:
            continue
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
        except OSError:
            continue  # not open (the listing's own descriptor, closed since)
        if not flags & fcntl.FD_CLOEXEC:
            os.close(fd)
