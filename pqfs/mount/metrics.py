"""Live measurements of a mount: read counters, read latency percentiles and event-loop stalls.

All are touched only from the trio thread, so they need no lock.
"""

from __future__ import annotations

import functools
import gc
import math
import resource
import time
from typing import Any

import trio

# The loop thread's own counters, read by the stall meter (module attributes: tests replace
# them to stand for what only a hypervisor can do, such as taking the vCPU away mid-step).
_thread_cpu = time.thread_time
_thread_usage = functools.partial(resource.getrusage, resource.RUSAGE_THREAD)

BUCKETS_PER_OCTAVE = 8  # percentiles within ~9% of the true value, in constant memory and time
_MAX_BUCKET = 40 * BUCKETS_PER_OCTAVE  # 1 us * 2^40: beyond any real latency


class Counters:
    """What the mount's reads and opens did (`pqfs stats`)."""

    def __init__(self) -> None:
        self.reads = 0
        self.slow_reads = 0  # reads that waited for a worker (not all their chunks were cached)
        self.inline_reads = 0  # reads that decrypted their missing chunks on the loop
        self.direct_reads = 0  # reads whose chunks came from one O_DIRECT read, not a worker
        self.bytes_read = 0
        self.bytes_decrypted = 0
        self.prefetch_chunks = 0
        self.prefetch_dropped = 0  # chunks of prefetch dropped: their handle jumped first
        self.auth_failures = 0
        self.read_errors = 0  # backend failures (unreachable store, missing object)
        self.opens = 0
        self.opened_ahead = 0  # files opened in the background for a scan (openahead.py)
        self.opened_ahead_used = 0  # of which a reader's open took
        self.opened_ahead_wasted = 0  # of which were closed unused (time, bound, lock, change)


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

    def __init__(self, detail: bool = False) -> None:
        self.longest = 0.0
        self.longest_cpu = 0.0  # on-CPU time of the longest step
        self.busiest = 0.0  # the most on-CPU time of any one step (steps over BUSY_FLOOR)
        self.over_10ms = 0
        self._start = 0.0
        self._cpu = 0.0
        self.longest_task = ""
        # Opt-in (`pqfs mount --stall-detail`): what the loop's thread went through during the
        # longest step, from getrusage(RUSAGE_THREAD) around every step (~0.4 us each). A
        # step off the CPU with a sleep in it waited for something (the GIL, a lock, a disk).
        # With neither a sleep nor a preemption the thread never left its vCPU, so its time
        # off the CPU is the host's: the hypervisor ran something else on that vCPU (with
        # paravirtual steal accounting, as here, steal is not counted as the thread's CPU).
        self.detail = detail
        self._usage: resource.struct_rusage | None = None
        self.longest_sleeps = 0  # voluntary context switches
        self.longest_preemptions = 0  # involuntary ones
        self.longest_faults = 0  # page faults, minor and major
        # The longest step with that host share taken out: a step with no sleep and no
        # preemption counts its CPU time only, any other step counts whole.
        self.longest_own = 0.0

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.detail:
            self._usage = _thread_usage()
        self._cpu = _thread_cpu()
        self._start = time.perf_counter()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        dt = time.perf_counter() - self._start
        if dt <= self.BUSY_FLOOR and dt <= self.longest:
            return
        cpu = _thread_cpu() - self._cpu
        self.busiest = max(self.busiest, cpu)
        sleeps = preemptions = faults = 0
        detailed = self._usage is not None and dt > self.longest_own
        if detailed:
            u0, u1 = self._usage, _thread_usage()
            assert u0 is not None
            sleeps = u1.ru_nvcsw - u0.ru_nvcsw
            preemptions = u1.ru_nivcsw - u0.ru_nivcsw
            faults = u1.ru_minflt + u1.ru_majflt - u0.ru_minflt - u0.ru_majflt
            own = dt if sleeps or preemptions else min(cpu, dt)
            self.longest_own = max(self.longest_own, own)
        if dt > self.longest:
            self.longest = dt
            self.longest_cpu = cpu
            self.longest_task = task.name
            if detailed:
                self.longest_sleeps, self.longest_preemptions = sleeps, preemptions
                self.longest_faults = faults
        if dt > 0.010:
            self.over_10ms += 1

    def detail_stats(self) -> dict[str, float]:
        """The opt-in figures for `pqfs stats`; none without detail."""
        if not self.detail:
            return {}
        return {
            "stall_detail_sleeps": self.longest_sleeps,
            "stall_detail_preemptions": self.longest_preemptions,
            "stall_detail_faults": self.longest_faults,
            "stall_detail_own_max_ms": round(self.longest_own * 1000, 3),
        }

    def reset(self) -> None:  # for tests
        self.longest = self.longest_cpu = self.busiest = self.longest_own = 0.0
        self.over_10ms = 0
        self.longest_sleeps = self.longest_preemptions = self.longest_faults = 0


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
