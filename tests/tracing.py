"""Helpers shared by the capture tests (tests/unit/test_trace*.py)."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch._dynamo.utils import counters

WIDTH = 8


def make(cls: type[nn.Module]) -> tuple[nn.Module, nn.Module]:
    """A fresh instance of `cls` in eval mode, and a copy for eager's outputs."""
    torch.manual_seed(0)
    model = cls().eval()
    return model, copy.deepcopy(model)


def fresh_counters() -> None:
    """Dynamo's caches and counters as in a fresh process."""
    torch._dynamo.reset()
    counters.clear()
