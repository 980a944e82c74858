"""Never silent: `status()`, the metrics and the log say what tracing and the plan did.

Proves: status shows every graph piece with its shape strategy, each graph break with
dynamo's reason, recompiles with their cause, misses with their signature, calls and
state, and strategy fall-backs with their reason; `str(status)` prints them; a piece
left with no compiled runnable after its plan says why (status, one WARNING line, the
`pwdaemon_pieces_on_eager` gauge); and the trace families of a real engine's scrape
carry the tracer's counts.
"""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import MHA_FAST_PATH_TRACES, Broken, Plain
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import pwdaemon as pwd
from pwdaemon.engine.events import one_line
from pwdaemon.metrics.exposition import PwdaemonCollector
from pwdaemon.serving import strategy as strategy_module
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.serving.trace_record import AttemptOutcome, MissState, RecompileCause
from pwdaemon.testing import FakeExecutor

WIDTH = 8
FAST = pwd.PolicyConfig(hot_calls=2, tick_s=0.01)


def _model(cls: type[nn.Module]) -> nn.Module:
    torch.manual_seed(0)
    return cls().eval()


def _scrape(handle: pwd.Handle) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    registry.register(PwdaemonCollector([handle.engine]))
    text = generate_latest(registry).decode()
    return {
        (s.name, frozenset((k, v) for k, v in s.labels.items() if k != "model")): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
        if s.labels.get("model") == handle.name
    }


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return (name, frozenset(labels.items()))


def _first_and_other() -> tuple[ShapeStrategy, ShapeStrategy]:
    """The strategy this torch traces with first, and the other one."""
    first = strategy_module.ORDER[0]
    (other,) = set(ShapeStrategy) - {first}
    return first, other


def test_status_shows_pieces_strategy_breaks_and_metrics(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch._dynamo.reset()
    first, other = _first_and_other()
    model = _model(Broken)
    with (
        caplog.at_level(logging.INFO, logger="pwdaemon"),
        pwd.attach(model, compile=False, store=False) as handle,
        torch.no_grad(),
    ):
        for n in (2, 5, 9):
            model(torch.randn(n, WIDTH))
        st = handle.status()
        assert [p.graph for p in st.pieces] == [0, 1]
        assert all(p.strategy is first for p in st.pieces)
        assert all(p.on_eager_reason is None for p in st.pieces)  # no plan: not judged
        assert st.trace.settled and st.trace.strategy is first
        (brk,) = st.trace.graph_breaks
        assert brk.reason and brk.count >= 1
        assert brk.reason == handle._tracer.graph_breaks[0].reason  # dynamo's words
        assert [a.outcome for a in st.trace.attempts] == [AttemptOutcome.ACTIVE]
        assert st.pieces[0].entries[0].target == "eager"
        assert st.pieces[0].entries[0].hits == 3  # every call of the piece ran eager
        text = str(st)
        assert f"2 piece(s), strategy {first.value}" in text
        assert f"graph break x{brk.count} (pieces 0, 1): {one_line(brk.reason)}" in text
        assert "\n  Explanation" not in text  # dynamo's lines joined into one
        assert f"graph 1 [{first.value}]" in text
        got = _scrape(handle)
    # one log line per event: the break (with its reason) and each piece
    messages = [r.getMessage() for r in caplog.records]
    assert any("graph break" in m and brk.reason in m for m in messages)
    assert sum(f"captured (strategy {first.value}" in m for m in messages) == 2
    assert got[_key("pwdaemon_graph_pieces", strategy=first.value)] == 2
    assert got[_key("pwdaemon_graph_pieces", strategy=other.value)] == 0
    assert got[_key("pwdaemon_graph_breaks_total")] == brk.count
    assert got[_key("pwdaemon_recompiles_total", cause="settling")] == 0
    assert got[_key("pwdaemon_trace_misses_total")] == 0
    assert got[_key("pwdaemon_strategy_fallbacks_total", strategy=first.value)] == 0
    assert got[_key("pwdaemon_pieces_on_eager")] == 0


def test_status_shows_misses_and_the_recompile_they_earn() -> None:
    torch._dynamo.reset()
    model = _model(Plain)
    with pwd.attach(model, compile=False, store=False, policy=FAST) as handle:
        with torch.inference_mode():
            for n in (2, 3):
                model(torch.randn(n, WIDTH))
        with torch.enable_grad():  # a grad-mode call no piece's guards accept
            for _ in range(2):
                model(torch.randn(4, WIDTH))
        st = handle.status()
        (miss,) = st.trace.misses
        assert (miss.calls, miss.state) == (2, MissState.HOT) and "grad=1" in miss.signature
        assert st.trace.miss_calls == 2 and not st.trace.recompiles
        assert f"2 x {miss.signature} [hot]" in str(st)
        assert _scrape(handle)[_key("pwdaemon_trace_misses_total")] == 2
        with torch.enable_grad():  # the hot signature's next call is traced
            model(torch.randn(5, WIDTH))
        st = handle.status()
        (rec,) = st.trace.recompiles
        assert rec.cause is RecompileCause.HOT_SIGNATURE and rec.pieces == (1,)
        assert st.trace.misses[0].state is MissState.TRACED
        assert [p.graph for p in st.pieces] == [0, 1]
        assert "recompile (hot_signature" in str(st)
        got = _scrape(handle)
        assert got[_key("pwdaemon_recompiles_total", cause="hot_signature")] == 1
        assert got[_key("pwdaemon_graph_pieces", strategy=_first_and_other()[0].value)] == 2


def _encoder() -> nn.Module:
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False)


# The fall-back these tests show is the encoder's fast path failing under the unbacked
# strategy and traced under the backed one, which needs torch 2.13: before it the fast
# path traces under neither strategy (`conftest.MHA_FAST_PATH_TRACES`).
falls_back = pytest.mark.skipif(
    not MHA_FAST_PATH_TRACES, reason="the encoder's fast path traces from torch 2.13 on"
)


@pytest.fixture
def unbacked_may_be_zero(monkeypatch: pytest.MonkeyPatch) -> None:
    """Mark unbacked sizes without their lower bound of 1: the encoder's fused fast path
    then asks `Eq(80*u0, 0)`, which the unbacked strategy cannot decide, and falls back
    (a strategy that fails, for the tests of what a fall-back shows)."""
    import pwdaemon.serving.strategy as strategy_module

    monkeypatch.setattr(strategy_module, "_UNBACKED_MIN", {})


@falls_back
@pytest.mark.usefixtures("unbacked_may_be_zero")
def test_status_shows_a_strategy_fall_back_with_its_reason() -> None:
    # The encoder's fast path cannot decide a guard on an unbacked size: the next
    # strategy captures it (see test_trace.py).
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = _encoder().eval()
    with pwd.attach(model, compile=False, store=False) as handle, torch.inference_mode():
        for n in (1, 4):
            model(torch.randn(n, 5, 16))
        st = handle.status()
        first, last = st.trace.attempts
        assert first.strategy is ShapeStrategy.UNBACKED
        assert first.outcome is AttemptOutcome.FELL_BACK and first.reason
        assert last.outcome is AttemptOutcome.ACTIVE
        assert st.pieces[0].strategy is ShapeStrategy.BACKED_OBLIVIOUS
        assert f"strategy unbacked: fell back: {one_line(first.reason)}" in str(st)
        got = _scrape(handle)
        assert got[_key("pwdaemon_strategy_fallbacks_total", strategy="unbacked")] == 1
        assert got[_key("pwdaemon_graph_pieces", strategy="backed_oblivious")] == 1


@falls_back
@pytest.mark.usefixtures("unbacked_may_be_zero")
def test_a_strategy_that_failed_in_an_earlier_run_is_not_tried_again(tmp_path: Path) -> None:
    # A failed attempt costs a whole trace (BERT on an H200: 25 of the 32 s to its first
    # piece, under traffic): the store remembers it per model, and a restart skips it.
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = _encoder().eval()
    reference = copy.deepcopy(model)
    x = {n: torch.randn(n, 5, 16) for n in (1, 4)}
    with pwd.attach(model, compile=False, store=tmp_path) as first, torch.inference_mode():
        model(x[1].clone())  # a tracing call marks its inputs' size dimension
        failed, _ = first.status().trace.attempts
        assert failed.outcome is AttemptOutcome.FELL_BACK and failed.reason
    torch._dynamo.reset()
    counters.clear()
    with pwd.attach(model, compile=False, store=tmp_path) as second, torch.inference_mode():
        for n in (1, 4, 1):
            torch.testing.assert_close(model(x[n]), reference(x[n]))
        st = second.status()
        skipped, active = st.trace.attempts
        assert skipped.strategy is ShapeStrategy.UNBACKED, skipped
        assert skipped.outcome is AttemptOutcome.SKIPPED, skipped
        # (the store keeps the first 2000 characters: dynamo's reason can carry a stack)
        assert skipped.reason == f"failed in an earlier run: {failed.reason[:2000]}"
        assert active.strategy is ShapeStrategy.BACKED_OBLIVIOUS
        assert st.pieces[0].strategy is ShapeStrategy.BACKED_OBLIVIOUS
        assert counters["stats"]["unique_graphs"] == 1  # the piece: no failed trace
        assert "strategy unbacked: skipped, failed in an earlier run: " in str(st)
        got = _scrape(second)
        assert got[_key("pwdaemon_strategy_fallbacks_total", strategy="unbacked")] == 0
    # Another model (other shapes) in the same store tries every strategy.
    torch._dynamo.reset()
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True)
    other = nn.TransformerEncoder(layer, num_layers=1, enable_nested_tensor=False).eval()
    with pwd.attach(other, compile=False, store=tmp_path) as third, torch.inference_mode():
        other(torch.randn(1, 5, 8))
        tried = third.status().trace.attempts[0]
        assert tried.outcome is AttemptOutcome.FELL_BACK, tried


def _compiler(**kw: Any) -> pwd.CompileConfig:
    return pwd.CompileConfig(workers=1, backoff_s=0.01, **kw)


def test_piece_on_eager_after_its_plan_says_why(
    mlp: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    ex = FakeExecutor(fail={"general": "failed"})
    with (
        caplog.at_level(logging.WARNING, logger="pwdaemon.engine"),
        pwd.attach(
            mlp, policy=FAST, compiler=_compiler(retries=0), executor=ex, store=False
        ) as handle,
    ):
        mlp(torch.randn(3, 16))
        assert handle.wait(timeout=20)  # the plan completes: general given up
        handle.engine.flush()  # the tick that completed the plan has finished
        st = handle.status()
        assert st.plan_complete
        reason = st.pieces[0].on_eager_reason
        assert reason is not None and reason.startswith("general failed: failed")
        assert st.on_eager == {0: reason}
        assert f"ON EAGER after its plan: {reason}" in str(st)
        assert _scrape(handle)[_key("pwdaemon_pieces_on_eager")] == 1
        handle.engine.flush()  # warned once, not at every tick
    warnings = [r.getMessage() for r in caplog.records if "stays on eager" in r.getMessage()]
    assert warnings == [f"pwdaemon: {handle.name}: graph 0 stays on eager after its plan: {reason}"]


def test_general_tier_off_is_reported_as_the_reason(mlp: nn.Module) -> None:
    with pwd.attach(
        mlp,
        policy=FAST,
        compiler=_compiler(general=False),
        executor=FakeExecutor(),
        store=False,
    ) as handle:
        mlp(torch.randn(3, 16))
        assert handle.wait(timeout=20)
        reason = handle.status().pieces[0].on_eager_reason
        assert reason is not None and "general tier off" in reason
        for _ in range(2):  # size 3 gets hot and compiles: no longer on eager
            mlp(torch.randn(3, 16))
        assert handle.wait(sizes=[3], timeout=20)
        assert handle.status().pieces[0].on_eager_reason is None


def test_a_live_general_is_not_on_eager(mlp: nn.Module) -> None:
    reference = copy.deepcopy(mlp)
    with pwd.attach(
        mlp, policy=FAST, compiler=_compiler(), executor=FakeExecutor(), store=False
    ) as handle:
        x = torch.randn(3, 16)
        torch.testing.assert_close(mlp(x), reference(x))
        assert handle.wait(timeout=20)
        st = handle.status()
        assert st.on_eager == {} and "ON EAGER" not in str(st)
        assert _scrape(handle)[_key("pwdaemon_pieces_on_eager")] == 0


def test_cuda_graph_memory_is_in_status_and_metrics(mlp: nn.Module) -> None:
    # No GPU here: a live graph job is stood in the way `GraphCapture` leaves one (state
    # LIVE, its pool memory on the job); tests/integration/test_cudagraph.py checks the
    # real figure on a GPU. What is proved here is the path to status and the scrape.
    from pwdaemon.engine.jobs import Job, PriorityBand
    from pwdaemon.serving.range_table import Target

    with pwd.attach(
        mlp, policy=FAST, compiler=_compiler(), executor=FakeExecutor(), store=False
    ) as handle:
        mlp(torch.randn(3, 16))
        assert handle.wait(timeout=20)
        assert handle.status().graph_memory_bytes == 0
        assert _scrape(handle)[_key("pwdaemon_cuda_graph_memory_bytes")] == 0
        st = handle.engine._pieces[0]
        job = Job(st.piece, Target.graph(3), pwd.JobReason.HOT, (PriorityBand.HOT, 0))
        job.state, job.graph_bytes = pwd.JobState.LIVE, 3 * 2**20
        st.jobs[job.target.label] = job
        status = handle.status()
        entry = next(e for e in status.pieces[0].entries if e.target == "graph:3")
        assert entry.graph_bytes == 3 * 2**20 and status.graph_memory_bytes == 3 * 2**20
        assert "graph 3.0 MiB" in str(status) and "CUDA graphs: 3.0 MiB" in str(status)
        scraped = _scrape(handle)
        assert scraped[_key("pwdaemon_cuda_graphs")] == 1
        assert scraped[_key("pwdaemon_cuda_graph_memory_bytes")] == 3 * 2**20


def test_status_hints_at_the_attention_fast_path_when_a_fake_tensor_break_left_nothing() -> None:
    # nn.TransformerEncoder on CUDA (H200): its fused kernel has no fake-tensor support,
    # dynamo captures nothing; the status names the switch that lets it trace.
    from pwdaemon.engine.events import TraceStatus
    from pwdaemon.serving.trace_record import FASTPATH_HINT, GraphBreak

    reason = "Operator does not support running with fake tensors\n  Explanation: ..."
    broke = GraphBreak(reason, 1, ShapeStrategy.UNBACKED, ())
    lines = TraceStatus(settled=True, graph_breaks=(broke,)).lines(pieces=0)
    assert f"    hint: {FASTPATH_HINT}" in lines
    assert not any("hint" in ln for ln in TraceStatus(settled=True).lines(pieces=0))
    assert not any("hint" in ln for ln in TraceStatus(settled=True, graph_breaks=(broke,)).lines(1))


class Recurrent(nn.Module):
    """An LSTM: dynamo does not trace RNN modules (`allow_rnn` off) and captures nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.rnn = nn.LSTM(WIDTH, WIDTH, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return out[:, -1]


def test_a_model_dynamo_captures_nothing_of_completes_its_empty_plan_and_says_why() -> None:
    # wait() waited for the plan of a model with no piece until its timeout (for ever
    # without one): an empty plan never completed.
    model = _model(Recurrent)
    reference = copy.deepcopy(model)
    with (
        pwd.attach(
            model, executor=FakeExecutor(), store=False, policy=FAST, trace="background"
        ) as handle,
        torch.inference_mode(),
    ):
        x = torch.randn(3, 5, WIDTH)
        torch.testing.assert_close(model(x), reference(x))
        assert handle.wait_traced(60)
        assert handle.wait(timeout=60), handle.status()
        status = handle.status()
    assert status.plan_complete and not handle.pieces
    text = str(status)
    assert "no graph captured: the model serves eager" in text
    assert "RNN, GRU, or LSTM" in text
