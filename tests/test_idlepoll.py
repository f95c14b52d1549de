"""The loop's idle poll (pqfs/idlepoll.py): when it polls, what ends it, what it never does."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import trio

from pqfs.idlepoll import IdlePoll, fuse_device_fds


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def test_an_unarmed_poll_never_spins(pipe: tuple[int, int]) -> None:
    poll = IdlePoll(0.01, lambda: [pipe[0]])
    poll.before_io_wait(1.0)
    assert poll.polls == 0 and poll.spent == 0


def test_budget_zero_disables_it(pipe: tuple[int, int]) -> None:
    poll = IdlePoll(0.0, lambda: [pipe[0]])
    poll.arm()
    poll.before_io_wait(1.0)
    assert poll.polls == 0


def test_it_never_polls_while_not_allowed(pipe: tuple[int, int]) -> None:
    busy = True
    poll = IdlePoll(0.01, lambda: [pipe[0]], lambda: not busy)
    poll.arm()
    poll.before_io_wait(1.0)
    assert poll.polls == 0
    busy = False
    os.write(pipe[1], b"x")
    poll.before_io_wait(1.0)
    assert (poll.polls, poll.hits) == (1, 1)


def test_nothing_to_wait_for_means_no_poll() -> None:
    poll = IdlePoll(0.01, lambda: [])
    poll.arm()
    poll.before_io_wait(1.0)
    assert poll.polls == 0


def test_a_ready_descriptor_ends_the_poll_at_once(pipe: tuple[int, int]) -> None:
    poll = IdlePoll(10.0, lambda: [pipe[0]])  # a budget no test would wait out
    os.write(pipe[1], b"x")
    poll.arm()
    poll.before_io_wait(60.0)
    assert (poll.polls, poll.hits) == (1, 1)


def test_a_descriptor_ready_during_the_poll_ends_it(pipe: tuple[int, int]) -> None:
    poll = IdlePoll(10.0, lambda: [pipe[0]])
    writer = threading.Timer(0.002, os.write, (pipe[1], b"x"))
    poll.arm()
    writer.start()
    poll.before_io_wait(60.0)
    writer.join()
    assert (poll.polls, poll.hits) == (1, 1)


def test_it_ends_with_the_budget_or_trios_timeout(pipe: tuple[int, int]) -> None:
    poll = IdlePoll(0.002, lambda: [pipe[0]])
    poll.arm()
    poll.before_io_wait(60.0)  # nothing comes: the budget ends it
    assert (poll.polls, poll.hits) == (1, 0)
    poll.arm()
    poll.before_io_wait(0.0)  # trio has work ready: no poll at all
    assert poll.polls == 1
    long = IdlePoll(60.0, lambda: [pipe[0]])
    long.arm()
    long.before_io_wait(0.002)  # a timer due soon: trio's timeout ends it
    assert (long.polls, long.hits) == (1, 0)
    time.sleep(0.003)
    poll.before_io_wait(60.0)  # the arming has lapsed
    assert poll.polls == 1


def test_as_a_trio_instrument_it_hands_over_a_ready_descriptor(pipe: tuple[int, int]) -> None:
    r, w = pipe
    poll = IdlePoll(0.2, lambda: [r])

    async def main() -> bytes:
        poll.arm()
        threading.Timer(0.002, os.write, (w, b"x")).start()
        await trio.lowlevel.wait_readable(r)
        return os.read(r, 1)

    assert trio.run(main, instruments=[poll]) == b"x"
    assert poll.hits >= 1


def test_fuse_device_descriptors_are_found() -> None:
    before = fuse_device_fds()
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        assert sorted(fuse_device_fds()) == sorted([*before, fd])
    finally:
        os.close(fd)
    assert fd not in fuse_device_fds()
