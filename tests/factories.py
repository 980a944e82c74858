"""Importable model factories for CLI tests (`pwdaemon warm tests_factories:...`)."""

from __future__ import annotations

import torch
from conftest import SmallMLP
from torch import nn


def small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return SmallMLP().eval()


def small_inputs(n: int) -> torch.Tensor:
    return torch.randn(n, 16)


class Identity(nn.Module):
    """Does no tensor work: dynamo has nothing to trace (the doctor must say so)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def identity() -> nn.Module:
    return Identity()
