"""The worker threads behind `add`, `cat` and S3 uploads (pqfs.runtime.pools)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import pytest

from pqfs.runtime.pools import DaemonExecutor, ordered


def test_results_and_errors_come_back() -> None:
    ex = DaemonExecutor(3, "t")
    try:
        assert [f.result() for f in [ex.submit(pow, 2, k) for k in range(10)]] == [
            2**k for k in range(10)
        ]
        with pytest.raises(ZeroDivisionError):
            ex.submit(lambda: 1 // 0).result()
    finally:
        ex.shutdown()


def test_shutdown_cancels_queued_work_and_waits_for_running() -> None:
    ex = DaemonExecutor(1, "t")
    gate, done = threading.Event(), []
    running = ex.submit(lambda: (gate.wait(10), done.append(1)))
    queued = [ex.submit(done.append, 2) for _ in range(5)]
    time.sleep(0.05)
    threading.Timer(0.2, gate.set).start()
    ex.shutdown(wait=True, cancel_futures=True)
    assert running.done() and done == [1]  # the running job finished; queued ones never ran
    assert all(f.cancelled() for f in queued)
    with pytest.raises(RuntimeError):
        ex.submit(print)


def test_a_stuck_job_does_not_hold_up_the_exit() -> None:
    """The interpreter does not join these threads: an interrupted command exits at once.
    (ThreadPoolExecutor's threads are joined at exit; this script would never end.)"""
    script = (
        "import threading\n"
        "from pqfs.runtime.pools import DaemonExecutor\n"
        "DaemonExecutor(2, 't').submit(threading.Event().wait)\n"
    )
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-c", script], check=True, timeout=30)
    assert time.monotonic() - t0 < 10


def test_ordered_keeps_submission_order() -> None:
    def job(k: int) -> int:
        time.sleep(0.001 * (k % 3))
        return k

    assert list(ordered(lambda k=k: job(k) for k in range(50))) == list(range(50))
