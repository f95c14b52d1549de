"""The mount's live measurements (pqfs/mount/metrics.py): stalls of the loop, latency percentiles."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import trio

from pqfs.mount.metrics import Latency, StallMeter


def _burn(seconds: float) -> None:
    """Spend `seconds` of this thread's CPU time, however busy the machine is."""
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def _one_step(meter: StallMeter, step: Callable[[], object]) -> None:
    """Run `step` as one trio task step, measured by `meter`."""

    async def main() -> None:
        await trio.sleep(0)
        step()
        await trio.sleep(0)

    trio.run(main, instruments=[meter])


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


def test_stall_detail_tells_a_sleep_from_page_faults() -> None:
    """With detail on, the longest step's sleeps (voluntary switches) and page faults are
    counted: a step that sleeps has at least one sleep; a longer one that touches 8 MiB of
    fresh memory has its faults (at least one per 2 MiB, the largest page) and becomes the
    longest. Without detail nothing is counted."""
    import mmap

    def sleeper() -> None:
        time.sleep(0.02)

    def toucher() -> None:
        m = mmap.mmap(-1, 8 << 20)
        for i in range(0, len(m), 4096):
            m[i] = 1
        time.sleep(0.04)
        m.close()

    for detail in (True, False):
        meter = StallMeter(detail=detail)
        _one_step(meter, sleeper)
        assert meter.longest >= 0.02
        assert meter.longest_sleeps >= 1 if detail else meter.longest_sleeps == 0
        _one_step(meter, toucher)
        assert meter.longest >= 0.04
        assert meter.longest_faults >= 4 if detail else meter.longest_faults == 0
        meter.reset()
        assert (meter.longest_sleeps, meter.longest_preemptions, meter.longest_faults) == (0, 0, 0)


def test_stall_detail_takes_out_only_the_hosts_share(monkeypatch: pytest.MonkeyPatch) -> None:
    """The longest stall with the host's share taken out: a step in which the loop's thread
    slept counts whole (it waited for something of ours), and so does a busy one (all CPU);
    a step in which it neither slept nor was preempted yet was off the CPU counts only its CPU
    time: only a hypervisor taking the vCPU away does that, and it is stood for here by
    counters that do not move while the step blocks."""
    from pqfs.mount import metrics

    meter = StallMeter(detail=True)
    _one_step(meter, lambda: time.sleep(0.03))
    assert meter.longest >= 0.03 and meter.longest_own >= 0.03  # a real sleep: ours
    meter.reset()
    _one_step(meter, lambda: _burn(0.02))
    assert meter.longest_own >= 0.02  # on the CPU: ours
    meter.reset()

    frozen = metrics._thread_usage()
    monkeypatch.setattr(metrics, "_thread_usage", lambda: frozen)
    monkeypatch.setattr(metrics, "_thread_cpu", lambda: 5.0)
    _one_step(meter, lambda: time.sleep(0.03))
    assert meter.longest >= 0.03  # the stall itself is still reported whole
    assert meter.longest_sleeps == meter.longest_preemptions == 0
    assert meter.longest_own < 0.005  # but none of it was ours


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
