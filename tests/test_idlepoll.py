"""The loop's idle poll (pqfs/mount/idlepoll.py): when it polls, what ends it, what it never does.

Budgets and lapses run on a fake clock (each reading advances it by `step`), so that no test
depends on how fast this machine runs; only the thread hand-over tests use real time, with
budgets far beyond what they need."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest
import trio

from pqfs.mount.idlepoll import IdlePoll, fuse_device_fds


class FakeClock:
    def __init__(self, step: float) -> None:
        self.now = 1000.0
        self.step = step
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        self.now += self.step
        return self.now


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    try:
        yield r, w
    finally:
        os.close(r)
        os.close(w)


def test_an_unarmed_poll_never_spins(pipe: tuple[int, int]) -> None:
    poll = IdlePoll(10.0, lambda: [pipe[0]])
    poll.before_io_wait(1.0)
    assert poll.polls == 0 and poll.spent == 0


def test_budget_zero_disables_it(pipe: tuple[int, int]) -> None:
    poll = IdlePoll(0.0, lambda: [pipe[0]])
    poll.arm()
    poll.before_io_wait(1.0)
    assert poll.polls == 0


def test_it_never_polls_while_not_allowed(pipe: tuple[int, int]) -> None:
    busy = True
    poll = IdlePoll(10.0, lambda: [pipe[0]], lambda: not busy)
    poll.arm()
    poll.before_io_wait(1.0)
    assert poll.polls == 0
    busy = False
    os.write(pipe[1], b"x")
    poll.before_io_wait(1.0)
    assert (poll.polls, poll.hits) == (1, 1)


def test_nothing_to_wait_for_means_no_poll() -> None:
    poll = IdlePoll(10.0, lambda: [])
    poll.arm()
    poll.before_io_wait(1.0)
    assert poll.polls == 0


def test_a_ready_descriptor_ends_the_poll_at_once(pipe: tuple[int, int]) -> None:
    clock = FakeClock(0.001)
    poll = IdlePoll(10.0, lambda: [pipe[0]], clock=clock)
    os.write(pipe[1], b"x")
    poll.arm()
    before = clock.readings
    poll.before_io_wait(60.0)
    assert (poll.polls, poll.hits) == (1, 1)
    assert clock.readings - before == 2  # one look, one poll


def test_the_budget_ends_the_poll(pipe: tuple[int, int]) -> None:
    clock = FakeClock(0.001)
    poll = IdlePoll(0.010, lambda: [pipe[0]], clock=clock)
    poll.arm()
    poll.before_io_wait(60.0)
    assert (poll.polls, poll.hits) == (1, 0)
    assert 0.007 <= poll.spent <= 0.010  # spun until the budget's end, not past it


def test_trios_timeout_ends_the_poll(pipe: tuple[int, int]) -> None:
    clock = FakeClock(0.001)
    poll = IdlePoll(60.0, lambda: [pipe[0]], clock=clock)
    poll.arm()
    poll.before_io_wait(0.005)  # a timer is due: no poll past it
    assert (poll.polls, poll.hits) == (1, 0)
    assert poll.spent <= 0.006
    poll.before_io_wait(0.0)  # trio has work ready: no poll at all
    assert poll.polls == 1


def test_an_arming_lapses_after_the_budget(pipe: tuple[int, int]) -> None:
    clock = FakeClock(0.0)
    poll = IdlePoll(0.010, lambda: [pipe[0]], clock=clock)
    poll.arm()
    clock.now += 0.011
    poll.before_io_wait(60.0)
    assert poll.polls == 0


def test_a_descriptor_ready_during_the_poll_ends_it(pipe: tuple[int, int]) -> None:
    poll = IdlePoll(60.0, lambda: [pipe[0]])  # only the write can end it
    writer = threading.Timer(0.002, os.write, (pipe[1], b"x"))
    poll.arm()
    writer.start()
    poll.before_io_wait(120.0)
    writer.join()
    assert (poll.polls, poll.hits) == (1, 1)


def test_as_a_trio_instrument_it_hands_over_a_ready_descriptor(pipe: tuple[int, int]) -> None:
    r, w = pipe
    poll = IdlePoll(2.0, lambda: [r])

    async def main() -> bytes:
        poll.arm()
        threading.Timer(0.002, os.write, (w, b"x")).start()
        await trio.lowlevel.wait_readable(r)
        data = os.read(r, 1)
        poll._until = 0.0  # nothing more to wait for: let trio shut down without polling
        return data

    assert trio.run(main, instruments=[poll]) == b"x"
    assert poll.hits >= 1


@pytest.mark.fuse
def test_fuse_device_descriptors_are_found() -> None:
    before = fuse_device_fds()
    fd = os.open("/dev/fuse", os.O_RDWR)
    try:
        assert sorted(fuse_device_fds()) == sorted([*before, fd])
    finally:
        os.close(fd)
    assert fd not in fuse_device_fds()
