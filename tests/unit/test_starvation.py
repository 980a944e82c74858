"""The starvation watch of SCHED_IDLE workers, on a fake clock and a fake CPU counter,
and its /proc reader on this process's real process group."""

from __future__ import annotations

import os
import time

from pwdaemon.workers.starvation import StarvationWatch, group_cpu_seconds


class Counters:
    def __init__(self) -> None:
        self.now = 0.0
        self.cpu: float | None = 0.0

    def clock(self) -> float:
        return self.now

    def read(self, sid: int) -> float | None:
        return self.cpu


def watch(c: Counters) -> StarvationWatch:
    return StarvationWatch(1, window=10.0, share=0.1, clock=c.clock, cpu=c.read)


def test_a_worker_without_cpu_for_a_whole_window_is_starved() -> None:
    c = Counters()
    w = watch(c)
    c.now, c.cpu = 9.9, 0.5
    assert not w.starved()  # the window is not over yet
    c.now = 10.0
    assert w.starved()  # 0.5 s of CPU in 10 s: below 10 % of a core


def test_progress_starts_a_new_window() -> None:
    c = Counters()
    w = watch(c)
    c.now, c.cpu = 10.0, 2.0  # 20 % of a core: progressing
    assert not w.starved()
    c.now, c.cpu = 19.0, 2.1
    assert not w.starved()  # the new window (from 10 s) is not over
    c.now = 20.0
    assert w.starved()  # 0.1 s in the 10 s since the last progress


def test_no_evidence_is_never_starvation() -> None:
    c = Counters()
    c.cpu = None  # /proc unreadable (not Linux) or the group gone
    w = watch(c)
    c.now = 100.0
    assert not w.starved()


def test_group_cpu_counts_this_process() -> None:
    before = group_cpu_seconds(os.getpgid(0))
    assert before is not None and before >= 0.0
    t = time.process_time()
    while time.process_time() - t < 0.3:  # burn CPU, measured by the process clock
        pass
    after = group_cpu_seconds(os.getpgid(0))
    assert after is not None and after - before >= 0.2  # clock ticks are 10 ms
    assert group_cpu_seconds(2**22 + 12345) is None  # no such group


def test_time_stopped_for_serving_calls_is_not_counted_as_denied() -> None:
    c = Counters()
    stopped = [0.0]
    w = StarvationWatch(1, window=10.0, share=0.1, clock=c.clock, cpu=c.read,
                        stopped=lambda: stopped[0])  # fmt: skip
    # 12 s went by, 8 of them stopped on purpose, 0.5 s of CPU in the other 4: the
    # window (10 s of runnable time) is not over yet.
    c.now, c.cpu, stopped[0] = 12.0, 0.5, 8.0
    assert not w.starved()
    c.now = 18.0  # 10 s runnable now, 0.5 s of CPU in them: starved
    assert w.starved()
