"""Small S3 range GETs sent and awaited on the trio loop itself, for the mount's random reads.

Why: a random read of an S3 vault needs one GET of two chunks (~128 KiB). Sent from a worker
thread, it paid three wake-ups of an idle vCPU (the worker for the job, the worker again when
the response arrives, the loop when the job is done), ~0.13 ms on this project's VM on top
of a ~1.3 ms GET. Here the loop sends the request on a non-blocking socket and sleeps in its
own epoll until the answer is there: one wake-up.

Deliberately narrow: one attempt of a GET whose presigned URL is already known, answered by a
206 with a Content-Length body. Anything else (no URL yet, an error status, a redirect, a
chunked or cut body, a timeout) raises `Fallback`, and the caller sends the read to a worker,
whose path has the retries, the time budget and the error reporting. Only trio thread code.

Invariants (trio thread only):
  * at most `connections` GETs are in flight from here (more fall back to the workers, whose
    number bounds theirs), and at most as many idle connections are kept per host;
  * a connection in the idle list has had its last response read to the end;
  * a connection whose exchange did not complete (an error, a timeout, a cancellation) is
    closed at once, never reused.
"""

from __future__ import annotations

import contextlib
import select
import ssl
import urllib.parse
from typing import Any

import trio

REQUEST_TIMEOUT = 0.5  # seconds for the one attempt here; past it a worker takes the read over
MAX_HEAD = 16 << 10  # a response head larger than this is not S3's


class Fallback(Exception):
    """This GET is for a worker thread (the reason is in the message, never data)."""


class LoopGets:
    def __init__(self, connections: int, ssl_context: Any) -> None:
        self._keep = connections
        self._ssl = ssl_context  # a callable returning the SSLContext, made on first https use
        self._idle: dict[tuple[str, str], list[trio.abc.Stream]] = {}
        self._in_flight = 0

    async def get_range(
        self, scheme: str, netloc: str, target: str, start: int, buf: memoryview
    ) -> tuple[int, int]:
        """Fill `buf` from byte `start` of the object at `target`; (bytes read, object size)."""
        if self._in_flight >= self._keep:
            raise Fallback("as many GETs in flight from the loop as connections")
        self._in_flight += 1
        stream = self._take(scheme, netloc)
        done = False
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                if stream is None:
                    stream = await self._connect(scheme, netloc)
                end = start + len(buf) - 1
                await stream.send_all(
                    f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\nRange: bytes={start}-{end}\r\n"
                    "Accept-Encoding: identity\r\nUser-Agent: pqfs\r\n\r\n".encode()
                )
                got, size, keep = await _response(stream, start, buf)
            done = keep
            return got, size
        except (OSError, trio.TooSlowError, trio.BrokenResourceError, ssl.SSLError) as e:
            raise Fallback(type(e).__name__) from None
        finally:
            self._in_flight -= 1
            if stream is not None:
                if done:
                    self._give_back(scheme, netloc, stream)
                else:
                    _abort(stream)

    def _take(self, scheme: str, netloc: str) -> trio.abc.Stream | None:
        idle = self._idle.get((scheme, netloc))
        while idle:
            stream = idle.pop()
            if not _closed_by_peer(stream):
                return stream
            _abort(stream)
        return None

    def _give_back(self, scheme: str, netloc: str, stream: trio.abc.Stream) -> None:
        idle = self._idle.setdefault((scheme, netloc), [])
        if len(idle) < self._keep:
            idle.append(stream)
        else:
            _abort(stream)

    async def _connect(self, scheme: str, netloc: str) -> trio.abc.Stream:
        where = urllib.parse.urlsplit(f"//{netloc}")
        host = where.hostname or ""
        tcp = await trio.open_tcp_stream(host, where.port or (443 if scheme == "https" else 80))
        if scheme != "https":
            return tcp
        tls = trio.SSLStream(tcp, self._ssl(), server_hostname=host, https_compatible=True)
        await tls.do_handshake()
        return tls

    def close(self) -> None:
        for idle in self._idle.values():
            for stream in idle:
                _abort(stream)
        self._idle.clear()


async def _response(stream: trio.abc.Stream, start: int, buf: memoryview) -> tuple[int, int, bool]:
    """Read one response into `buf`: (bytes, object size, whether the connection stays)."""
    data = bytearray()
    while (i := data.find(b"\r\n\r\n")) < 0:
        if len(data) > MAX_HEAD:
            raise Fallback("response head too large")
        more = await stream.receive_some(MAX_HEAD)
        if not more:
            raise Fallback("connection closed before the response")
        data += more
    lines = bytes(data[:i]).decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    status = rest[:3]
    if not version.startswith("HTTP/1.") or status != "206":
        raise Fallback(f"status {status}")  # the worker path reads and reports it
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding") or headers.get("content-encoding", "identity") != (
        "identity"
    ):
        raise Fallback("encoded body")
    length = headers.get("content-length", "")
    first, _, total = headers.get("content-range", "").removeprefix("bytes ").partition("/")
    lo, _, _ = first.partition("-")
    if not length.isdigit() or not total.isdigit() or lo != str(start):
        raise Fallback("unexpected range")
    n, size = int(length), int(total)
    if n != min(len(buf), size - start):
        raise Fallback("unexpected range")
    body = data[i + 4 :]
    if len(body) > n:
        raise Fallback("more body than announced")
    buf[: len(body)] = body
    got = len(body)
    while got < n:
        more = await stream.receive_some(n - got)
        if not more:
            raise Fallback("short body")
        buf[got : got + len(more)] = more
        got += len(more)
    keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
    return got, size, keep


def _socket(stream: trio.abc.Stream) -> Any:
    inner = getattr(stream, "transport_stream", stream)
    return getattr(inner, "socket", None)


def _closed_by_peer(stream: trio.abc.Stream) -> bool:
    """An idle keep-alive connection that is readable has been closed by the server."""
    sock = _socket(stream)
    if sock is None:
        return True
    try:
        readable, _, _ = select.select([sock.fileno()], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


def _abort(stream: trio.abc.Stream) -> None:
    """Close at once, without a TLS goodbye (no await: also under cancellation)."""
    sock = _socket(stream)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
