"""A saved trace: stored when a background trace settles as one graph, loaded by the next
attach of the same model instead of tracing, and refused whenever it could be wrong.

Real dynamo, real precompile, a real store on disk; compile=False (no Inductor: the
graph tier serves, so outputs are the traced graph's own).
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import Broken, SmallMLP, trace_with
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.saved_trace import SavedTraceOutcome, process_state

TOLERANCE = 1e-5  # the graph tier runs the traced FX graph: the same ops as eager


def _attach(model: torch.nn.Module, store: Path, **kwargs: object) -> pwd.Handle:
    return pwd.attach(model, store=store, compile=False, trace="background", **kwargs)  # type: ignore[arg-type]


def _first_call(h: pwd.Handle, model: torch.nn.Module, x: torch.Tensor) -> None:
    model(x)
    assert h.wait_traced(120)


def _mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return SmallMLP().eval()


def _outcome(h: pwd.Handle) -> tuple[SavedTraceOutcome, str]:
    trace = h.status().trace
    return trace.saved_trace, trace.saved_trace_detail


def _frames() -> int:
    return int(torch._dynamo.utils.counters["frames"]["total"])


@pytest.fixture
def saved(tmp_path: Path) -> Iterator[Path]:
    """A store holding SmallMLP's saved trace (traced with the weights of seed 0)."""
    store = tmp_path / "store"
    model = _mlp(0)
    h = _attach(model, store)
    try:
        _first_call(h, model, torch.randn(4, 16))
        outcome, detail = _outcome(h)
        assert outcome is SavedTraceOutcome.SAVED, detail
    finally:
        h.detach()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield store


def test_a_restart_loads_the_saved_trace_instead_of_tracing(saved: Path) -> None:
    model = _mlp(1)  # other weights: a restart loads new ones into the same model
    reference = copy.deepcopy(model)
    h = _attach(model, saved)
    try:
        _first_call(h, model, torch.randn(4, 16))
        outcome, detail = _outcome(h)
        assert outcome is SavedTraceOutcome.LOADED, detail
        assert _frames() == 0  # dynamo traced nothing
        for n in (1, 3, 4, 17):
            x = torch.randn(n, 16)
            assert torch.allclose(model(x), reference(x), atol=TOLERANCE)
        assert {1, 3, 17} <= set(h.dispatchers[0].counts)  # the loaded piece served them
        trace = h.status().trace
        assert trace.miss_calls == 0
        # Served by the loaded graph itself, not by the plain module after it raised (a
        # loaded graph without `forward` did, and every output above was still right).
        assert trace.error_calls == 0, trace.errors_by_type
    finally:
        h.detach()


def test_a_loaded_piece_serves_a_graph_without_metadata_and_ships_the_stored_one(
    saved: Path,
) -> None:
    # The restart unpickles no fake tensors: the eager graph carries no metadata, and
    # what a compile worker would get is the stored graph as it was stored.
    from pwdaemon.workers.shipping import load_graph

    model = _mlp(1)
    h = _attach(model, saved)
    try:
        _first_call(h, model, torch.randn(4, 16))
        assert _outcome(h)[0] is SavedTraceOutcome.LOADED
        (piece,) = h.pieces
        assert all(not node.meta for node in piece.gm.graph.nodes)
        assert piece.device == "cpu" and piece.shipped is not None
        shipped, _ = load_graph(piece.shipped)
        assert shipped.code == piece.gm.code
        values = [n.meta.get("example_value") for n in shipped.graph.nodes if n.op == "placeholder"]
        assert any(isinstance(v, torch.Tensor) for v in values)  # what a compile needs
    finally:
        h.detach()


def test_a_call_the_saved_guards_refuse_runs_through_dynamo(saved: Path) -> None:
    model = _mlp(1)
    reference = copy.deepcopy(model)
    h = _attach(model, saved)
    try:
        _first_call(h, model, torch.randn(4, 16))
        assert _outcome(h)[0] is SavedTraceOutcome.LOADED
        x = torch.randn(2, 5, 16)  # another rank: the saved tensor guards refuse it
        assert torch.allclose(model(x), reference(x), atol=TOLERANCE)
        assert h.status().trace.miss_calls == 1  # served eager by dynamo's path, counted
    finally:
        h.detach()


def test_training_mode_set_after_the_load_leaves_the_saved_trace(saved: Path) -> None:
    model = _mlp(1)
    reference = copy.deepcopy(model).train()
    h = _attach(model, saved)
    try:
        _first_call(h, model, torch.randn(4, 16))
        assert _outcome(h)[0] is SavedTraceOutcome.LOADED
        model.train()  # the saved guards do not see module state: checked beside them
        x = torch.randn(4, 16)
        assert torch.allclose(model(x), reference(x), atol=TOLERANCE)
        assert h.status().trace.miss_calls == 1
    finally:
        h.detach()


def test_a_corrupt_saved_trace_is_traced_again_and_replaced(saved: Path) -> None:
    (path,) = (saved / "profiles").glob("*.trace")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    model = _mlp(1)
    h = _attach(model, saved)
    try:
        _first_call(h, model, torch.randn(4, 16))
        outcome, detail = _outcome(h)
        assert outcome is SavedTraceOutcome.SAVED, detail  # ignored, traced, saved anew
        assert _frames() > 0
    finally:
        h.detach()


def test_another_thread_count_traces_again_and_keeps_both_saved_traces(saved: Path) -> None:
    # The saved guards check torch's thread count on every call: loaded under another
    # count, the trace would refuse every call.
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        model = _mlp(1)
        h = _attach(model, saved)
        try:
            _first_call(h, model, torch.randn(4, 16))
            outcome, detail = _outcome(h)
            assert outcome is SavedTraceOutcome.SAVED, detail
            assert _frames() > 0
        finally:
            h.detach()
    finally:
        torch.set_num_threads(threads)
    assert len(list((saved / "profiles").glob("*.trace"))) == 2


def test_the_saved_trace_key_holds_process_settings_not_a_calls_grad_mode() -> None:
    threads = torch.get_num_threads()
    state = process_state()
    with torch.no_grad():
        assert process_state() == state
    torch.set_num_threads(threads + 1)
    try:
        assert process_state() != state
    finally:
        torch.set_num_threads(threads)


def test_a_saved_trace_others_could_write_is_refused(saved: Path) -> None:
    (path,) = (saved / "profiles").glob("*.trace")
    os.chmod(path, 0o660)
    model = _mlp(1)
    reference = copy.deepcopy(model)
    h = _attach(model, saved)
    try:
        _first_call(h, model, torch.randn(4, 16))
        outcome, detail = _outcome(h)
        # Refused and traced instead; the trace it saves replaces the file.
        assert outcome is SavedTraceOutcome.SAVED and "writable by group" in detail, detail
        assert _frames() > 0
        x = torch.randn(3, 16)
        assert torch.allclose(model(x), reference(x), atol=TOLERANCE)
    finally:
        h.detach()
    assert os.stat(path).st_mode & 0o077 == 0


def test_saved_trace_false_neither_loads_nor_saves(saved: Path) -> None:
    model = _mlp(1)
    h = _attach(model, saved, saved_trace=False)
    try:
        _first_call(h, model, torch.randn(4, 16))
        assert _outcome(h)[0] is SavedTraceOutcome.NONE
        assert _frames() > 0
    finally:
        h.detach()


def test_a_model_with_a_graph_break_is_not_saved(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = Broken().eval()
    h = _attach(model, tmp_path / "store")
    try:
        _first_call(h, model, torch.randn(4, 8))
        outcome, detail = _outcome(h)
        assert outcome is SavedTraceOutcome.NOT_SAVED and "2 piece(s)" in detail, detail
        assert "saved trace: not saved" in str(h.status())
    finally:
        h.detach()
    assert not list((tmp_path / "store" / "profiles").glob("*.trace"))


def test_without_a_store_nothing_is_said_of_a_saved_trace(tmp_path: Path) -> None:
    # No shelf: the settled trace is not copied for a save, nor reported as not saved.
    torch.manual_seed(0)
    model = Broken().eval()
    h = pwd.attach(model, store=False, compile=False, trace="background")
    try:
        _first_call(h, model, torch.randn(4, 8))
        assert len(h.pieces) == 2
        assert _outcome(h) == (SavedTraceOutcome.NONE, "")
        assert "saved trace" not in str(h.status())
    finally:
        h.detach()


def _backed_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Trace with the backed strategy alone (torch < 2.13's only one)."""
    from pwdaemon.serving.strategy import ShapeStrategy

    trace_with(monkeypatch, ShapeStrategy.BACKED_OBLIVIOUS)


class TwoInputs(nn.Module):
    """Two inputs of the call's size that no op makes equal: under the backed strategy
    each has a size symbol of its own (as BERT's input_ids and attention_mask on a GPU,
    where the unbacked strategy fails)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * mask.mean()


def test_a_loaded_piece_has_the_size_symbols_of_the_piece_that_was_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Read from the graph precompile traces (no marked example inputs on it), the second
    # input's symbol looked like another dynamic size: the restart's piece was served on
    # the general tier alone, with no size compiles and no CUDA graphs.
    _backed_only(monkeypatch)
    store = tmp_path / "store"
    torch.manual_seed(0)
    model = TwoInputs().eval()
    call = (torch.randn(4, 16), torch.randn(4, 3))
    h = _attach(model, store)
    try:
        model(*call)
        assert h.wait_traced(120)
        assert _outcome(h)[0] is SavedTraceOutcome.SAVED, _outcome(h)
        (traced,) = h.pieces
        assert len(traced.size_symbols) == 2 and traced.specializable, traced.facts
    finally:
        h.detach()
    torch._dynamo.reset()
    h = _attach(model, store)
    try:
        model(*call)
        assert h.wait_traced(120)
        assert _outcome(h)[0] is SavedTraceOutcome.LOADED, _outcome(h)
        (loaded,) = h.pieces
        assert loaded.facts == traced.facts
        assert loaded.specializable and not loaded.extra_symbols
        x, mask = torch.randn(5, 16), torch.randn(5, 3)
        assert torch.allclose(model(x, mask), model.lin(x) * mask.mean(), atol=TOLERANCE)
    finally:
        h.detach()


class OwnSizeOne(nn.Module):
    """A model whose trace at size 1 holds a guard `size == 1` under the backed
    strategy (as transformers' attention does on a GPU): larger sizes get a second
    piece, traced when they come often."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y * 2 if x.shape[0] == 1 else y


def _until_two_pieces(h: pwd.Handle, model: nn.Module) -> None:
    # Size 4 misses the size-1 piece until it is hot; its trace runs on a thread.
    for _ in range(50):
        model(torch.randn(4, 16))
        if len(h.pieces) == 2:
            break
        h._tracer.miss.traced.wait(10)
    assert h._tracer.miss.traced.wait(60) and len(h.pieces) == 2


def test_a_piece_a_later_input_adds_is_saved_and_a_restart_loads_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _backed_only(monkeypatch)
    store = tmp_path / "store"
    torch.manual_seed(0)
    model = OwnSizeOne().eval()
    h = _attach(model, store)
    try:
        _first_call(h, model, torch.randn(1, 16))
        _until_two_pieces(h, model)
        outcome, detail = _outcome(h)
        assert outcome is SavedTraceOutcome.SAVED and "piece 1's trace saved" in detail, detail
        traced = [p.facts for p in h.pieces]
        assert traced[0].size_guards != traced[1].size_guards  # size 1, and the others
    finally:
        h.detach()
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    h = _attach(model, store)
    try:
        _first_call(h, model, torch.randn(1, 16))
        outcome, detail = _outcome(h)
        assert outcome is SavedTraceOutcome.LOADED and detail.startswith("2 traces"), detail
        assert [p.facts for p in h.pieces] == traced
        for n in (1, 4, 1, 9):
            x = torch.randn(n, 16)
            want = model.lin(x) * (2 if n == 1 else 1)
            assert torch.allclose(model(x), want, atol=TOLERANCE)
        assert _frames() == 0  # neither piece traced again
        assert h.status().trace.miss_calls == 0
        assert set(h.dispatchers[0].counts) == {1} and set(h.dispatchers[1].counts) == {4, 9}
    finally:
        h.detach()


MODULE = """
import torch
from torch import nn


class Changing(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.lin(x)) {op}
"""


def test_a_changed_forward_is_traced_again_not_served_from_the_old_trace(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The store key holds the class name and the weights' shapes, not the code: a new
    # deployment with the same weights but another forward must not serve the old graph.
    source = tmp_path / "changing_model.py"
    source.write_text(MODULE.format(op="* 2"))
    monkeypatch.syspath_prepend(str(tmp_path))
    store = tmp_path / "store"
    module = importlib.import_module("changing_model")
    model = module.Changing().eval()
    h = _attach(model, store)
    try:
        _first_call(h, model, torch.randn(4, 8))
        assert _outcome(h)[0] is SavedTraceOutcome.SAVED
    finally:
        h.detach()
    torch._dynamo.reset()
    source.write_text(MODULE.format(op="* 3"))  # same lines, other code
    del sys.modules["changing_model"]
    module = importlib.import_module("changing_model")
    model = module.Changing().eval()
    h = _attach(model, store)
    try:
        _first_call(h, model, torch.randn(4, 8))
        outcome, detail = _outcome(h)
        assert outcome is SavedTraceOutcome.SAVED, detail  # refused, traced, saved anew
        assert "changed since the trace was saved" in detail, detail
        x = torch.randn(5, 8)
        assert torch.allclose(model(x), torch.relu(model.lin(x)) * 3, atol=TOLERANCE)
    finally:
        h.detach()
        sys.modules.pop("changing_model", None)


def test_a_trace_saved_by_another_process_meanwhile_adds_no_second_piece(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two replicas start together: this one finds nothing stored and traces; the other
    # saves its trace meanwhile. The next settling step must not load it beside the
    # piece already traced (CI: every key of the model then loaded twice).
    from pwdaemon.engine.saved_traces import StoredTraces

    load = StoredTraces.load
    tries: list[bool] = []

    def not_yet(self: StoredTraces, index: int) -> object:
        tries.append(True)
        return None if len(tries) == 1 else load(self, index)

    monkeypatch.setattr(StoredTraces, "load", not_yet)
    model = _mlp(1)
    h = _attach(model, saved)
    try:
        _first_call(h, model, torch.randn(4, 16))
        assert len(h.pieces) == 1 and len(tries) == 1
        assert _outcome(h)[0] is SavedTraceOutcome.SAVED
    finally:
        h.detach()


def test_a_trace_saved_with_the_fallback_strategy_is_loaded_and_the_fallback_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A conv net's unbacked trace captures nothing, which is not remembered (it can
    # depend on the first call's inputs): each warm restart traced unbacked for nothing,
    # then backed again, because its saved trace (backed) was not this run's strategy.
    from pwdaemon.serving.strategy import ShapeStrategy
    from pwdaemon.serving.trace_record import AttemptOutcome

    store = tmp_path / "store"
    _backed_only(monkeypatch)  # what the fall-back leaves the first run with
    model = _mlp(0)
    h = _attach(model, store)
    try:
        _first_call(h, model, torch.randn(4, 16))
        assert _outcome(h)[0] is SavedTraceOutcome.SAVED, _outcome(h)
    finally:
        h.detach()
    # the next start begins with the unbacked strategy again
    trace_with(monkeypatch, ShapeStrategy.UNBACKED, ShapeStrategy.BACKED_OBLIVIOUS)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    model = _mlp(1)
    reference = copy.deepcopy(model)
    h = _attach(model, store)
    try:
        _first_call(h, model, torch.randn(4, 16))
        outcome, detail = _outcome(h)
        assert outcome is SavedTraceOutcome.LOADED, detail
        assert _frames() == 0  # dynamo traced nothing, with either strategy
        trace = h.status().trace
        assert [(a.strategy, a.outcome) for a in trace.attempts] == [
            (ShapeStrategy.UNBACKED, AttemptOutcome.SKIPPED),
            (ShapeStrategy.BACKED_OBLIVIOUS, AttemptOutcome.ACTIVE),
        ], trace.attempts
        assert "saved trace is backed_oblivious" in (trace.attempts[0].reason or "")
        assert h.pieces[0].strategy is ShapeStrategy.BACKED_OBLIVIOUS
        for n in (1, 3, 17):
            x = torch.randn(n, 16)
            assert torch.allclose(model(x), reference(x), atol=TOLERANCE)
        assert h.status().trace.miss_calls == 0
    finally:
        h.detach()


@pytest.mark.usefixtures("both_strategies")  # before `saved`: its trace is unbacked
def test_a_trace_saved_with_a_strategy_this_run_skips_is_traced_again(saved: Path) -> None:
    # The fixture's trace is unbacked; this start skips unbacked (remembered as failed
    # for the model), so it traces with the fallback instead of serving the old trace.
    from pwdaemon.engine.store_link import StoreLink, model_id
    from pwdaemon.serving.strategy import ShapeStrategy
    from pwdaemon.store import ArtifactStore

    model = _mlp(1)
    link = StoreLink(ArtifactStore(saved), {})
    link.remember_failed_strategy(model_id(model, None), ShapeStrategy.UNBACKED, "a test's")
    h = _attach(model, saved)
    try:
        _first_call(h, model, torch.randn(4, 16))
        outcome, detail = _outcome(h)
        assert outcome is SavedTraceOutcome.SAVED, detail
        assert "saved with strategy unbacked, this run traces with backed_oblivious" in detail
        assert h.pieces[0].strategy is ShapeStrategy.BACKED_OBLIVIOUS
    finally:
        h.detach()
