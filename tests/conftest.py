"""Shared fixtures: small models and an eager reference copy."""

from __future__ import annotations

import atexit
import copy
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from pwdaemon.serving import strategy as strategy_module
from pwdaemon.serving.strategy import ShapeStrategy, torch_release
from pwdaemon.testing import wait_for_prewarm

# The default artifact store of every attach() in the tests: a fresh directory per
# session, never the user's ~/.cache/pwdaemon (spawned workers inherit it too).
os.environ["PWDAEMON_CACHE_DIR"] = tempfile.mkdtemp(prefix="pwdaemon-test-store-")
atexit.register(shutil.rmtree, os.environ["PWDAEMON_CACHE_DIR"], ignore_errors=True)

UNIT = Path(__file__).resolve().parent / "unit"
INTEGRATION = Path(__file__).resolve().parent / "integration"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Tests by cost: everything under tests/integration runs real compiles (or needs a
    # GPU), so `-m "not slow"` must leave it all out. A test there without either mark
    # belongs in tests/unit.
    unmarked = [
        item.nodeid
        for item in items
        if INTEGRATION in Path(item.path).resolve().parents
        and item.get_closest_marker("slow") is None
        and item.get_closest_marker("gpu") is None
    ]
    if unmarked:
        raise pytest.UsageError(
            "integration tests without a slow or gpu mark: " + ", ".join(unmarked)
        )


@pytest.fixture(autouse=True)
def _unit_tests_trace_inline(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    # attach() traces in the background by default (the first request costs what eager
    # costs); a unit test checks what one traced call produces, right after it, and would
    # race that trace. So tests/unit traces inline unless a test passes trace= itself;
    # the default is exercised by the trace="background" unit tests and by every test
    # under tests/integration.
    if UNIT not in Path(request.node.path).resolve().parents:
        return
    import pwdaemon as pwd

    defaults = pwd.attach.__kwdefaults__
    assert defaults is not None and defaults["trace"] == "background"
    monkeypatch.setitem(defaults, "trace", "inline")


# torch's fused attention fast path (nn.TransformerEncoderLayer, nn.MultiheadAttention) is
# traced by dynamo from torch 2.13 on; before it dynamo captures no graph there under
# either strategy, and pwdaemon's warning at attach says to turn the fast path off.
MHA_FAST_PATH_TRACES = torch_release() >= (2, 13)
# Before 2.13, attention under the backed strategy guards its size `Eq(s, 1)`: a trace at
# size 1 serves size 1 alone, and the other sizes get a piece of their own.
BACKED_ATTENTION_SPANS_SIZE_1 = torch_release() >= (2, 13)


def mha_fast_path_off_where_untraceable(monkeypatch: pytest.MonkeyPatch) -> None:
    """Turn the fused attention fast path off before torch 2.13, as pwdaemon advises."""
    if not MHA_FAST_PATH_TRACES:
        monkeypatch.setattr(torch.backends.mha, "_is_fastpath_enabled", False)


def trace_with(monkeypatch: pytest.MonkeyPatch, *order: ShapeStrategy) -> None:
    """attach() tries these strategies, in this order, instead of this torch's
    (`strategy.ORDER`: the backed strategy alone on torch 2.11)."""
    monkeypatch.setattr(strategy_module, "ORDER", order)


@pytest.fixture
def both_strategies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Unbacked, then backed, on every torch (the order of 2.12 and 2.13; on 2.11 the
    backed strategy is the only one): for the tests of a fall-back from one to the other."""
    trace_with(monkeypatch, ShapeStrategy.UNBACKED, ShapeStrategy.BACKED_OBLIVIOUS)


class SmallMLP(nn.Module):
    """Linear + LayerNorm + ReLU: fast to compile, exercises a reduction."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.lin(x)))


class Plain(nn.Module):
    """One linear layer and a ReLU: one piece, no graph break (8 wide, as Broken)."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.lin = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x))


class Tokens(nn.Module):
    """(batch, length) token ids in, (batch, length, 8) out: a sequence model whose
    lengths vary under the default sizing (the batch) get a symbol of their own."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 8)
        self.proj = nn.Linear(8, 8)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(self.embed(input_ids)))


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


def _prewarm_done() -> None:
    # The loader's pre-warm (`pwdaemon.workers.prewarm`, once per process, started by the
    # first attach) imports Inductor on a thread of its own; `torch._dynamo.reset()` beside
    # those imports failed with "dictionary changed size during iteration" in a later
    # test's teardown (tests/unit/test_scheduler.py, about 1 run in 5), and gated threads
    # change the switch interval that some tests check.
    wait_for_prewarm(120)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_teardown(item: pytest.Item) -> Iterator[None]:
    # Before pytest's logging plugin walks every logger to capture the teardown's logs:
    # a pre-warm that an engine started during the test creates loggers on its thread as
    # it imports Inductor, and the walk failed with "dictionary changed size during
    # iteration" (tests/unit/test_trace.py + test_status.py run alone, ~1 run in 4),
    # before `_fresh_dynamo`'s teardown could wait for it.
    _prewarm_done()
    return (yield)


@pytest.fixture
def fast_switching() -> Iterator[None]:
    # Switch threads every microsecond so interleavings that a loaded machine produces
    # now and then happen on every run.
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


@pytest.fixture
def sdpa_backends_restored() -> Iterator[None]:
    # torch.backends.cuda's attention switches are global flags of the process.
    from pwdaemon.workers.sdpa import sdpa_flags, set_sdpa_flags

    before = sdpa_flags()
    try:
        yield
    finally:
        set_sdpa_flags(before)


@pytest.fixture(autouse=True)
def _own_inductor_cache() -> Iterator[None]:
    # attach(store=...) points this process's Inductor cache into the store (its
    # environment, which workers inherit): without this, a test attaching with
    # store=False had its workers compile into an earlier test's store (a CI run found a
    # kernel a killed compile had left truncated there; workers/kernel_cache.py).
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    yield
    if before is None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
    else:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = before


@pytest.fixture(autouse=True)
def _fresh_dynamo() -> Iterator[None]:
    _prewarm_done()
    torch._dynamo.reset()
    with torch.no_grad():
        yield
    _prewarm_done()
    torch._dynamo.reset()
