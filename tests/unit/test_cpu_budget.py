"""The attach-time check that serving threads and compile workers fit the CPUs."""

from __future__ import annotations

import logging

import pytest
import torch

from pwdaemon.config import CompileConfig
from pwdaemon.engine import cpu_budget

CPU_MODEL = torch.nn.Linear(4, 4)
META_MODEL = torch.nn.Linear(4, 4, device="meta")  # stands in for a GPU model


@pytest.fixture
def two_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_budget, "usable_cpus", lambda: 2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    monkeypatch.setattr(cpu_budget, "_warned", False)


@pytest.mark.usefixtures("two_cpus")
@pytest.mark.parametrize(
    "idle_priority",
    [
        False,
        # SCHED_IDLE and pausing do not keep serving's own second thread from waiting
        # for a vCPU to wake: for a CPU model the serving thread count is worth a warning.
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                not cpu_budget.idle_priority_works(CompileConfig()), reason="no SCHED_IDLE"
            ),
        ),
    ],
    ids=["normal-priority", "idle-priority"],
)
def test_workers_beside_a_cpu_model_on_every_cpu_warn_once_naming_the_thread_count(
    caplog: pytest.LogCaptureFixture, idle_priority: bool
) -> None:
    config = CompileConfig(workers=1, idle_priority=idle_priority)
    with caplog.at_level(logging.INFO, logger=cpu_budget.__name__):
        cpu_budget.check_cpu_budget(config, CPU_MODEL)
        cpu_budget.check_cpu_budget(config, CPU_MODEL)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "2 torch threads serving + 1 compile worker(s) > 2 CPUs" in warnings[0].message
    assert "torch.set_num_threads(1)" in warnings[0].message
    assert ("SCHED_IDLE" in warnings[0].message) == idle_priority


@pytest.mark.usefixtures("two_cpus")
@pytest.mark.skipif(not cpu_budget.idle_priority_works(CompileConfig()), reason="no SCHED_IDLE")
def test_idle_priority_workers_beside_a_gpu_model_are_only_noted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger=cpu_budget.__name__):
        cpu_budget.check_cpu_budget(CompileConfig(workers=1, idle_priority=True), META_MODEL)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("SCHED_IDLE" in r.message for r in caplog.records)


def test_threads_and_workers_that_fit_say_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_budget, "usable_cpus", lambda: 8)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    assert cpu_budget.oversubscription(CompileConfig(workers=2, idle_priority=False)) is None
    assert cpu_budget.oversubscription(CompileConfig(workers=5, idle_priority=False)) is not None


@pytest.mark.usefixtures("two_cpus")
@pytest.mark.skipif(not cpu_budget.idle_priority_works(CompileConfig()), reason="no SCHED_IDLE")
def test_workers_pause_during_calls_only_where_a_cpu_model_oversubscribes_the_cpus(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    auto = CompileConfig(workers=1)
    assert cpu_budget.pause_wanted(auto, CPU_MODEL)
    assert not cpu_budget.pause_wanted(auto, META_MODEL)
    assert cpu_budget.pause_wanted(CompileConfig(workers=1, pause_during_calls=True), META_MODEL)
    assert not cpu_budget.pause_wanted(
        CompileConfig(workers=1, pause_during_calls=False), CPU_MODEL
    )
    # Only SCHED_IDLE workers are ever stopped (`Worker`'s comment says why).
    assert not cpu_budget.pause_wanted(
        CompileConfig(workers=1, idle_priority=False, pause_during_calls=True), CPU_MODEL
    )
    monkeypatch.setattr(cpu_budget, "usable_cpus", lambda: 8)
    assert not cpu_budget.pause_wanted(auto, CPU_MODEL)  # 2 threads + 1 worker fit
