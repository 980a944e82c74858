"""The loader's pre-warm: artifact loads wait for it (torch's ISA probe is not thread-safe)."""

from __future__ import annotations

import functools
import os
import sys
import threading
import types
from typing import Any

import pytest
import torch
from torch._inductor import CompiledArtifact
from torch._inductor import config as inductor_config

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
    # After the probe, the load picks the ISA for real: on a cold Inductor cache that
    # builds test programs with g++ (over 10 s once, on a fresh venv here).
    loader.join(120)
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


def _fake_triton(monkeypatch: pytest.MonkeyPatch, computed: list[tuple[str, int]]) -> None:
    # A stand-in for `triton.runtime.cache` whose key is cached per process as Triton's is
    # (an lru_cache): it records where it was computed.
    @functools.lru_cache
    def triton_key() -> str:
        computed.append(
            (
                threading.current_thread().name,
                os.getpriority(os.PRIO_PROCESS, threading.get_native_id()),
            )
        )
        return "key"

    cache = types.ModuleType("triton.runtime.cache")
    cache.triton_key = triton_key  # type: ignore[attr-defined]
    for name, module in (
        ("triton", types.ModuleType("triton")),
        ("triton.runtime", types.ModuleType("triton.runtime")),
        ("triton.runtime.cache", cache),
    ):
        monkeypatch.setitem(sys.modules, name, module)


def test_on_a_gpu_the_pre_warm_computes_tritons_key_on_a_thread_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Triton hashes its sources and libtriton.so on the first kernel load of a process
    # (1.2 s of the H200 machine's warm restart): the pre-warm computes it beside
    # Inductor's imports, and is over only once it is.
    computed: list[tuple[str, int]] = []
    _fake_triton(monkeypatch, computed)
    imports_began = threading.Event()

    def set_up(*, probe_cpu: bool) -> None:
        imports_began.set()

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(prewarm, "_thread", None)  # a process that has not pre-warmed yet
    monkeypatch.setattr(prewarm, "set_up_inductor", set_up)
    monkeypatch.setattr(prewarm, "pick_recorded_isa", lambda: True)
    serving = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    prewarm.prewarm().join(60)
    assert imports_began.is_set()
    assert computed == [("pwdaemon-triton-key", max(serving, LOWEST_NICENESS))]


def test_without_cuda_the_pre_warm_leaves_tritons_key_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    computed: list[tuple[str, int]] = []
    _fake_triton(monkeypatch, computed)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert prewarm.start_triton_key() is None
    assert computed == []


def test_an_artifact_loads_with_one_compile_thread_and_leaves_the_setting_as_it_was(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # With more compile threads Inductor loads C++ kernels on its own (ungated) pool
    # threads and starts its compile subprocess pool for Triton kernels: a serving
    # process compiles nothing, so its loads run with one, and the user's setting stays.
    seen: list[int | None] = []

    def load(**kwargs: Any) -> str:
        seen.append(inductor_config.compile_threads)
        return "runnable"

    monkeypatch.setattr(CompiledArtifact, "load", staticmethod(load))
    prewarm.prewarm().join(120)
    with inductor_config.patch(compile_threads=4):
        loaders = [threading.Thread(target=compiler.load_artifact, args=("a",)) for _ in range(4)]
        for loader in loaders:
            loader.start()
        for loader in loaders:
            loader.join(30)
        assert seen == [1, 1, 1, 1]
        assert inductor_config.compile_threads == 4


def test_wait_for_prewarm_returns_once_the_pre_warm_has_ended(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The helper a user's conftest calls before pytest's teardown walks the loggers.
    from pwdaemon.testing import wait_for_prewarm

    monkeypatch.setattr(prewarm, "_thread", None)  # a process that has not pre-warmed yet
    assert wait_for_prewarm(1)
    release = threading.Event()
    monkeypatch.setattr(prewarm, "_work", lambda: release.wait(30))
    prewarm.prewarm()
    assert not wait_for_prewarm(0.05)  # still importing: not over
    release.set()
    assert wait_for_prewarm(30)
