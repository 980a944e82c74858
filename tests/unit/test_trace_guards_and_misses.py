"""Capture: pieces told apart by guards, and inputs no piece serves yet.

Proves: a model that branches on its batch size gets a piece per branch, each serving
only the sizes its guards admit, and stays right whichever size comes first (BERT under
the backed strategy included); a configured size no piece serves is traced at its first
miss; the first call runs before the background trace starts, and a hot input no piece
serves is traced off the serving call, once, while a stray one (non-contiguous, needing
grad) runs eager until it is hot; a model warmed up while its module imports traces
without deadlock; collecting torch's warnings survives loggers made on another thread.
"""

from __future__ import annotations

import copy
import logging
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import Plain, trace_with
from torch import nn
from tracing import WIDTH, fresh_counters, make

import pwdaemon as pwd
from pwdaemon import Tier
from pwdaemon.serving import strategy as strategy_module
from pwdaemon.serving import trace as trace_module
from pwdaemon.serving.piece import wrap_compiled
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.serving.trace_record import MissState, RecompileCause

# ---- a model that branches on its batch size ---------------------------------------------


class Branchy(nn.Module):
    """Does something else at batch size 1: a guard no strategy may drop."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.lin(x)
        if x.shape[0] == 1:
            return h * 0 + 1
        return h


@pytest.mark.parametrize("order", [[4, 7, 1, 1, 1, 1, 1, 2, 1], [1, 4, 7, 1, 2, 1]])
def test_model_branching_on_its_batch_size_stays_correct(order: list[int]) -> None:
    # Unbacked (torch 2.12, 2.13): `u0 == 1` cannot be decided, dynamo breaks the graph
    # there and the branch runs as Python (the size-1 side becomes a piece of its own);
    # nothing assumes a size. Backed (2.11): a guard on the size routes size 1 to a piece
    # of its own. A compiled runnable installed for every size of each piece (here
    # the piece's own graph plus zero: any size's output must still be right).
    fresh_counters()
    model, reference = make(Branchy)
    with pwd.attach(model, compile=False, store=False) as handle, torch.no_grad():
        for i, n in enumerate(order):
            x = torch.randn(n, WIDTH)
            out = model(x)
            torch.testing.assert_close(out, reference(x))
            if n == 1:
                assert torch.equal(out, torch.ones(1, WIDTH))
            if i == 2:  # general runnables in place from here on
                for p in handle.pieces:
                    eager = p.gm.forward
                    handle.install(p.index, None, Tier.GENERAL, wrap_compiled(eager, p))
        tracer = handle._tracer
        assert all(p.strategy is strategy_module.ORDER[0] for p in handle.pieces)
        # size 1 ran compiled once its piece existed (traced while settling or as a hot
        # miss): misses, if any, were served eager and never more than hot_calls of them
        assert sum(r.calls for r in tracer.misses.values()) <= tracer.miss.hot_calls


def test_backed_oblivious_serves_bert_right_at_size_1_and_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The fallback strategy, on its own, on the model it falls back for on torch 2.11
    # CUDA (transformers' BERT): traced from a size-1 call, then sizes 2, 3 and 1 again,
    # every output equal to eager's (shape included: a graph that kept the hint 1 as a
    # constant would answer a batch of 2 with a batch of 1).
    pytest.importorskip("transformers")
    from pwdaemon.real_models import model_spec

    trace_with(monkeypatch, ShapeStrategy.BACKED_OBLIVIOUS)
    fresh_counters()
    spec = model_spec("bert", "tiny")
    cpu = torch.device("cpu")
    with torch.inference_mode():
        model = spec.build(cpu, torch.float32)
        reference = copy.deepcopy(model)
        with pwd.attach(model, compile=False, store=False) as handle:
            for n in (1, 2, 3, 1):
                args, kwargs = spec.inputs(n, cpu, torch.float32)
                got = model(*args, **kwargs).last_hidden_state
                want = reference(*args, **kwargs).last_hidden_state
                assert got.shape == want.shape, n
                torch.testing.assert_close(got, want)
            assert handle.pieces
            assert all(p.strategy is ShapeStrategy.BACKED_OBLIVIOUS for p in handle.pieces)


def test_each_piece_admits_the_sizes_its_guards_let_through(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Branchy under a backed strategy: the size-1 piece's guard pins the size to 1, the
    # other piece's excludes 1. The planner and wait() go by `admits`.
    trace_with(monkeypatch, ShapeStrategy.BACKED_OBLIVIOUS)
    fresh_counters()
    model, reference = make(Branchy)
    policy = pwd.PolicyConfig(hot_calls=1)
    with pwd.attach(model, compile=False, store=False, policy=policy) as handle:
        with torch.no_grad():
            for n in (1, 4, 4, 1):
                x = torch.randn(n, WIDTH)
                torch.testing.assert_close(model(x), reference(x))
        one = next(p for p in handle.pieces if 1 in p.dispatcher.counts)
        many = next(p for p in handle.pieces if 4 in p.dispatcher.counts)
        assert one is not many, str(handle.status())
        assert [n for n in (1, 2, 4, 9) if one.admits(n)] == [1]
        assert [n for n in (1, 2, 4, 9) if many.admits(n)] == [2, 4, 9]


def test_a_guard_that_does_not_evaluate_admits_the_size() -> None:
    import sympy

    from pwdaemon.serving.graph_facts import SIZE, admits

    odd = sympy.Function("Opaque")(SIZE) > 3  # stays symbolic after substitution
    assert admits((sympy.Eq(SIZE, 1),), 1)
    assert not admits((sympy.Eq(SIZE, 1),), 2)
    assert not admits((sympy.Ne(SIZE, 1), SIZE <= 8), 9)
    assert admits((odd,), 2)
    assert admits((), 5)


def test_a_configured_size_that_no_piece_serves_is_traced_at_its_first_miss(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under a backed strategy size 1 guards apart from the other sizes (Branchy's own
    # branch here, 0/1 specialisation in general): a size the user configured must not
    # wait for `hot_calls` misses to get its piece.
    trace_with(monkeypatch, ShapeStrategy.BACKED_OBLIVIOUS)
    fresh_counters()
    model, reference = make(Branchy)
    policy = pwd.PolicyConfig(hot_calls=10**9)
    with (
        pwd.attach(model, sizes=[1], compile=False, store=False, policy=policy) as handle,
        torch.no_grad(),
    ):
        for n in (4, 4, 1, 1, 1):  # traced at 4, settled by the second call: then 1 misses
            x = torch.randn(n, WIDTH)
            torch.testing.assert_close(model(x), reference(x))
        tracer = handle._tracer
        assert len(handle.pieces) == 2, str(handle.status())
        assert sum(r.calls for r in tracer.misses.values()) == 1  # then traced, then served
        assert all(1 in p.dispatcher.counts or 4 in p.dispatcher.counts for p in handle.pieces)


# ---- stray inputs earn their trace -------------------------------------------------------


def test_the_first_call_runs_before_the_background_trace_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The trace thread is made from the first call's inputs but started once that call
    # returned: the first request never shares the process with dynamo (Llama's first
    # call on an H200 took 1.9 s against eager's 0.43 s with the trace beside it).
    fresh_counters()
    model, reference = make(Plain)
    alive_during: list[list[str]] = []
    real = trace_module.call_eager

    def spy(*a: Any, **kw: Any) -> Any:
        alive_during.append([t.name for t in threading.enumerate() if t.is_alive()])
        return real(*a, **kw)

    monkeypatch.setattr(trace_module, "call_eager", spy)
    with pwd.attach(model, compile=False, store=False, trace="background") as handle:
        x = torch.randn(3, WIDTH)
        with torch.inference_mode():
            torch.testing.assert_close(model(x), reference(x))
        assert handle.wait_traced(60)
        assert handle.pieces, str(handle.status())
    assert alive_during and "pwdaemon-trace" not in alive_during[0], alive_during


def test_with_background_trace_a_hot_input_is_traced_off_the_serving_call() -> None:
    # trace="background": the call that makes a signature hot is served eager and the
    # trace runs on a thread of pwdaemon's (inline, that call paid the whole trace).
    fresh_counters()
    model, reference = make(Plain)
    with pwd.attach(model, compile=False, store=False, trace="background") as handle:
        with torch.inference_mode():
            model(torch.randn(2, WIDTH))
        assert handle.wait_traced(60)
        tracer = handle._tracer
        serving = threading.current_thread()
        traced_on: list[threading.Thread] = []
        real_trace_call = tracer.trace_call

        def spy(*a: Any, **kw: Any) -> Any:
            traced_on.append(threading.current_thread())
            return real_trace_call(*a, **kw)

        tracer.trace_call = spy  # type: ignore[method-assign]
        for _ in range(tracer.miss.hot_calls + 1):  # grad mode on: another signature
            with torch.enable_grad():
                x = torch.randn(3, WIDTH)
                torch.testing.assert_close(model(x), reference(x))
        assert tracer.miss.traced.wait(60)
        (record,) = tracer.misses.values()
        assert record.state is MissState.TRACED, record
        assert traced_on and serving not in traced_on
        assert len(handle.pieces) == 2
        with torch.enable_grad():
            x = torch.randn(5, WIDTH)
            torch.testing.assert_close(model(x), reference(x))
        assert record.calls == tracer.miss.hot_calls + 1  # served by the new piece since


def _settled_on_one_piece(handle: pwd.Handle, model: nn.Module) -> trace_module.Tracer:
    """Calls of sizes 2 and 3 under inference mode: the tracer, settled on one piece."""
    with torch.inference_mode():
        for n in (2, 3):
            model(torch.randn(n, WIDTH))
    tracer = handle._tracer
    assert tracer.settled and len(handle.pieces) == 1
    return tracer


def test_a_hot_input_served_by_a_piece_traced_since_is_not_left_eager(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Two signatures (grad mode on, n=1 and n>1) both hot before either is traced: the
    # piece traced for the first serves the second, whose trace then captures nothing.
    # That is not an input left eager (it was reported as one, with a warning).
    fresh_counters()
    model, reference = make(Plain)
    with pwd.attach(model, compile=False, store=False, trace="inline") as handle:
        tracer = _settled_on_one_piece(handle, model)
        hot = tracer.miss.hot_calls
        with torch.enable_grad():
            for n in (1, 3):
                for _ in range(hot):
                    model(torch.randn(n, WIDTH))
            assert len(tracer.miss.hot) == 2, tracer.misses
            with caplog.at_level(logging.INFO, logger="pwdaemon"):
                for n in (1, 3):  # each hot signature's next call is traced
                    x = torch.randn(n, WIDTH)
                    torch.testing.assert_close(model(x), reference(x))
        states = {r.signature.split()[0]: r.state for r in tracer.misses.values()}
        assert states == {"n=1": MissState.TRACED, "n>1": MissState.SERVED}, states
        assert len(handle.pieces) == 2
        assert "stays eager" not in caplog.text and "served by a piece" in caplog.text
        with torch.enable_grad():
            x = torch.randn(5, WIDTH)
            torch.testing.assert_close(model(x), reference(x))
        assert tracer.miss_calls == 2 * hot  # served by piece 1 since


@pytest.mark.parametrize("kind", ["non-contiguous", "grad"])
def test_stray_input_runs_eager_until_hot_then_is_traced_once(kind: str) -> None:
    fresh_counters()
    model, reference = make(Plain)

    def stray(n: int) -> torch.Tensor:
        return torch.randn(WIDTH, n).t() if kind == "non-contiguous" else torch.randn(n, WIDTH)

    def call(x: torch.Tensor) -> torch.Tensor:
        if kind == "grad":
            with torch.enable_grad():
                return model(x)
        with torch.inference_mode():
            return model(x)

    with pwd.attach(model, compile=False, store=False) as handle:
        tracer = _settled_on_one_piece(handle, model)
        hot = tracer.miss.hot_calls
        for _ in range(hot):
            x = stray(5)
            torch.testing.assert_close(call(x), reference(x))
            assert len(handle.pieces) == 1  # served eager: no piece, no compile
        (record,) = tracer.misses.values()
        assert record.calls == hot and record.state is MissState.HOT
        assert ("strided" in record.signature) == (kind == "non-contiguous")
        assert ("grad=1" in record.signature) == (kind == "grad")
        x = stray(6)  # the next call of the hot signature is traced
        torch.testing.assert_close(call(x), reference(x))
        assert len(handle.pieces) == 2 and record.state is MissState.TRACED
        (recompile,) = tracer.recompiles
        assert recompile.cause is RecompileCause.HOT_SIGNATURE
        assert recompile.pieces == (1,)
        x = stray(7)
        torch.testing.assert_close(call(x), reference(x))
        assert record.calls == hot and tracer.miss_calls == hot  # served by piece 1
        assert handle.pieces[1].dispatcher.histogram() == {6: 1, 7: 1}
        with torch.inference_mode():  # the normal path is untouched
            model(torch.randn(4, WIDTH))
        assert handle.pieces[0].dispatcher.histogram() == {2: 1, 3: 1, 4: 1}


_IMPORTED_APP = """
import torch
from torch import nn
import pwdaemon as pwd


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x):
        return torch.relu(self.lin(x))


model = Net().eval()
handle = pwd.attach(model, compile=False, store=False, trace="background")
with torch.no_grad():
    model(torch.randn(3, 8))
TRACED = handle.wait_traced(20)  # at import time, as a gunicorn app's warm-up may
PIECES = len(handle.pieces)
handle.detach()
"""


def test_a_model_warmed_up_while_its_module_imports_is_traced_without_deadlock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Dynamo imports the traced code's module on the trace thread: while the module is
    # being imported that blocks, so a wait at import time deadlocked (a gunicorn worker
    # waited out its timeout). The first call at import time traces inline instead.
    (tmp_path / "imported_app.py").write_text(_IMPORTED_APP)
    monkeypatch.syspath_prepend(str(tmp_path))
    fresh_counters()
    import importlib

    app = importlib.import_module("imported_app")
    assert app.TRACED is True and app.PIECES == 1


def test_collecting_torch_warnings_survives_loggers_created_on_another_thread(
    fast_switching: None,
) -> None:
    # Inductor's imports on the loader's set-up thread create loggers while the trace
    # thread starts collecting torch's warnings; listing the logger table in Python
    # raised "dictionary changed size during iteration" there, and the failed background
    # trace left the next serving call to trace inline (a 4.3 s BERT call).
    from pwdaemon.serving.trace_record import TorchWarnings

    for i in range(300):
        logging.getLogger(f"torch.pwdaemon_test.existing_{i}")
    stop = threading.Event()

    def create_loggers() -> None:
        i = 0
        while not stop.is_set():
            logging.getLogger(f"pwdaemon_test_new_{i}")
            i += 1

    creator = threading.Thread(target=create_loggers)
    creator.start()
    try:
        for _ in range(30):
            with TorchWarnings():
                pass
    finally:
        stop.set()
        creator.join(10)
