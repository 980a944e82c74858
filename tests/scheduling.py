"""Shared by the scheduler tests (tests/unit/test_scheduler*.py): a fast policy, a
compile config with short backoff, and calls of the unit tests' MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.range_table import Target
from pwdaemon.workers.compiler import ABOVE_ONE, AT_ONE_ONLY

# Two calls make a size hot, the loop ticks every 10 ms: the fake executor's jobs come
# in milliseconds.
FAST = pwd.PolicyConfig(hot_calls=2, tick_s=0.01)


def compiler_config(workers: int = 1, **kw: Any) -> pwd.CompileConfig:
    return pwd.CompileConfig(workers=workers, backoff_s=0.01, **kw)


def call_sizes(model: nn.Module, sizes: list[int], width: int = 16) -> None:
    for n in sizes:
        model(torch.randn(n, width))


def job_labels(jobs: list[Target]) -> list[str]:
    return [t.label for t in jobs]


# The worker's reason for refusing a conv net's general (guard `s >= 2`), for
# `FakeExecutor(fail={"general": HOLDS_ABOVE_ONE})`.
HOLDS_ABOVE_ONE = (
    "failed",
    "SpecializedCompileError: the general compile holds for some sizes only "
    f"(guard s33 >= 2 (false at size 1)); {ABOVE_ONE}; not kept",
)
# The worker's reason for refusing a general compiled at the hint 1 that pinned the size
# to 1 (BERT in fp16 on an H100, torch 2.11).
HOLDS_AT_ONE_ONLY = (
    "failed",
    "SpecializedCompileError: the general compile holds for some sizes only "
    f"(guard Eq(s52, 1) (false at size 2)); {AT_ONE_ONLY}; not kept",
)
