"""Poll for a few hundred microseconds instead of sleeping, when the next event is due that soon.

Why: an idle CPU halts, and waking it costs ~20-40 us in a VM (the host must schedule the
vCPU again; on this project's Firecracker VM `guest_halt_poll_ns` is 0) and tens of us on
bare metal from a deep C-state. A cold random read pays that wake-up inside the daemon twice:
when the disk completes its read, and when the player's next request arrives after the reply.
Go's runtime, and so gocryptfs, spins briefly before parking a thread; the trio loop sleeps in
epoll at once. Measured on that VM (300 cold 64 KiB reads, medians of 3 mounts each): SCHED_IDLE
busy loops on both vCPUs took pqfs from 0.29 to 0.25 ms and left gocryptfs unchanged (0.16 ms);
polling here for up to 200 us took pqfs from 0.30-0.32 to 0.25-0.27 ms, for ~35 us more CPU
per read.

Rules that bound the cost (kept by this module and its caller, VaultFS):
  * it polls only within `budget` of the last `arm()`, which the mount calls when it answers a
    read that is not part of a stream, and when it submits a direct disk read; an idle mount
    never polls;
  * never while `allowed()` is false (VaultFS.may_poll: a worker busy with a job or its
    aftermath, or a wait counted by `Unseen`: an offloaded thread, a fetch on the loop), so the
    poll takes CPU and the GIL from no thread doing work for the mount, and misses the
    completion of none;
  * it returns as soon as one of `fds()` is readable (the FUSE device, direct reads in flight);
    any other wake-up (a timer, a signal) is delayed by at most min(budget, trio's timeout);
  * it runs between task steps, so it is not a stall: the loop is blocked on nothing.
"""

from __future__ import annotations

import contextlib
import os
import select
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

import trio

FUSE_DEVICE = os.makedev(10, 229)  # /dev/fuse
T = TypeVar("T")


def fuse_device_fds() -> list[int]:
    """This process's open descriptors of /dev/fuse (pyfuse3 keeps its session's private)."""
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:  # no /proc: no idle polling, nothing else lost
        return []
    fds = []
    for name in names:
        try:
            st = os.fstat(int(name))
        except OSError:  # closed meanwhile, or the listing's own descriptor
            continue
        if stat.S_ISCHR(st.st_mode) and st.st_rdev == FUSE_DEVICE:
            fds.append(int(name))
    return fds


class IdlePoll(trio.abc.Instrument):
    def __init__(
        self,
        budget: float,
        fds: Callable[[], Iterable[int]],
        allowed: Callable[[], bool] = lambda: True,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.budget = budget  # seconds; 0 disables polling
        self._fds = fds
        self._allowed = allowed
        self._clock = clock
        self._until = 0.0
        self.polls = 0  # polls begun
        self.hits = 0  # polls that ended with a descriptor ready
        self.spent = 0.0  # seconds spent polling

    def arm(self) -> None:
        """An event is expected within the budget: poll rather than sleep until then."""
        if self.budget > 0:
            self._until = self._clock() + self.budget

    def before_io_wait(self, timeout: float) -> None:
        if timeout <= 0:
            return
        now = self._clock()
        end = min(self._until, now + timeout)
        if end <= now or not self._allowed():
            return
        fds = list(self._fds())
        if not fds:
            return
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        self.polls += 1
        while True:
            ready = poller.poll(0)
            t = self._clock()
            if ready:
                self.hits += 1
                break
            if t >= end:
                break
        self.spent += t - now


class Unseen:
    """Waits whose end the idle poll cannot see (a thread, a socket), in progress: the loop
    does not poll while there is one (trio thread only)."""

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def wait(self) -> Iterator[None]:
        """Around such a wait."""
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """trio.to_thread.run_sync, counted: the loop does not poll while such a thread runs
        (its completion is not among the descriptors polled, and polling holds the GIL)."""
        with self.wait():
            return await trio.to_thread.run_sync(fn, *args)
