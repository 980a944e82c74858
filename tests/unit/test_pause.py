"""Compile workers stopped during serving calls (`pwdaemon.serving.pause`): the
bookkeeping on a fake clock and a recording signaller, then real process groups stopped
and continued by the gate's calls."""

from __future__ import annotations

import math
import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pwdaemon.serving import pause as pause_mod
from pwdaemon.serving.gate import ServingGate
from pwdaemon.serving.pause import PAUSE, ProcessPause


class Recorder:
    def __init__(self) -> None:
        self.now = 0.0
        self.sent: list[tuple[int, int]] = []
        self.gone: set[int] = set()

    def clock(self) -> float:
        return self.now

    def send(self, pgid: int, sig: int) -> None:
        if pgid in self.gone:
            raise ProcessLookupError(pgid)
        self.sent.append((pgid, sig))


def pause(r: Recorder) -> ProcessPause:
    return ProcessPause(clock=r.clock, send=r.send)


def test_registered_groups_are_stopped_for_a_call_and_continued_after() -> None:
    r = Recorder()
    p = pause(r)
    p.add(11)
    p.add(12)
    p.stop()
    assert sorted(r.sent) == [(11, signal.SIGSTOP), (12, signal.SIGSTOP)]
    r.now = 0.004
    p.resume()
    assert sorted(r.sent[2:]) == [(11, signal.SIGCONT), (12, signal.SIGCONT)]
    assert p.pauses == 1
    assert p.stopped_seconds() == pytest.approx(0.004)


def test_nothing_is_signalled_without_registered_groups() -> None:
    r = Recorder()
    p = pause(r)
    p.stop()
    p.resume()
    assert r.sent == [] and p.pauses == 0


def test_pauses_stop_once_the_windows_share_is_used_up() -> None:
    r = Recorder()
    p = pause(r)
    p.add(7)
    calls = 0
    # Calls of 0.1 s with 5 ms gaps: stopped until the share of the first second is used
    # up (the pause under way when it is reached ends with its call), then not.
    while r.now < pause_mod.WINDOW_S - 1e-9:
        p.stop()
        r.now += 0.1
        p.resume()
        r.now += 0.005
        calls += 1
    stopped = p.stopped_seconds()
    assert pause_mod.BACK_TO_BACK_S < 0.005
    assert p.pauses == math.ceil(pause_mod.MAX_STOPPED_SHARE / 0.1 - 1e-9)
    assert p.skipped == calls - p.pauses > 0
    assert pause_mod.MAX_STOPPED_SHARE <= stopped < pause_mod.MAX_STOPPED_SHARE + 0.1
    r.now += pause_mod.WINDOW_S
    p.stop()  # a new window: stopped again
    assert r.sent[-1] == (7, signal.SIGSTOP)


def test_back_to_back_calls_stop_nothing() -> None:
    r = Recorder()
    p = pause(r)
    p.add(3)
    p.stop()  # after a quiet spell: stopped
    r.now += 0.002
    p.resume()
    for _ in range(5):  # the next calls begin 0.1 ms after the previous one ended
        r.now += 0.0001
        p.stop()
        r.now += 0.002
        p.resume()
    assert r.sent == [(3, signal.SIGSTOP), (3, signal.SIGCONT)]
    assert p.skipped == 5
    r.now += 0.01  # a paced call after a 10 ms gap: stopped again
    p.stop()
    assert r.sent[-1] == (3, signal.SIGSTOP)


def test_a_discarded_group_is_continued_if_stopped_and_never_stopped_again() -> None:
    r = Recorder()
    p = pause(r)
    p.add(5)
    p.stop()
    p.discard(5)
    assert r.sent == [(5, signal.SIGSTOP), (5, signal.SIGCONT)]
    p.resume()
    r.now += 0.01  # a paced call: it would stop a registered group
    p.stop()
    assert r.sent == [(5, signal.SIGSTOP), (5, signal.SIGCONT)]


def test_a_group_that_is_gone_is_forgotten_without_raising() -> None:
    r = Recorder()
    p = pause(r)
    p.add(9)
    p.add(10)
    r.gone.add(9)
    p.stop()
    p.resume()
    assert (9, signal.SIGSTOP) not in r.sent
    assert r.sent == [(10, signal.SIGSTOP), (10, signal.SIGCONT)]
    r.gone.clear()
    r.now += 0.01
    p.stop()
    assert r.sent[-1] == (10, signal.SIGSTOP)  # 9 was forgotten


def _state(pid: int) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        stat = f.read()
    return stat[stat.rfind(b")") + 2 :].split()[0].decode()


def _wait_state(pid: int, want: set[str], timeout: float = 5.0) -> str:
    # SIGSTOP/SIGCONT are asynchronous: the state changes once the kernel delivers them.
    deadline = time.monotonic() + timeout
    while True:
        state = _state(pid)
        if state in want or time.monotonic() > deadline:
            return state
        time.sleep(0.001)


@pytest.fixture
def busy_group() -> Iterator[subprocess.Popen[bytes]]:
    # A busy process in a group of its own, with a child in that group (a worker and the
    # compiler it started). Each says so on the shared stdout once its start-up (imports,
    # reads from disk) is over: a process still in uninterruptible sleep ('D') takes a
    # SIGSTOP only when it leaves it, and on a loaded machine a start-up can take seconds.
    code = (
        "import subprocess, sys\n"
        "subprocess.Popen([sys.executable, '-c',"
        ' \'import sys; sys.stdout.write("child\\\\n"); sys.stdout.flush()\\n'
        "while True: pass'])\n"
        "sys.stdout.write('parent\\n'); sys.stdout.flush()\n"
        "while True: pass\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], process_group=0, stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        said = b""
        deadline = time.monotonic() + 60
        while said.count(b"\n") < 2 and time.monotonic() < deadline:
            ready, _, _ = select.select(
                [proc.stdout], [], [], max(0.0, deadline - time.monotonic())
            )
            if ready:
                said += os.read(proc.stdout.fileno(), 64)
        assert sorted(said.split()) == [b"child", b"parent"], said
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _group_members(pgid: int) -> list[int]:
    members = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue
            if int(stat[stat.rfind(b")") + 2 :].split()[2]) == pgid:
                members.append(int(entry))
    return members


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_the_gates_calls_stop_a_real_group_and_its_children_and_continue_them(
    busy_group: subprocess.Popen[bytes],
) -> None:
    pgid = busy_group.pid
    members = _group_members(pgid)
    assert len(members) == 2
    gate = ServingGate()
    gate.hold()  # calls are counted only while pwdaemon works in the background
    PAUSE.add(pgid)
    try:
        with gate.call():
            assert {_wait_state(m, {"T"}) for m in members} == {"T"}
            with gate.call():  # a second call in progress: still stopped
                pass
            assert {_state(m) for m in members} == {"T"}
        assert all(_wait_state(m, {"R", "S"}) in {"R", "S"} for m in members)
    finally:
        PAUSE.discard(pgid)
        gate.release()
    with gate.call():  # not held: not counted, nothing stopped
        assert all(_state(m) != "T" for m in members)
