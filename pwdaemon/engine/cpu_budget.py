"""Do serving threads and compile workers fit the CPUs this process may use?

On 2 vCPUs, 2 torch threads serving and one busy compile worker at a nice level took
compiled calls from ~1 ms to 100-300 ms: OpenMP's threads wait for each other at every
parallel region, and one of them was always waiting for the CPU the worker held. Workers
under SCHED_IDLE (`CompileConfig.idle_priority`, the default on Linux) were meant to take
only CPU time serving leaves idle, but on that VM a SCHED_IDLE worker still kept one vCPU
for whole calls (eager calls of 30-190 ms against 2 ms, `bench/stalls.py`): serving's
OpenMP threads spin instead of sleeping, so they are never woken onto its CPU. Where they
do not fit, the workers are therefore also stopped during serving calls
(`pause_wanted`, `pwdaemon.serving.pause`). Neither keeps serving's own second OpenMP
thread from waiting for a vCPU to wake, so for a CPU model the overlap is worth a warning
whatever the workers' priority (`check_cpu_budget`).
"""

from __future__ import annotations

import itertools
import logging
import os
import sys

import torch
from torch import nn

from pwdaemon.config import CompileConfig

log = logging.getLogger(__name__)

_warned = False  # once per process: every attach would say the same


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def idle_priority_works(config: CompileConfig) -> bool:
    """Whether the workers really run under SCHED_IDLE (asked for, and Linux has it)."""
    return config.idle_priority and sys.platform == "linux" and hasattr(os, "SCHED_IDLE")


def oversubscription(config: CompileConfig) -> str | None:
    """A sentence naming the overlap, or None when serving threads + workers fit."""
    threads, workers, cpus = torch.get_num_threads(), config.workers, usable_cpus()
    if threads + workers <= cpus:
        return None
    return (
        f"{threads} torch threads serving + {workers} compile worker(s) > {cpus} CPUs: "
        f"calls wait for a CPU whenever a worker compiles"
    )


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: its first parameter's or buffer's device (CPU if none)."""
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    return first.device if first is not None else torch.device("cpu")


def pause_wanted(config: CompileConfig, model: nn.Module) -> bool:
    """`CompileConfig.pause_during_calls` resolved: as set, or, when None, whether a
    CPU model's serving threads and the SCHED_IDLE workers oversubscribe the CPUs (a GPU
    model's calls wait on the GPU, and a worker on a spare core does not slow them)."""
    if config.pause_during_calls is not None:
        return config.pause_during_calls and idle_priority_works(config)
    return (
        idle_priority_works(config)
        and hasattr(os, "killpg")
        and model_device(model).type == "cpu"
        and oversubscription(config) is not None
    )


def check_cpu_budget(config: CompileConfig, model: nn.Module) -> None:
    """Warn (once per process) when a CPU model's serving threads and the compile
    workers oversubscribe the CPUs; a note when only a GPU model's do.

    Idle priority and pausing keep a worker off serving's CPUs during calls, not the
    machine's own wake-ups of an idle vCPU for a second OpenMP thread: on this project's
    2-vCPU VM a plain eager model, no compiler anywhere, answered calls paced 10 ms apart
    with a 99th percentile 8-19x and a worst 20-41x its median on 2 torch threads, and
    1.4-2.7x and 2-9x on 1 (the demo, transformers BERT and Llama, tiny configs,
    `bench/models.py --threads`). One thread costs back-to-back calls of a batch of 16
    1.2-1.7x there, so the count is the server's to choose: pwdaemon says what it costs
    and leaves it.
    """
    global _warned
    overlap = oversubscription(config)
    if overlap is None:
        return
    advice = f"torch.set_num_threads({max(1, usable_cpus() - config.workers)})"
    if idle_priority_works(config):
        how = " and stop during serving calls" if config.pause_during_calls else ""
        note = (
            f"pwdaemon: {overlap}; workers run under SCHED_IDLE{how}, so compiles mostly "
            "take idle CPU time (a saturated machine compiles slowly)"
        )
        if _warned or model_device(model).type != "cpu":
            # Said once per process; and a GPU model's calls wait on the GPU, not the CPUs.
            log.info("%s", note)
            return
        _warned = True
        log.warning(
            "%s. With a torch thread on every CPU, serving's slowest warm-up calls still "
            "wait for a CPU: %s in the serving process leaves one to the workers, at some "
            "cost to large batches (README, 'The first request and warm-up')",
            note,
            advice,
        )
        return
    if _warned:
        return
    _warned = True
    log.warning(
        "pwdaemon: %s. Use CompileConfig(idle_priority=True) on Linux, fewer workers, or "
        "%s in the serving process.",
        overlap,
        advice,
    )
