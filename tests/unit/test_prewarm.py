"""The loader's pre-warm: artifact loads wait for it (torch's ISA probe is not thread-safe)."""

from __future__ import annotations

import os
import threading
from typing import Any

import pytest
from torch._inductor import CompiledArtifact

from pwdaemon.serving.priority import LOWEST_NICENESS
from pwdaemon.workers import compiler, prewarm


def test_artifact_load_waits_until_the_isa_probe_is_done(monkeypatch: pytest.MonkeyPatch) -> None:
    probing, release, loaded = threading.Event(), threading.Event(), threading.Event()

    def probe() -> None:  # stands in for pick_vec_isa(): held until the test says so
        probing.set()
        release.wait(30)

    def load(**kwargs: Any) -> str:
        loaded.set()
        return "runnable"

    monkeypatch.setattr(prewarm, "_thread", None)  # a process that has not pre-warmed yet
    monkeypatch.setattr(prewarm, "_work", probe)
    monkeypatch.setattr(CompiledArtifact, "load", staticmethod(load))
    results: list[Any] = []
    loader = threading.Thread(target=lambda: results.append(compiler.load_artifact("a")))
    loader.start()
    assert probing.wait(10)
    # While the probe runs, the load must not start (it would build kernels under the
    # probe's temporary -mavx512bf16 flag and miss the store's cache keys).
    assert not loaded.wait(0.3)
    release.set()
    loader.join(10)
    assert loaded.is_set() and results == ["runnable"]


def test_artifact_load_runs_at_the_lowest_niceness(monkeypatch: pytest.MonkeyPatch) -> None:
    # The first load starts g++ (Inductor's precompiled header): children inherit the
    # loading thread's niceness, so the load runs at the probe's.
    seen: list[int] = []

    def load(**kwargs: Any) -> str:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return "runnable"

    monkeypatch.setattr(CompiledArtifact, "load", staticmethod(load))
    prewarm.prewarm().join(120)
    before: list[int] = []

    def run() -> None:  # a thread of its own, as the engine's torch work has
        before.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        compiler.load_artifact("a")

    loader = threading.Thread(target=run)
    loader.start()
    loader.join(30)
    assert seen == [max(before[0], LOWEST_NICENESS)]


def test_the_pre_warm_runs_at_the_lowest_niceness(monkeypatch: pytest.MonkeyPatch) -> None:
    # Inductor's imports and the ISA probe, beside serving's OpenMP team on a 2-core box.
    seen: list[int] = []

    def set_up(*, probe_cpu: bool) -> None:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))

    monkeypatch.setattr(prewarm, "_thread", None)  # a process that has not pre-warmed yet
    monkeypatch.setattr(prewarm, "set_up_inductor", set_up)
    serving = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    prewarm.prewarm().join(120)
    assert seen == [max(serving, LOWEST_NICENESS)]
