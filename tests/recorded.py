"""Graphs dynamo captured from small models, with each piece's calls and eager outputs.

Shared by the worker tests (real compiles of these graphs) and the shipping unit tests.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pwdaemon.serving.strategy import ShapeStrategy, mark_size

TOL: dict[str, Any] = {"atol": 1e-4, "rtol": 1e-4}


class Recorded:
    """Graphs dynamo captured, and each piece's calls: (flat args, eager outputs)."""

    def __init__(self) -> None:
        self.gms: list[torch.fx.GraphModule] = []
        self.calls: list[list[tuple[list[Any], Any]]] = []

    def backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        index = len(self.gms)
        self.gms.append(gm)
        self.calls.append([])

        def run(*args: Any) -> Any:
            out = gm.forward(*args)
            kept = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
            self.calls[index].append((kept, out))
            return out

        return run


def mark_size_unbacked(t: torch.Tensor) -> None:
    # As pwdaemon's tracer marks the size: unbacked, one symbol for every input.
    mark_size(t, 0, ShapeStrategy.UNBACKED, "pwdaemon_test_size")


def capture(fn: Callable[..., Any], calls: list[dict[str, torch.Tensor]]) -> Recorded:
    rec = Recorded()
    compiled = torch.compile(fn, backend=rec.backend)
    for kwargs in calls:
        for t in kwargs.values():
            mark_size_unbacked(t)
        compiled(**kwargs)
    return rec


def _flat(o: Any) -> list[torch.Tensor]:
    if isinstance(o, torch.Tensor):
        return [o]
    if isinstance(o, list | tuple):
        return [t for x in o for t in _flat(x)]
    return []


def assert_matches(got: Any, expected: Any) -> None:
    got_t, exp_t = _flat(got), _flat(expected)
    assert len(got_t) == len(exp_t) > 0
    for g, e in zip(got_t, exp_t, strict=True):
        torch.testing.assert_close(g, e, **TOL)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)
        self.norm = nn.LayerNorm(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.lin(x)))


def record_mlp() -> Recorded:
    """The MLP's one graph, called at sizes 4 and 7."""
    torch.manual_seed(0)
    model = MLP().eval()
    return capture(lambda x: model(x), [{"x": torch.randn(4, 16)}, {"x": torch.randn(7, 16)}])


def meta_snapshot(gm: torch.fx.GraphModule) -> list[dict[str, int]]:
    """Identity of every node's metadata values: shipping must leave the live graph be."""
    return [{k: id(v) for k, v in n.meta.items()} for n in gm.graph.nodes]
