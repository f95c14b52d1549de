"""Lock and unlock a running mount, through a Unix socket of the daemon's.

Why not extended attributes, as `pqfs stats` uses: the kernel refuses every setxattr on a
read-only (`ro`) mount before the daemon sees it, and an attribute's value passes through
libfuse's request buffer, which Python cannot wipe. The socket's name is published as the
attribute `user.pqfs.control` of the mount's root (a getxattr, which `ro` allows), so
whoever can see the mount can find it, and nothing has to be agreed on in advance.

Protocol: one request per connection, a command line (`lock`, `unlock`, `unlock-identity`,
`sync`: commit everything written, answered once it is) and, for the unlocks, the secret (passphrase or identity file text) up to the end of the
stream; one answer line, `0` or `ERRNO message`. The daemon reads the request straight into a
bytearray that it wipes; it answers only root and the user who mounted (SO_PEERCRED).

The socket is in the abstract namespace (no file to clean up after a crash); a client in
another network namespace than the daemon cannot reach it. The daemon's bounds (request size,
time to send it, requests at once) are MountOptions' `control_*`.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import struct
from collections.abc import Awaitable, Callable

import trio

from pqfs.mount.client import ANSWER_TIMEOUT as ANSWER_TIMEOUT  # (the client's end: client.py)
from pqfs.mount.client import XATTR_CONTROL as XATTR_CONTROL
from pqfs.mount.client import XATTR_STATS as XATTR_STATS
from pqfs.mount.client import Answer as Answer
from pqfs.mount.client import request as request
from pqfs.runtime.zeroize import wipe

log = logging.getLogger("pqfs.mount")

COMMANDS = (b"lock", b"unlock", b"unlock-identity", b"sync")
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


Handler = Callable[[bytes, bytearray, int], Awaitable[Answer]]  # command, secret, caller's uid
REFUSED = "only the user who mounted it, or root, may do that"
RECEIVE_STEP = 4096  # a request's first buffer; doubled as more arrives, up to max_request
ACCEPT_RETRY = 0.5  # seconds before accept() is tried again after it failed


class ControlServer:
    """The daemon's end. `handler(command, secret)` runs on the trio loop; `secret` is wiped
    after it returns, whatever it does. At most `connections` requests are served at once, each
    of up to `max_request` bytes, sent within `timeout` seconds."""

    def __init__(
        self,
        handler: Handler,
        owner_uid: int,
        *,
        max_request: int,
        timeout: float,
        connections: int,
    ) -> None:
        self.handler = handler
        self.owner_uid = owner_uid
        self.max_request = max_request
        self.timeout = timeout
        self.name = f"pqfs-{os.getpid()}-{os.urandom(8).hex()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(b"\0" + self.name.encode())
        sock.listen(connections)
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._slots = trio.Semaphore(connections)

    async def serve(self) -> None:
        """Answer requests until cancelled (the mount's nursery, at unmount). Nothing a client
        does, and no failure of accept() (EMFILE when the process is out of descriptors), ends
        it: the mount must not go down because its control socket had trouble."""
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        conn, _ = await self._sock.accept()
                    except OSError as e:
                        log.warning("control socket: accept failed (%s); retrying", e.strerror)
                        await trio.sleep(ACCEPT_RETRY)
                        continue
                    uid = _peer_uid(conn)
                    if uid not in (0, self.owner_uid):
                        # Refused at once, before it can hold a slot: another user must not be
                        # able to keep the owner from locking.
                        nursery.start_soon(self._refuse, conn)
                        continue
                    await self._slots.acquire()
                    nursery.start_soon(self._serve_one, conn, uid)
        finally:
            self._sock.close()

    async def _refuse(self, conn: trio.socket.SocketType) -> None:
        with conn, contextlib.suppress(OSError):
            await conn.send(_line(Answer(errno.EPERM, REFUSED)))

    async def _serve_one(self, conn: trio.socket.SocketType, uid: int) -> None:
        try:
            with conn:
                await conn.send(_line(await self._answer(conn, uid)))
        except OSError:
            pass  # the client went away: nothing to tell it
        except Exception:  # a bug, or MemoryError: logged; the mount goes on serving
            log.error("control request failed", exc_info=True)
        finally:
            self._slots.release()

    async def _answer(self, conn: trio.socket.SocketType, uid: int) -> Answer:
        request = bytearray(0)
        try:
            n = 0
            # Only the request's arrival is timed: an unlock's scrypt and catalog load may take
            # longer, and a handler cut short would leave the mount half unlocked.
            with trio.move_on_after(self.timeout) as scope:
                request, n = await self._receive(conn)
            if scope.cancelled_caught:
                return Answer(errno.ETIMEDOUT, "the request was not sent in time")
            if n > self.max_request:
                return Answer(errno.E2BIG, "the request is too large")
            end = request.find(b"\n", 0, n)
            command = bytes(request[:end]) if end >= 0 else b""
            if command not in COMMANDS:
                return Answer(errno.EINVAL, "unknown request")
            secret = bytearray(n - end - 1)
            # Through memoryviews on both sides: `bytearray[...] = memoryview` first copies the
            # source into a temporary bytearray, freed unwiped (CPython bytearray_ass_subscript).
            memoryview(secret)[:] = memoryview(request)[end + 1 : n]
            wipe(request)
            try:
                return await self.handler(command, secret, uid)
            finally:
                wipe(secret)
        finally:
            wipe(request)

    async def _receive(self, conn: trio.socket.SocketType) -> tuple[bytearray, int]:
        """The whole request, into a buffer grown as it arrives (a request is usually a short
        passphrase: a 1 MiB buffer per request would be allocated and zeroed on the loop).
        Past `max_request`, one byte more than the limit is kept, so the caller can tell."""
        buf = bytearray(RECEIVE_STEP)
        n = 0
        try:
            while n <= self.max_request:
                if n == len(buf):
                    bigger = bytearray(min(2 * len(buf), self.max_request + 1))
                    memoryview(bigger)[:n] = memoryview(buf)[:n]  # no temporary copy
                    wipe(buf)
                    buf = bigger
                got = await conn.recv_into(memoryview(buf)[n:])
                if not got:
                    break
                n += got
        except BaseException:  # timed out, reset: what arrived of a secret goes now
            wipe(buf)
            raise
        return buf, n


def _peer_uid(conn: trio.socket.SocketType) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    _pid, uid, _gid = _UCRED.unpack(creds)
    return int(uid)


def _line(answer: Answer) -> bytes:
    return (f"{answer.code} {answer.message}".strip() + "\n").encode("utf-8", "replace")
