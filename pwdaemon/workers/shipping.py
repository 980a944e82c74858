"""A traced graph on its way to a compile worker: trimmed to what a compile reads,
pickled with GraphPickler (plain pickle would drop the fake metadata and symbols), and
loaded back in the worker (or the service) with a fake mode of its own."""

from __future__ import annotations

import contextlib
import threading
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from pwdaemon.serving.graph_facts import SIZE_GUARDS_META, SIZE_SYMBOLS_META

if TYPE_CHECKING:  # the serving side's type; a worker never imports the call path
    from pwdaemon.serving.piece import GraphPiece

__all__ = (
    "PICKLER_LOCK",
    "SHIPPED_META",
    "UnshippableGraphError",
    "dump_graph",
    "dump_plain_graph",
    "graph_for_worker",
    "load_graph",
    "load_plain_graph",
    "shippable_copy",
)


class UnshippableGraphError(ValueError):
    """A graph piece that cannot be sent to a worker, even with its metadata trimmed.

    Retrying cannot help: the engine gives up on the piece, which serves eager.
    """


# What a worker compile reads from each node (measured on BERT, GPT-2, Llama, Sequential
# and TransformerEncoder with dynamo graphs: `example_value` alone suffices for both
# dynamic_shapes="from_graph" and concrete sizes):
# - example_value: dynamo's fake value (shape, stride, dtype, symbols) of every node; the
#   placeholders' values carry the size symbol "from_graph" reads back.
# - val / tensor_meta: the same facts in graphs that went through make_fx/AOT; kept when
#   present.
# - stack_trace: plain text; keeps compile errors and kernel provenance readable.
# Everything else (nn_module_stack, source_fn_stack, tensor_dict - where transformers'
# models leave a WeakValueDictionary that does not pickle -, unbacked_bindings, ...) is
# dropped.
SHIPPED_META = ("example_value", "val", "tensor_meta", "stack_trace")

# Each graph's last `dump_graph`, kept as long as the graph lives: a cold start dumps a
# piece's graph twice otherwise, once to ship it to the workers (the engine's thread) and
# once to save the trace (the trace thread), the same bytes, each 0.1 s of gated Python
# and a compile() of the graph's code that the gate cannot park (issue-sized BERT).
_dumped: weakref.WeakKeyDictionary[torch.fx.GraphModule, tuple[Any, bytes]] = (
    weakref.WeakKeyDictionary()
)
_dumped_lock = threading.Lock()


def _fresh_fake(v: torch.Tensor) -> torch.Tensor:
    # GraphPickler cannot pickle a fake tensor that is a view (its base drags in
    # unpicklable state), and dynamo records views (a 3-D `linear` is a view of a 2-D
    # matmul). A compile needs only the layout, so a view becomes a fresh fake tensor.
    fake_mode = getattr(v, "fake_mode", None)
    if v._base is None or fake_mode is None:
        return v
    # Built without entering the fake mode: this runs on an engine thread while serving
    # threads may be tracing, and a FakeTensorMode is not made to be entered from two
    # threads (an H200 run on torch 2.11 failed to ship BERT with an AssertionError here
    # under traffic, and shipped it when idle). FakeTensor(mode, meta, device) is what
    # entering the mode would have built.
    from torch._subclasses.fake_tensor import FakeTensor

    meta = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta")
    return FakeTensor(fake_mode, meta, v.device)


def _shippable(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return _fresh_fake(v)
    if isinstance(v, list | tuple) and not hasattr(v, "_fields"):
        return type(v)(_shippable(x) for x in v)
    return v


def shippable_copy(
    gm: torch.fx.GraphModule,
    size_guards: tuple[Any, ...] = (),
    size_symbols: tuple[str, ...] = (),
) -> torch.fx.GraphModule:
    """A copy of `gm` with only `SHIPPED_META` per node (and `size_guards` and
    `size_symbols` on its output node); `gm` itself is not touched.

    Nodes are copied into a new graph with new meta dicts (fake values are shared or
    replaced, never mutated), so the live graph the serving process runs is unchanged.
    `GraphModule(gm, graph)` takes only the attributes the graph's get_attr/call_module
    nodes name, leaving dynamo's extra attributes behind.

    The copy is a `_LazyGraphModule`: its Python code is generated when first needed.
    GraphPickler generates it itself for the pickle, so a GraphModule's own compile at
    construction was done twice, and the second half of each, CPython's `compile()` of
    the source, holds the GIL in one C call that the gate cannot park (4 ms per compile
    of the issue-sized BERT's 360 lines on the 2-core VM) while serving calls wait.
    """
    from torch.fx._lazy_graph_module import _LazyGraphModule

    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for node in gm.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        new.meta = {k: _shippable(node.meta[k]) for k in SHIPPED_META if k in node.meta}
        if node.op == "output" and size_guards:
            new.meta[SIZE_GUARDS_META] = tuple(size_guards)
        if node.op == "output" and size_symbols:
            new.meta[SIZE_SYMBOLS_META] = tuple(size_symbols)
        env[node] = new
    return _LazyGraphModule(gm, graph, class_name=type(gm).__name__)


# GraphPickler is not thread-safe: `dumps` and `loads` register `slice` as a pytree node
# for their duration unless it is registered already, and deregister it after. Two jobs
# shipped at once (two workers) on two threads: one deregistered `slice` while the other
# pickled, or both deregistered it, and a size failed with "cannot be shipped to a
# compile worker: KeyError: <class 'slice'>" (CI). One pickling at a time per process.
PICKLER_LOCK = threading.Lock()


@contextlib.contextmanager
def _graph_pickling() -> Iterator[None]:
    """`PICKLER_LOCK`, and `slice` a pytree node where GraphPickler does not make it one.

    GraphPickler maps a node's arguments to picklable stand-ins with pytree, which
    reaches a Node inside a `slice` only while `slice` is a pytree node: torch 2.12 and
    2.13 register it around `dumps` and `loads`; torch 2.11 does not, and shipping BERT
    sized on its sequence dim (`x[:, :seq]`, a slice holding the length's node) failed
    with "Unexpected raw Node during pickling". Registered here as 2.12 does it.
    """
    from torch.fx import _graph_pickler
    from torch.utils import _pytree as pytree

    with PICKLER_LOCK:
        if hasattr(_graph_pickler, "patch_pytree_map_over_slice") or (
            slice in pytree.SUPPORTED_NODES
        ):
            yield
            return
        pytree._private_register_pytree_node(
            slice, lambda x: ([x.start, x.stop, x.step], None), lambda x, c: slice(*x)
        )
        try:
            yield
        finally:
            pytree._deregister_pytree_node(slice)


def dump_graph(
    gm: torch.fx.GraphModule,
    name: str = "graph",
    size_guards: tuple[Any, ...] = (),
    size_symbols: tuple[str, ...] = (),
) -> bytes:
    """GraphPickler bytes of a trimmed copy of `gm` (fake metadata and symbols kept), with
    the piece's `size_guards` and the names of its `size_symbols` (see
    `SIZE_GUARDS_META`, `SIZE_SYMBOLS_META`).

    Raises `UnshippableGraphError` naming `name` and the reason when even the copy does
    not pickle. The same graph asked again with the same guards and symbols gets the
    bytes it got before (a graph is not changed once traced).
    """
    from torch.fx._graph_pickler import GraphPickler

    asked = (tuple(size_guards), tuple(size_symbols))
    with _dumped_lock:
        kept = _dumped.get(gm)
    if kept is not None and kept[0] == asked:
        return kept[1]
    try:
        copy = shippable_copy(gm, size_guards, size_symbols)
        with _graph_pickling():
            data = bytes(GraphPickler.dumps(copy))
    except Exception as exc:
        raise UnshippableGraphError(
            f"{name} cannot be shipped to a compile worker: {type(exc).__name__}: {exc}"
        ) from exc
    with _dumped_lock:
        _dumped[gm] = (asked, data)
    return data


def graph_for_worker(piece: GraphPiece, name: str) -> bytes:
    """What a compile worker gets for `piece`: a loaded trace's graph as it was stored
    (`GraphPiece.shipped`, its `gm` carries no metadata), else `dump_graph` of its `gm`
    with its size guards (raising `UnshippableGraphError` naming `name`)."""
    if piece.shipped is not None:
        return piece.shipped
    return dump_graph(piece.gm, name, piece.size_guards, piece.facts.size_symbols)


def load_graph(data: bytes) -> tuple[torch.fx.GraphModule, Any]:
    """The GraphModule in `dump_graph`'s bytes, with the fake mode (fresh shape env) its
    metadata lives in. Raises whatever GraphPickler raises on bad bytes."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    return _unpickle_graph(data, fake_mode), fake_mode


def _unpickle_graph(data: bytes, fake_mode: Any) -> torch.fx.GraphModule:
    # The one GraphPickler load of `load_graph` and `load_plain_graph`, under the lock.
    from torch.fx._graph_pickler import GraphPickler

    with _graph_pickling():
        gm = GraphPickler.loads(data, fake_mode)
    if not isinstance(gm, torch.fx.GraphModule):
        raise TypeError(f"graph bytes hold a {type(gm).__name__}, not a GraphModule")
    return gm


def dump_plain_graph(gm: torch.fx.GraphModule) -> bytes:
    """GraphPickler bytes of `gm`'s graph without any node metadata: what runs it eagerly
    (its code), not what compiles it. Loads in milliseconds where `dump_graph`'s fake
    tensors and symbolic shapes take a tenth of a second. Raises ValueError where the
    loaded copy's code would differ from `gm`'s."""
    from torch.fx._graph_pickler import GraphPickler

    plain = shippable_copy(gm)  # new nodes and meta dicts: `gm` keeps its metadata
    for node in plain.graph.nodes:
        node.meta = {}
    with _graph_pickling():
        data = bytes(GraphPickler.dumps(plain))
    # The loaded copy's code generated, not compiled: `load_plain_graph` compiles it into a
    # forward (7 ms for tiny BERT's graph here, one C call holding the GIL that the gate
    # cannot park), which this check does not need.
    loaded = _unpickle_plain_graph(data)
    if loaded.graph.python_code(root_module="self").src != gm.code:
        raise ValueError("the graph without metadata has other code")
    return data


def _unpickle_plain_graph(data: bytes) -> torch.fx.GraphModule:
    # `dump_plain_graph`'s bytes have no metadata to fake: a bare fake mode.
    from torch._subclasses.fake_tensor import FakeTensorMode

    return _unpickle_graph(data, FakeTensorMode())


def load_plain_graph(data: bytes) -> torch.fx.GraphModule:
    """The GraphModule in `dump_plain_graph`'s bytes, ready to run. Raises whatever
    GraphPickler raises on bad bytes."""
    gm = _unpickle_plain_graph(data)
    # GraphPickler restores the code's text but not `forward` (a GraphModule's forward
    # lives on a class of its own, made by `recompile`): without this a loaded trace's
    # eager-tier calls raised "missing the required forward function" and were answered
    # by the plain module instead.
    gm.recompile()
    return gm
