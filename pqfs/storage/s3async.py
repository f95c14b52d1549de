"""Small S3 range GETs sent and awaited on the trio loop itself, for the mount's random reads.

Why: a random read of an S3 vault needs one GET of two chunks (~128 KiB). Sent from a worker
thread, it pays three wake-ups of an idle vCPU (the worker for the job, the worker again when
the response arrives, the loop when the job is done): ~0.13 ms on top of a ~1.3 ms GET on the
benchmark VM (docs/PERFORMANCE.md). Here the loop sends the request on a non-blocking socket and
sleeps in its own epoll until the answer is there: one wake-up.

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
import re
import select
import ssl
import urllib.parse
from typing import Any

import trio

from pqfs.storage.base import S3Bounds

MAX_HEAD = 16 << 10  # a response head larger than this is not S3's
_DIGITS = re.compile(r"[0-9]{1,20}")  # ASCII only: str.isdigit() also takes "²"
_CONTENT_RANGE = re.compile(r"bytes ([0-9]{1,20})-[0-9]{1,20}/([0-9]{1,20}|\*)")


class Fallback(Exception):
    """This GET is for a worker thread (the reason is in the message, never data)."""


class LoopGets:
    """GETs from the loop: at most `connections` in flight, each attempt within its timeouts
    (seconds; S3Bounds' loop_* fields), and none for `pause` seconds after one timed out."""

    def __init__(
        self,
        connections: int,
        ssl_context: Any,
        *,
        request_timeout: float = S3Bounds.loop_request_timeout,
        connect_timeout: float = S3Bounds.loop_connect_timeout,
        pause: float = S3Bounds.loop_pause,
    ) -> None:
        self._keep = connections
        self._ssl = ssl_context  # a callable returning the SSLContext, made on first https use
        self._request_timeout = request_timeout
        self._connect_timeout = connect_timeout
        self._pause = pause
        self._idle: dict[tuple[str, str], list[trio.abc.Stream]] = {}
        self._in_flight = 0
        self._paused_until = 0.0  # after a timeout, reads go to the workers for a while

    async def get_range(
        self, scheme: str, netloc: str, target: str, start: int, buf: memoryview
    ) -> tuple[int, int]:
        """Fill `buf` from byte `start` of the object at `target`; (bytes read, object size)."""
        if self._in_flight >= self._keep:
            raise Fallback("as many GETs in flight from the loop as connections")
        if trio.current_time() < self._paused_until:
            raise Fallback("paused after a timeout")
        self._in_flight += 1
        stream = self._take(scheme, netloc)
        done = False
        try:
            if stream is None:
                with trio.fail_after(self._connect_timeout):
                    stream = await self._connect(scheme, netloc)
            with trio.fail_after(self._request_timeout):
                end = start + len(buf) - 1
                await stream.send_all(
                    f"GET {target} HTTP/1.1\r\nHost: {netloc}\r\nRange: bytes={start}-{end}\r\n"
                    "Accept-Encoding: identity\r\nUser-Agent: pqfs\r\n\r\n".encode()
                )
                got, size, keep = await _response(stream, start, buf)
            done = keep
            return got, size
        except trio.TooSlowError:
            self._paused_until = trio.current_time() + self._pause
            raise Fallback("TooSlowError") from None
        except (OSError, trio.BrokenResourceError, ssl.SSLError, ValueError) as e:
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
        try:
            tls = trio.SSLStream(tcp, self._ssl(), server_hostname=host, https_compatible=True)
            await tls.do_handshake()
        except BaseException:
            _abort(tcp)  # a failed or cancelled handshake: the socket goes now, not at GC
            raise
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
    answer = answered_range(
        start, len(buf), headers.get("content-length", ""), headers.get("content-range", "")
    )
    if answer is None:
        raise Fallback("unexpected range")
    n, size = answer
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


def answered_range(
    start: int, want: int, content_length: str, content_range: str | None
) -> tuple[int, int] | None:
    """(body length, object size) of the answer to a GET of `want` bytes from `start`, if its
    headers say exactly that range (clipped at the object's end); None if they say anything
    else. `content_range` None: a 200 with the whole object, fine only from byte 0. Shared by
    every way pqfs sends a range GET (boto3, http.client, this loop)."""
    if _DIGITS.fullmatch(content_length) is None:
        return None
    length = int(content_length)
    if content_range is None:
        if start != 0:
            return None
        size = length
    else:
        m = _CONTENT_RANGE.fullmatch(content_range)
        if m is None or int(m.group(1)) != start:
            return None
        size = start + length if m.group(2) == "*" else int(m.group(2))
    return (length, size) if length == min(want, size - start) else None


def _socket(stream: trio.abc.Stream) -> Any:
    inner = getattr(stream, "transport_stream", stream)
    return getattr(inner, "socket", None)


def _closed_by_peer(stream: trio.abc.Stream) -> bool:
    sock = _socket(stream)
    return sock is None or closed_by_peer(sock.fileno())


def closed_by_peer(fd: int) -> bool:
    """An idle keep-alive connection that is readable (or broken) has been closed by the
    server. poll, not select: descriptors past 1023 are fine."""
    if fd < 0:
        return True
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def _abort(stream: trio.abc.Stream) -> None:
    """Close at once, without a TLS goodbye (no await: also under cancellation)."""
    sock = _socket(stream)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()
