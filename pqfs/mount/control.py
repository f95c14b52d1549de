"""Lock and unlock a running mount, through a Unix socket of the daemon's.

Why not extended attributes, as `pqfs stats` uses: the kernel refuses every setxattr on a
read-only (`ro`) mount before the daemon sees it, and an attribute's value passes through
libfuse's request buffer, which Python cannot wipe. The socket's name is published as the
attribute `user.pqfs.control` of the mount's root (a getxattr, which `ro` allows), so
whoever can see the mount can find it, and nothing has to be agreed on in advance.

Protocol: one request per connection, a command line (`lock`, `unlock`, `unlock-identity`)
and, for the unlocks, the secret (passphrase or identity file text) up to the end of the
stream; one answer line, `0` or `ERRNO message`. The daemon reads the request straight into a
bytearray that it wipes; it answers only root and the user who mounted (SO_PEERCRED).

The socket is in the abstract namespace (no file to clean up after a crash); a client in
another network namespace than the daemon cannot reach it.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from pqfs.errors import PqfsError
from pqfs.runtime.zeroize import wipe

XATTR_CONTROL = b"user.pqfs.control"
COMMANDS = (b"lock", b"unlock", b"unlock-identity")
MAX_REQUEST = (1 << 20) + 64  # an identity file of up to 1 MiB (unlock.py's limit) and its command
REQUEST_TIMEOUT = 10.0  # seconds for a client to send its request: a stalled one frees its slot
CONNECTIONS = 4  # requests served at once; more wait: a flood by another user stays small
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


@dataclass
class Answer:
    """What a request's handler answers: 0, or an errno and a one-line message."""

    code: int = 0
    message: str = ""


Handler = Callable[[bytes, bytearray], Awaitable[Answer]]


class ControlServer:
    """The daemon's end. `handler(command, secret)` runs on the trio loop; `secret` is wiped
    after it returns, whatever it does."""

    def __init__(self, handler: Handler, owner_uid: int) -> None:
        self.handler = handler
        self.owner_uid = owner_uid
        self.name = f"pqfs-{os.getpid()}-{os.urandom(8).hex()}"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.bind(b"\0" + self.name.encode())
        sock.listen(CONNECTIONS)
        self._sock = trio.socket.from_stdlib_socket(sock)
        self._slots = trio.Semaphore(CONNECTIONS)

    async def serve(self) -> None:
        """Answer requests until cancelled (the mount's nursery, at unmount)."""
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    await self._slots.acquire()
                    try:
                        conn, _ = await self._sock.accept()
                    except BaseException:
                        self._slots.release()
                        raise
                    nursery.start_soon(self._serve_one, conn)
        finally:
            self._sock.close()

    async def _serve_one(self, conn: trio.socket.SocketType) -> None:
        request = bytearray(MAX_REQUEST + 1)
        try:
            with conn:
                answer = Answer(errno.ETIMEDOUT, "the request was not sent in time")
                with trio.move_on_after(REQUEST_TIMEOUT):
                    answer = await self._answer(conn, request)
                line = f"{answer.code} {answer.message}".strip() + "\n"
                await conn.send(line.encode("utf-8", "replace"))
        except OSError:
            pass  # the client went away: nothing to tell it
        finally:
            wipe(request)
            self._slots.release()

    async def _answer(self, conn: trio.socket.SocketType, request: bytearray) -> Answer:
        # The whole request first, even one to refuse: a client still sending when the answer
        # comes would see a broken pipe instead of the answer.
        n = 0
        view = memoryview(request)
        while n <= MAX_REQUEST:
            got = await conn.recv_into(view[n:])
            if not got:
                break
            n += got
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        _pid, uid, _gid = _UCRED.unpack(creds)
        if uid not in (0, self.owner_uid):
            return Answer(errno.EPERM, "only the user who mounted it, or root, may do that")
        if n > MAX_REQUEST:
            return Answer(errno.E2BIG, "the request is too large")
        end = request.find(b"\n", 0, n)
        command = bytes(request[:end]) if end >= 0 else b""
        if command not in COMMANDS:
            return Answer(errno.EINVAL, "unknown request")
        secret = bytearray(n - end - 1)
        secret[:] = view[end + 1 : n]
        try:
            return await self.handler(command, secret)
        finally:
            wipe(secret)


def request(address: bytes, command: str, secret: bytes | bytearray = b"") -> Answer:
    """The client's end: send one request to the daemon whose socket is `address` (as read
    from the mount's XATTR_CONTROL) and return its answer."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(120)  # an unlock runs scrypt and loads the catalog: seconds, not minutes
        try:
            s.connect(b"\0" + address)
            try:
                s.sendall(command.encode() + b"\n")
                if secret:
                    s.sendall(secret)
                s.shutdown(socket.SHUT_WR)
            except BrokenPipeError:
                pass  # it answered before reading all of it (a refusal): read why
            reply = b""
            while chunk := s.recv(4096):
                reply += chunk
        except OSError as e:
            raise PqfsError(f"the mount's daemon did not answer: {e.strerror or e}") from None
    code, _, message = reply.decode("utf-8", "replace").strip().partition(" ")
    if not code.isdigit():
        raise PqfsError("the mount's daemon gave no answer")
    return Answer(int(code), message)
