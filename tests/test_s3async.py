"""pqfs/storage/s3async.py: the loop's one-attempt GET, against answers SeaweedFS never gives.

The common path (206 with a body, keep-alive, fallback on cut connections) runs against the
real SeaweedFS in test_s3.py; here a raw TCP server on 127.0.0.1 sends the odd answers a
proxy or another S3 implementation could: each must become a Fallback (the worker path then
reads, retries and reports), never wrong bytes, and a connection is kept only when its
response was read to the end and the server did not say close.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest
import trio

from pqfs.storage.s3async import Fallback, LoopGets

BODY = bytes(range(256)) * 4  # 1 KiB


def _answer(head: str, body: bytes = BODY) -> bytes:
    return head.replace("\n", "\r\n").encode() + b"\r\n" + body


OK = _answer(
    f"HTTP/1.1 206 Partial Content\nContent-Length: {len(BODY)}\n"
    f"Content-Range: bytes 100-{100 + len(BODY) - 1}/5000\n"
)


CUT = _answer(
    f"HTTP/1.1 206 Partial Content\nContent-Length: {len(BODY)}\n"
    f"Content-Range: bytes 100-{100 + len(BODY) - 1}/5000\n",
    BODY[:300],
)


async def _run(answers: list[bytes], check: Callable[[LoopGets, str], object]) -> None:
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), lambda s: _handle(s, answers), 0
        )
        port = listeners[0].socket.getsockname()[1]
        gets = LoopGets(2, lambda: None)
        try:
            await check(gets, f"127.0.0.1:{port}")  # type: ignore[misc]
        finally:
            gets.close()
            nursery.cancel_scope.cancel()


async def _handle(stream: trio.SocketStream, answers: list[bytes]) -> None:
    data = b""
    while answers:
        while b"\r\n\r\n" not in data:
            more = await stream.receive_some(4096)
            if not more:
                return
            data += more
        data = data.split(b"\r\n\r\n", 1)[1]
        answer = answers.pop(0)
        await stream.send_all(answer)
        if answer is CUT or b"connection: close" in answer.lower():
            await stream.aclose()
            return


async def test_a_good_answer_fills_the_buffer_and_keeps_the_connection() -> None:
    async def check(gets: LoopGets, where: str) -> None:
        for _ in range(2):  # the second GET reuses the connection
            buf = bytearray(len(BODY))
            assert await gets.get_range("http", where, "/b/k", 100, memoryview(buf)) == (
                len(BODY),
                5000,
            )
            assert bytes(buf) == BODY
        assert len(gets._idle[("http", where)]) == 1

    await _run([OK, OK], check)


@pytest.mark.parametrize(
    "answer",
    [
        _answer("HTTP/1.1 403 Forbidden\nContent-Length: 5\n", b"nope!"),
        _answer("HTTP/1.1 200 OK\nContent-Length: 1024\n"),
        _answer(
            "HTTP/1.1 206 Partial Content\nTransfer-Encoding: chunked\n"
            "Content-Range: bytes 100-1123/5000\n",
            b"400\r\n" + BODY + b"\r\n0\r\n\r\n",
        ),
        _answer(
            "HTTP/1.1 206 Partial Content\nContent-Length: 1024\nContent-Range: bytes 0-1023/5000\n"
        ),
        CUT,
    ],
    ids=["403", "200", "chunked", "other-range", "cut"],
)
async def test_odd_answers_fall_back_and_drop_the_connection(answer: bytes) -> None:
    async def check(gets: LoopGets, where: str) -> None:
        with pytest.raises(Fallback):
            await gets.get_range("http", where, "/b/k", 100, memoryview(bytearray(len(BODY))))
        assert not gets._idle.get(("http", where))

    await _run([answer], check)


async def test_connection_close_is_honoured() -> None:
    closing = _answer(
        f"HTTP/1.1 206 Partial Content\nConnection: close\nContent-Length: {len(BODY)}\n"
        f"Content-Range: bytes 100-{100 + len(BODY) - 1}/5000\n"
    )

    async def check(gets: LoopGets, where: str) -> None:
        buf = bytearray(len(BODY))
        assert (await gets.get_range("http", where, "/b/k", 100, memoryview(buf)))[0] == len(BODY)
        assert bytes(buf) == BODY and not gets._idle.get(("http", where))

    await _run([closing], check)


async def test_gets_in_flight_are_bounded_and_a_timeout_pauses_them() -> None:
    """Beyond its bound (2 here) the loop sends nothing itself: the read goes to a worker."""

    async def silent(stream: trio.SocketStream) -> None:
        await trio.sleep_forever()  # a server that never answers

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(
            functools.partial(trio.serve_tcp, host="127.0.0.1"), silent, 0
        )
        where = f"127.0.0.1:{listeners[0].socket.getsockname()[1]}"
        gets = LoopGets(2, lambda: None)
        failed: list[BaseException] = []

        async def stuck() -> None:
            try:
                await gets.get_range("http", where, "/b/k", 0, memoryview(bytearray(10)))
            except Fallback as e:
                failed.append(e)

        async with trio.open_nursery() as inner:
            inner.start_soon(stuck)
            inner.start_soon(stuck)
            await trio.sleep(0.1)
            with pytest.raises(Fallback, match="in flight"):
                await gets.get_range("http", where, "/b/k", 0, memoryview(bytearray(10)))
        # the two stuck ones gave up at the loop's request timeout (S3Bounds.loop_request_timeout), as Fallbacks, and were closed
        assert len(failed) == 2 and all("TooSlowError" in str(e) for e in failed)
        assert gets._in_flight == 0 and not gets._idle.get(("http", where))
        # and a slow endpoint is left to the workers for a while, not tried read after read
        with pytest.raises(Fallback, match="paused"):
            await gets.get_range("http", where, "/b/k", 0, memoryview(bytearray(10)))
        gets.close()
        nursery.cancel_scope.cancel()
