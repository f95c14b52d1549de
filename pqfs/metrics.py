"""Live measurements of a mount: read latency percentiles and event-loop stalls.

Both are touched only from the trio thread, so they need no lock.
"""

from __future__ import annotations

import gc
import math
import time
from typing import Any

import trio

BUCKETS_PER_OCTAVE = 8  # percentiles within ~9% of the true value, in constant memory and time
_MAX_BUCKET = 40 * BUCKETS_PER_OCTAVE  # 1 us * 2^40: beyond any real latency


class Latency:
    """A log-scale histogram of latencies since the mount started: adding is O(1) and a
    percentile is O(buckets), so `pqfs stats` never stalls the loop sorting samples."""

    def __init__(self) -> None:
        self._counts = [0] * (_MAX_BUCKET + 1)
        self.count = 0

    def add(self, seconds: float) -> None:
        us = seconds * 1e6
        b = 0 if us <= 1 else min(_MAX_BUCKET, int(math.log2(us) * BUCKETS_PER_OCTAVE) + 1)
        self._counts[b] += 1
        self.count += 1

    def percentile(self, q: float) -> float | None:
        """Upper bound of the bucket holding the q-th percentile, in seconds."""
        if not self.count:
            return None
        rank = q / 100 * self.count
        seen = 0
        for b, n in enumerate(self._counts):
            seen += n
            if seen >= rank and n:
                return float(2 ** (b / BUCKETS_PER_OCTAVE)) / 1e6
        return None


class StallMeter(trio.abc.Instrument):
    """The longest single task step: while a step runs, no other FUSE request is answered, so
    this is how long the loop was blocked (by CPU work, blocking I/O or waiting for the GIL).

    Also how much of a long step the loop's thread spent on the CPU (its thread CPU clock),
    which tells the daemon's own work from waiting: for the GIL, a lock, a page fault served
    by a disk, or the host (with paravirtual steal accounting, time the hypervisor gave the
    vCPU to others is not counted as the thread's). Reading that clock costs ~0.4 us, once
    per step, and a second time only for steps over BUSY_FLOOR."""

    BUSY_FLOOR = 0.001  # steps shorter than this are not worth a second clock reading

    def __init__(self) -> None:
        self.longest = 0.0
        self.longest_cpu = 0.0  # on-CPU time of the longest step
        self.busiest = 0.0  # the most on-CPU time of any one step (steps over BUSY_FLOOR)
        self.over_10ms = 0
        self._start = 0.0
        self._cpu = 0.0
        self.longest_task = ""

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._cpu = time.thread_time()
        self._start = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        dt = time.perf_counter() - self._start
        if dt <= self.BUSY_FLOOR and dt <= self.longest:
            return
        cpu = time.thread_time() - self._cpu
        self.busiest = max(self.busiest, cpu)
        if dt > self.longest:
            self.longest = dt
            self.longest_cpu = cpu
            self.longest_task = task.name
        if dt > 0.010:
            self.over_10ms += 1

    def reset(self) -> None:
        self.longest = self.longest_cpu = self.busiest = 0.0
        self.over_10ms = 0


class GcMeter:
    """The longest pause of Python's cyclic garbage collector. A collection stops every thread,
    the loop's too: a full one over the ~80,000 objects of an S3 client took ~38 ms here, which
    is why the mount freezes its long-lived objects (see VaultFS.settle)."""

    def __init__(self) -> None:
        self.longest = 0.0
        self.collections = 0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.collections += 1
            self.longest = max(self.longest, time.perf_counter() - self._start)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def remove(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)
