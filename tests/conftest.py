"""Shared fixtures: small models and an eager reference copy."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest
import torch
from torch import nn

# The default artifact store of every attach() in the tests: a fresh directory per
# session, never the user's ~/.cache/pwdaemon (spawned workers inherit it too).
os.environ["PWDAEMON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pwdaemon-test-store-")
atexit.register(shutil.rmtree, os.environ["PWDAEMON_CACHE_DIR"], ignore_errors=True)


class SmallMLP(nn.Module):
    """Linear + LayerNorm + ReLU: fast to compile, exercises a reduction."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.lin(x)))


class Broken(nn.Module):
    """One graph break in the middle: two pieces (8 wide, as the trace tests use)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.a(x))
        torch._dynamo.graph_break()
        return self.b(h) * 2


@pytest.fixture
def mlp() -> nn.Module:
    torch.manual_seed(0)
    return SmallMLP().eval()


@pytest.fixture
def reference(mlp: nn.Module) -> nn.Module:
    return copy.deepcopy(mlp)


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    torch._dynamo.reset()
