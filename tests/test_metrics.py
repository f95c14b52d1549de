"""The mount's live measurements (pqfs/metrics.py): stalls of the loop, latency percentiles."""

from __future__ import annotations

import time

import trio

from pqfs.metrics import Latency, StallMeter


def _burn(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU time, however busy the machine is."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_a_blocked_step_is_a_stall_off_the_cpu() -> None:
    meter = StallMeter()

    async def main() -> None:
        await trio.sleep(0)
        time.sleep(0.03)  # blocks the loop without using the CPU (as a wait for the GIL would)
        await trio.sleep(0)

    trio.run(main, instruments=[meter])
    assert meter.longest >= 0.03 and meter.over_10ms >= 1
    assert meter.longest_task.endswith("main")
    assert meter.longest_cpu < meter.longest / 2
    assert meter.busiest < 0.015


def test_a_busy_step_is_a_stall_on_the_cpu() -> None:
    meter = StallMeter()

    async def main() -> None:
        await trio.sleep(0)
        _burn(0.02)
        await trio.sleep(0)

    trio.run(main, instruments=[meter])
    assert meter.longest >= 0.02
    assert meter.longest_cpu >= 0.02 and meter.busiest >= 0.02
    meter.reset()
    assert (meter.longest, meter.longest_cpu, meter.busiest, meter.over_10ms) == (0, 0, 0, 0)


def test_short_steps_use_little_cpu() -> None:
    meter = StallMeter()

    async def main() -> None:
        for _ in range(1000):
            await trio.sleep(0)

    trio.run(main, instruments=[meter])
    assert meter.busiest < 0.005  # CPU time, which preemption on a loaded machine does not add


def test_latency_percentiles_within_a_bucket() -> None:
    lat = Latency()
    assert lat.percentile(50) is None
    for us in range(1, 1001):
        lat.add(us / 1e6)
    p50, p99 = lat.percentile(50), lat.percentile(99)
    assert p50 is not None and p99 is not None
    assert 500e-6 <= p50 <= 500e-6 * 1.1  # the bucket's upper bound: within ~9%
    assert 990e-6 <= p99 <= 990e-6 * 1.1
    assert lat.count == 1000
