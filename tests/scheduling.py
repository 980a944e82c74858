"""Shared by the scheduler tests (tests/unit/test_scheduler*.py): a fast policy, a
compile config with short backoff, and calls of the unit tests' MLP."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.range_table import Target

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
