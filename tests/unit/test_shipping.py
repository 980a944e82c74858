"""Shipping a graph piece to a worker: node metadata that does not pickle is dropped,
a graph that cannot be pickled is named with the reason, and the engine gives it up; the
piece's size guards travel with it, and a compile the worker refuses is given up too."""

from __future__ import annotations

import weakref
from typing import Any

import pytest
import torch
from recorded import MLP, Recorded, capture, meta_snapshot, record_mlp
from torch import nn

from pwdaemon.workers.shipping import (
    SHIPPED_META,
    UnshippableGraphError,
    dump_graph,
    dump_plain_graph,
    load_plain_graph,
)


@pytest.fixture
def mlp_graph() -> Recorded:
    return record_mlp()


def test_unpicklable_metadata_is_dropped_and_the_live_graph_is_untouched(
    mlp_graph: Recorded,
) -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    (gm,) = mlp_graph.gms
    for node in gm.graph.nodes:  # what transformers' models leave in node metadata
        node.meta["tensor_dict"] = {"cache": weakref.WeakValueDictionary()}
    with pytest.raises(Exception, match="pickle"):
        GraphPickler.dumps(gm)
    before = meta_snapshot(gm)
    code_before = gm.code
    data = dump_graph(gm, "MLP graph 0")
    assert meta_snapshot(gm) == before and gm.code == code_before
    shipped = GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv()))
    assert isinstance(shipped, torch.fx.GraphModule)
    live_nodes, shipped_nodes = list(gm.graph.nodes), list(shipped.graph.nodes)
    assert [n.op for n in shipped_nodes] == [n.op for n in live_nodes]
    assert [str(n.target) for n in shipped_nodes] == [str(n.target) for n in live_nodes]
    for live, ship in zip(live_nodes, shipped_nodes, strict=True):
        assert set(ship.meta) == {k for k in SHIPPED_META if k in live.meta}
        v, w = live.meta.get("example_value"), ship.meta.get("example_value")
        if isinstance(v, torch.Tensor):
            assert isinstance(w, torch.Tensor)
            assert (str(w.shape), w.stride(), w.dtype) == (str(v.shape), v.stride(), v.dtype)


class _Hooked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        # A submodule attribute that does not pickle.
        object.__setattr__(self.lin, "callback", lambda: None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def test_a_graph_that_cannot_be_shipped_is_named_with_the_reason() -> None:
    gm = torch.fx.symbolic_trace(_Hooked())  # call_module: the submodule ships with it
    with pytest.raises(UnshippableGraphError) as info:
        dump_graph(gm, "graph piece 3 of hooked-1")
    message = str(info.value)
    assert message.startswith("graph piece 3 of hooked-1 cannot be shipped to a compile worker")
    assert "pickle" in message and "lambda" in message


def test_the_engine_gives_up_on_an_unshippable_piece_at_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pwdaemon as pwd
    from pwdaemon.testing import FakeExecutor
    from pwdaemon.workers import shipping

    dumps: list[str] = []

    def refuse(
        gm: torch.fx.GraphModule,
        name: str = "graph",
        size_guards: tuple[object, ...] = (),
        size_symbols: tuple[str, ...] = (),
    ) -> bytes:
        dumps.append(name)
        raise UnshippableGraphError(f"{name} cannot be shipped to a compile worker: test")

    monkeypatch.setattr(shipping, "dump_graph", refuse)  # what `graph_for_worker` calls
    torch.manual_seed(0)
    model, ex = MLP().eval(), FakeExecutor()
    policy = pwd.PolicyConfig(hot_calls=1, tick_s=0.01)
    h = pwd.attach(model, sizes=[2, 4], policy=policy, executor=ex, store=False)
    try:
        x = torch.randn(2, 16)
        expected = model._call_impl(x)
        torch.testing.assert_close(model(x), expected)
        # Given up, not retried: with no timeout, wait() returns only because every
        # wanted size was given up (were it still pending, pytest's timeout would fail).
        assert h.wait(sizes=[2, 4], timeout=None) is False
        # wait() answers at the first size given up; the piece's other jobs are given up
        # one after another on the loop (a loaded CI machine saw one still queued here).
        assert h.wait(timeout=None)  # the plan completes: every planned job ended
        entries = {e.target: e for e in h.status().pieces[0].entries}
        for label in ("general", "size:2", "size:4"):
            assert entries[label].state == "failed", h.status()
            assert entries[label].attempts == 1
            assert "cannot be shipped to a compile worker" in (entries[label].reason or "")
        assert len(dumps) == 1 and dumps[0].startswith("graph piece 0 of ")
        assert ex.jobs == []  # nothing reached the executor
        torch.testing.assert_close(model(x), expected)  # serving goes on, eager
    finally:
        h.detach()


@pytest.mark.parametrize(
    ("guard", "general", "range_1_8", "open_above_1"),
    [
        (None, (1, 2, 3, 17), (1, 2, 8), (2, 3, 17)),
        ("eq1", (1,), (1,), ()),
        ("ne1", (2, 3, 17), (2, 8), (2, 3, 17)),
    ],
)
def test_a_general_compile_is_checked_only_at_sizes_the_pieces_guards_admit(
    mlp_graph: Recorded,
    guard: str | None,
    general: tuple[int, ...],
    range_1_8: tuple[int, ...],
    open_above_1: tuple[int, ...],
) -> None:
    # A piece dynamo guarded to size 1 compiles, rightly, for size 1: its guards travel
    # in the graph's bytes and the worker probes only the sizes they let through. The
    # range open above 1 that replaces a general is probed at a general's sizes, not at
    # its end (2**31 - 1), where Inductor's 32-bit indexing guard fails for any model.
    import sympy
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from pwdaemon.engine.runner import ABOVE_ONE_RANGE
    from pwdaemon.serving.graph_facts import SIZE
    from pwdaemon.serving.range_table import Target, TargetKind
    from pwdaemon.workers.compiler import _probe_sizes

    guards = {None: (), "eq1": (sympy.Eq(SIZE, 1),), "ne1": (sympy.Ne(SIZE, 1),)}[guard]
    (gm,) = mlp_graph.gms
    shipped = GraphPickler.loads(
        dump_graph(gm, "MLP graph 0", guards), FakeTensorMode(shape_env=ShapeEnv())
    )
    assert isinstance(shipped, torch.fx.GraphModule)
    assert _probe_sizes(shipped, Target.general()) == general
    assert _probe_sizes(shipped, Target(TargetKind.RANGE, 1, 8)) == range_1_8
    assert _probe_sizes(shipped, Target.of_range(ABOVE_ONE_RANGE)) == open_above_1


def test_a_general_the_worker_refused_is_given_up_at_once_as_rejected(
    mlp: nn.Module, reference: nn.Module
) -> None:
    # A worker refuses a general whose guards pin the size (its reason starts with the
    # error's name); a retry would compile the same graph to the same answer.
    import pwdaemon as pwd
    from pwdaemon.config import CompileConfig
    from pwdaemon.serving.range_table import TargetKind
    from pwdaemon.testing import FakeExecutor
    from pwdaemon.workers.compiler import JobSpec, SpecializedCompileError
    from pwdaemon.workers.process import CompileError

    class PinningExecutor(FakeExecutor):
        def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
            if spec.target.kind is TargetKind.GENERAL:
                self.jobs.append(spec.target)
                raise CompileError(
                    "failed",
                    f"{SpecializedCompileError.__name__}: the general compile holds for some"
                    " sizes only (guard Eq(s0, 1) (false at size 2)); not kept",
                )
            return super().run(spec, timeout)

    ex = PinningExecutor()
    policy = pwd.PolicyConfig(hot_calls=2, tick_s=0.01)
    compiler = CompileConfig(workers=1, backoff_s=0.01, retries=2)
    h = pwd.attach(mlp, sizes=[4], policy=policy, compiler=compiler, executor=ex, store=False)
    try:
        mlp(torch.randn(4, 16))
        assert h.wait(sizes=[4], timeout=20)
        assert h.wait(timeout=20)  # the plan ends: the general is given up, not queued
        entry = next(e for e in h.status().pieces[0].entries if e.target == "general")
        assert entry.state == "failed" and entry.attempts == 1, entry
        assert (entry.reason or "").startswith("rejected after 1 attempt: Specialized"), entry
        assert [t.label for t in ex.jobs].count("general") == 1
        x = torch.randn(3, 16)  # no general: size 3 stays on eager, and right
        torch.testing.assert_close(mlp(x), reference(x))
    finally:
        h.detach()


class GuardsBatch1(nn.Module):
    """The same ops at every size, behind a branch on size 1 (a guard, no graph change)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.lin(x))
        if x.shape[0] == 1:
            return y * 2.0
        return y * 2.0


def test_pieces_of_one_graph_that_different_sizes_reach_get_different_store_keys(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under the backed strategy BERT on an H200 got a piece for size 1 and one for sizes
    # above 1 with one graph; the second loaded the first's general (rightly compiled for
    # size 1 alone) from the store under the same key, and validation rejected it
    # ("mat1 and mat2 shapes cannot be multiplied"), leaving sizes above 1 on eager. The
    # guards are part of the fingerprint, and the service computes the same one from the
    # shipped bytes.
    from conftest import trace_with

    import pwdaemon as pwd
    from pwdaemon.service.client import graph_identity
    from pwdaemon.serving.strategy import ShapeStrategy

    trace_with(monkeypatch, ShapeStrategy.BACKED_OBLIVIOUS)
    model = GuardsBatch1()
    with torch.inference_mode(), pwd.attach(model, compile=False, store=False) as h:
        for n in (1, 2, 2, 3):
            model(torch.randn(n, 8))
        assert len(h.pieces) == 2, str(h.status())
        one, other = sorted(h.pieces, key=lambda p: 1 not in p.dispatcher.counts)
        assert one.gm.code == other.gm.code
        assert one.size_guards and other.size_guards, (one.size_guards, other.size_guards)
        assert one.fingerprint != other.fingerprint
        for piece in (one, other):
            shipped = dump_graph(piece.gm, f"piece {piece.index}", piece.size_guards)
            assert graph_identity(shipped)[0] == piece.fingerprint


def test_a_piece_that_one_size_alone_reaches_gets_that_size_in_the_generals_place(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Its general would be compiled at size 1 and may hold for size 1 alone; Inductor's
    # caches key on the graph, not on the guards in front of it, and handed that code to
    # the other piece's general (an H200: BERT's general for sizes above 1 was wrong).
    from conftest import trace_with

    import pwdaemon as pwd
    from pwdaemon.serving.strategy import ShapeStrategy
    from pwdaemon.testing import FakeExecutor

    trace_with(monkeypatch, ShapeStrategy.BACKED_OBLIVIOUS)
    model = GuardsBatch1()
    policy = pwd.PolicyConfig(tick_s=0.01)
    with (
        torch.inference_mode(),
        pwd.attach(model, policy=policy, executor=FakeExecutor(), store=False) as h,
    ):
        for n in (1, 2, 2, 3):
            model(torch.randn(n, 8))
        assert h.wait_traced(30) and len(h.pieces) == 2, str(h.status())
        assert h.wait(timeout=30), str(h.status())
        one = next(p for p in h.pieces if 1 in p.dispatcher.counts)
        assert one.only_size == 1
        targets = {
            s.graph: {e.target: e.why.value for e in s.entries if e.target != "eager"}
            for s in h.status().pieces
        }
        other = next(p.index for p in h.pieces if p is not one)
        assert targets[one.index] == {"size:1": "general"}, targets
        assert targets[other]["general"] == "general", targets


def test_graphs_ship_and_load_on_several_threads_at_once(
    mlp_graph: Recorded, fast_switching: None
) -> None:
    # GraphPickler registers `slice` as a pytree node around each dumps/loads and takes it
    # off after: two at once on two threads (two workers' jobs) took it off under each
    # other, and a size failed to ship with "KeyError: <class 'slice'>" (CI).
    import threading

    from pwdaemon.workers.shipping import load_graph

    (gm,) = mlp_graph.gms
    errors: list[BaseException] = []
    start = threading.Barrier(4, timeout=30)

    def ship() -> None:
        try:
            start.wait()
            for _ in range(15):
                shipped, _ = load_graph(dump_graph(gm, "MLP graph 0"))
                assert [n.op for n in shipped.graph.nodes] == [n.op for n in gm.graph.nodes]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=ship) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads)
    assert errors == [], errors[:1]


class _Pooled(nn.Module):
    """Pools over a second dim that varies beside the size (a transformer's length)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).mean(1)


def test_a_graph_with_a_second_dynamic_dim_ships_which_symbol_is_the_size() -> None:
    # Dynamo's automatic dynamic makes a second dim that varies dynamic too. The worker
    # took every SymInt input for the size and equated the length with the batch: the
    # general of such a piece failed in Inductor (BERT, GPT-2, Llama sized on the batch
    # with lengths that vary). The graph now names its size symbols.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from pwdaemon.serving.graph_facts import analyse_graph
    from pwdaemon.workers.compiler import _size_exprs

    torch.manual_seed(0)
    model = _Pooled().eval()
    xs = [torch.randn(2, 5, 16), torch.randn(3, 9, 16)]
    for x in xs:
        torch._dynamo.mark_dynamic(x, 1)
    (gm,) = capture(lambda x: model(x), [{"x": x} for x in xs]).gms
    facts = analyse_graph(gm)
    assert facts.size_symbols == (facts.size_symbol,) and len(facts.extra_symbols) == 1
    for names, want in (((), 2), (facts.size_symbols, 1)):
        data = dump_graph(gm, "pooled", facts.size_guards, names)
        shipped = GraphPickler.loads(data, FakeTensorMode(shape_env=ShapeEnv()))
        assert isinstance(shipped, torch.fx.GraphModule)
        assert len(_size_exprs(shipped)) == want, names  # without names: every symbol
        if names:
            assert [str(e) for e in _size_exprs(shipped)] == list(facts.size_symbols)
            again = analyse_graph(shipped)  # the service reads a shipped graph's facts
            assert (again.size_symbols, again.extra_symbols) == (
                facts.size_symbols,
                facts.extra_symbols,
            )


def _flags_its_batch(x: torch.Tensor) -> torch.Tensor:
    many = x.shape[0] > 1  # transformers' `is_causal = q_length > 1` before SDPA
    torch._dynamo.graph_break()
    return x * 2 if many else x + 1


def test_only_a_graph_whose_metadata_shows_no_tensor_is_tensor_free() -> None:
    from pwdaemon.serving.graph_facts import analyse_graph

    first, second = capture(_flags_its_batch, [{"x": torch.randn(3, 4)}]).gms
    assert analyse_graph(first).tensor_free  # `gt = u0 > 1; return (gt,)`
    assert not analyse_graph(second).tensor_free
    # Without dynamo's metadata nothing tells: never called tensor-free (it would get
    # no compile at all).
    bare = torch.fx.symbolic_trace(lambda n: n > 1)
    assert not analyse_graph(bare).tensor_free


class _Trimmed(nn.Module):
    """Slices its input to a length it computes: `x[:, :n]` holds a size node."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, : x.size(1) - 1] * 2


def test_a_graph_slicing_to_a_symbolic_length_ships_and_loads() -> None:
    # A slice whose bound is a node of the graph (BERT's position ids sized on the
    # sequence dim): torch 2.11's GraphPickler does not map into a slice, and shipping
    # failed with "Unexpected raw Node during pickling"; 2.12 and 2.13 register slice
    # as a pytree node while they pickle, as pwdaemon now does on 2.11.
    from pwdaemon.workers.shipping import load_graph

    xs = [torch.randn(2, 5, 4), torch.randn(3, 9, 4)]
    for x in xs:
        torch._dynamo.mark_dynamic(x, 1)
    (gm,) = capture(lambda x: _Trimmed()(x), [{"x": x} for x in xs]).gms

    def node_slices(arg: Any) -> list[slice]:
        if isinstance(arg, slice):
            bounds = (arg.start, arg.stop, arg.step)
            return [arg] if any(isinstance(b, torch.fx.Node) for b in bounds) else []
        if isinstance(arg, list | tuple):
            return [s for a in arg for s in node_slices(a)]
        return []

    sliced = [s for n in gm.graph.nodes for s in node_slices(n.args)]
    assert sliced, gm.code  # the graph does hold a slice bound to a node
    shipped, _ = load_graph(dump_graph(gm, "trimmed"))
    assert shipped.code == gm.code


def _first_arguments(monkeypatch: pytest.MonkeyPatch, owner: Any, name: str) -> list[Any]:
    """The first argument of every call to `owner.name` from now on, in order (the call
    itself goes through)."""
    seen: list[Any] = []
    real = getattr(owner, name)

    def counted(first: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(first)
        return real(first, *args, **kwargs)

    monkeypatch.setattr(owner, name, counted)
    return seen


def _count_graph_compiles(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The sources FX compiles from now on (`_exec_with_source`), in order."""
    import torch.fx.graph_module as graph_module

    return _first_arguments(monkeypatch, graph_module, "_exec_with_source")


def test_shipping_a_graph_compiles_its_code_once(
    mlp_graph: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # CPython's compile() of a graph's source holds the GIL in one C call that the gate
    # cannot park: the copy's code is generated once, for the pickle, not also when the
    # copy is made.
    (gm,) = mlp_graph.gms
    compiled = _count_graph_compiles(monkeypatch)
    dump_graph(gm, "MLP graph 0")
    assert len(compiled) == 1


def test_saving_a_plain_graph_compiles_its_code_once_and_it_loads_to_the_same_code(
    mlp_graph: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The check that the copy without metadata has the graph's code generates the loaded
    # copy's code; compiling it (a GIL hold the gate cannot park) was only for a forward
    # nobody called.
    (gm,) = mlp_graph.gms
    compiled = _count_graph_compiles(monkeypatch)
    data = dump_plain_graph(gm)
    assert len(compiled) == 1  # GraphPickler's, for the pickle
    loaded = load_plain_graph(data)
    assert loaded.code == gm.code
    assert all(not node.meta for node in loaded.graph.nodes)


def test_a_graph_dumped_again_with_the_same_guards_is_not_pickled_again(
    mlp_graph: Recorded, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The engine ships a piece's graph and the saved trace stores it: one dump.
    from torch.fx._graph_pickler import GraphPickler

    (gm,) = mlp_graph.gms
    dumps = _first_arguments(monkeypatch, GraphPickler, "dumps")
    first = dump_graph(gm, "MLP graph 0")
    assert dump_graph(gm, "MLP graph 0, to save") is first
    assert len(dumps) == 1
    other = dump_graph(gm, "MLP graph 0", size_symbols=("s0",))  # asked otherwise
    assert len(dumps) == 2 and other != first
