"""What serving a captured graph needs to know about it: where the size is, what comes out.

The size is every symbol that sits on a marked dimension of an input. Only tensors whose
size dimension matches are marked, so those symbols are all equal at run time: with the
unbacked strategy they are one symbol (one shape id), with the backed strategy each
input may get its own (`s52`, `s92`), and both count as the size. Any other symbol (a
dimension dynamo made dynamic after a recompile, say a sequence length) leaves the piece
to the general tier.

Guards can also tell pieces apart by size: under the backed strategy a model that branches
on `batch == 1` (GPT-2's SDPA path on CUDA, say) gets one piece traced at size 1, with
the 1 baked into its graph (`view(1, 128, 256)`), and another for every other size. Such
a piece cannot be compiled for any other size (the compile fails, three times, and
`wait()` gave up on a size another piece serves fine), so the guards on the size decide
which sizes a piece is planned for (`GraphFacts.admits`).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import sympy
import torch
import torch.fx

from pwdaemon.serving.size_hint import ExtraDim, extra_dims


@dataclass(frozen=True)
class GraphFacts:
    size_index: int | None  # flat-argument index of the (first) size SymInt
    size_indices: tuple[int, ...]  # every SymInt placeholder that is the size
    size_symbol: str | None
    size_symbols: tuple[str, ...]
    extra_symbols: tuple[str, ...]  # other dynamic symbols (then: general tier only)
    returns_tuple: bool
    output_marks: tuple[tuple[int, int], ...]  # (output index, dim) carrying the size
    fingerprint: str
    placeholder_specs: tuple[str, ...]
    # Dynamo's guards on the size alone (sympy booleans over `SIZE`), recorded
    # when the graph was captured: the sizes a call can bring to this piece.
    size_guards: tuple[Any, ...] = ()
    # Where the graph's tensors live (its first tensor placeholder's device, "cuda:0"):
    # the compile target's device, kept here so that a piece whose graph carries no
    # metadata (a loaded trace's: `engine.saved_traces`) still knows it.
    device: str = "cpu"
    # Per placeholder, the dimensions that carry the size (`()` for none, an int, module
    # state); None when some dimension is another expression of the size (`2*s0`), where
    # an input of one size cannot be tiled into another (`engine.validation.tile_input`).
    size_dims: tuple[tuple[int, ...], ...] | None = None
    # Where `extra_symbols` come from: (symbol, input source, dim), `serving.size_hint`.
    extra_dims: tuple[ExtraDim, ...] = ()
    # No tensor anywhere in the graph, only size arithmetic (`gt = s50 > 1; return (gt,
    # s50)`: a piece of transformers' attention cut out by graph breaks). Nothing for
    # Inductor to compute: a size compile of one made no artifact ("no artifact to
    # save", each attempt), and the failed size held `wait(sizes=...)` at False. Such a
    # piece runs as captured and gets no compile. False where the graph carries no
    # metadata to tell (`tensor_free`).
    tensor_free: bool = False
    # The size of the call dynamo captured the graph in (None where not known: a graph
    # analysed outside a tracing call). A piece without a size of its own serves that
    # size on its general compile (pinned to it, or sized by other symbols), so a wait
    # for that size waits for its general (`engine.waiters`).
    traced_size: int | None = None

    def admits(self, size: int) -> bool:
        """Whether a call of `size` can reach this piece (its size guards hold)."""
        return admits(self.size_guards, size)

    def __getitem__(self, name: str) -> Any:
        # Older callers read the facts as a dict (`analyse_graph(gm)["fingerprint"]`).
        return getattr(self, name)


def _placeholder_spec(node: torch.fx.Node) -> str:
    v = node.meta.get("example_value")
    if isinstance(v, torch.Tensor):
        return f"{node.name}:tensor{tuple(str(s) for s in v.shape)}:{v.dtype}:{v.device}"
    if isinstance(v, torch.SymInt):
        return f"{node.name}:symint:{v.node.expr}"
    return f"{node.name}:{type(v).__name__}"


def _marked_dims(node: torch.fx.Node) -> set[int]:
    # The real tensor dynamo saw (GraphArg.example) carries the marks we put on it.
    grapharg = node.meta.get("grapharg")
    example = getattr(grapharg, "example", None) if grapharg is not None else None
    if not isinstance(example, torch.Tensor):
        return set()
    dims: set[int] = set()
    for attr in ("_dynamo_unbacked_indices", "_dynamo_dynamic_indices"):
        dims |= set(getattr(example, attr, ()) or ())
    return dims


def _size_symbols(placeholders: list[torch.fx.Node]) -> set[Any]:
    symbols: set[Any] = set()
    for node in placeholders:
        v = node.meta.get("example_value")
        if not isinstance(v, torch.Tensor):
            continue
        for d in _marked_dims(node):
            if d < v.dim():
                s = v.shape[d]
                if isinstance(s, torch.SymInt) and s.node.expr.is_symbol:
                    symbols.add(s.node.expr)
    return symbols


# The output node's meta key for the piece's own size guards (dynamo's guards that speak
# only of the size, over `SIZE`) on a graph shipped to a worker or the service: the sizes
# dynamo lets reach the piece. A general compile is checked only at those sizes (a piece
# guarded to size 1 compiles, rightly, for size 1), and they are part of the graph's
# fingerprint, so of its store key.
SIZE_GUARDS_META = "pwdaemon_size_guards"

# The output node's meta key for the names of the size's symbols, on a graph shipped to
# a worker or the service (the marks `analyse_graph` reads them from are not shipped). A
# piece may have other symbols too: dynamo's automatic dynamic makes a second dim that
# varies dynamic (a transformer sized on its batch, with lengths that vary), and the
# worker must not take that dim's symbol for the size.
SIZE_SYMBOLS_META = "pwdaemon_size_symbols"

# The size in a piece's size guards: every size symbol of the graph stands for it (they
# are all equal at run time, see the module docstring).
SIZE = sympy.Symbol("size", integer=True, positive=True)


def admits(guards: tuple[Any, ...], size: int) -> bool:
    """Whether every guard in `guards` (over `SIZE`) holds at `size`.

    A guard that does not reduce to true or false (a torch version's sympy function that
    does not evaluate) counts as holding: at worst a compile is tried and fails.
    """
    value = sympy.Integer(size)
    for guard in guards:
        try:
            result = guard.xreplace({SIZE: value})
        except Exception:  # sympy raised on an odd function: do not exclude the size
            continue
        if result is sympy.false:
            return False
    return True


def only_size(guards: tuple[Any, ...]) -> int | None:
    """The one size `guards` admit (an `Eq(SIZE, n)` among them), or None."""
    for guard in guards:
        if isinstance(guard, sympy.Eq):
            a, b = guard.args
            n = b if a == SIZE else a if b == SIZE else None
            if n is not None and getattr(n, "is_Integer", False):
                return int(n)
    return None


def _size_guards(placeholders: list[torch.fx.Node], size_exprs: list[Any]) -> tuple[Any, ...]:
    # The shape env the graph was traced in holds every guard dynamo installed so far for
    # this frame; keep those that only speak about the size, over `SIZE`. The size's
    # symbols are those of the SymInt placeholders and of the marked input dimensions
    # (an attention mask's own symbol under the backed strategy may have no placeholder).
    shape_env = next(
        (
            v.node.shape_env
            for v in (n.meta.get("example_value") for n in placeholders)
            if isinstance(v, torch.SymInt)
        ),
        None,
    )
    symbols = set(size_exprs) | _size_symbols(placeholders)
    if shape_env is None or not symbols:
        return ()
    out: list[Any] = []
    for sym in symbols:
        # A symbol the shape env replaced by a number (a guard `s == 1` can do that) is
        # pinned to it.
        replaced = getattr(shape_env, "replacements", {}).get(sym)
        if replaced is not None and getattr(replaced, "is_Integer", False):
            out.append(sympy.Eq(SIZE, replaced))
    for guard in getattr(shape_env, "guards", ()):
        expr = getattr(guard, "expr", None)
        if isinstance(expr, sympy.Basic) and expr.free_symbols and expr.free_symbols <= symbols:
            guard = expr.xreplace({sym: SIZE for sym in expr.free_symbols})
            # A guard between two size symbols (`Eq(s52, s92)`: two inputs' batches) is
            # true of every size. Kept, it made the fingerprint depend on how many inputs
            # carried a mark: on torch 2.11 GPT-2's live trace (mask and ids marked) and
            # its saved re-trace differed by four such guards, and no trace was saved.
            if guard is not sympy.true:
                out.append(guard)
    return tuple(out)


def shipped_size_symbols(placeholders: list[torch.fx.Node], output: torch.fx.Node) -> set[Any]:
    """A shipped graph's size symbols: its SymInt placeholders' symbols named in
    `SIZE_SYMBOLS_META` on its output node; none without it."""
    names = set(output.meta.get(SIZE_SYMBOLS_META, ()))
    symbols: set[Any] = set()
    for node in placeholders:
        v = node.meta.get("example_value")
        if isinstance(v, torch.SymInt) and str(v.node.expr) in names:
            symbols.add(v.node.expr)
    return symbols


def _size_dims(
    placeholders: list[torch.fx.Node], symbols: set[Any]
) -> tuple[tuple[int, ...], ...] | None:
    out: list[tuple[int, ...]] = []
    for node in placeholders:
        v = node.meta.get("example_value")
        dims: list[int] = []
        if isinstance(v, torch.Tensor):
            for d, s in enumerate(v.shape):
                if not isinstance(s, torch.SymInt):
                    continue
                expr = s.node.expr
                if expr in symbols:
                    dims.append(d)
                elif expr.free_symbols & symbols:
                    return None
        out.append(tuple(dims))
    return tuple(out)


def tensor_free(gm: torch.fx.GraphModule) -> bool:
    """Whether dynamo's metadata shows no tensor in the graph (inputs, intermediates or
    outputs); False for a graph without that metadata on every node."""
    for node in gm.graph.nodes:
        if node.op == "output":
            continue
        if "example_value" not in node.meta:
            return False
        if any(isinstance(v, torch.Tensor) for v in _leaves(node.meta["example_value"])):
            return False
    return True


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, list | tuple):
        return [leaf for v in value for leaf in _leaves(v)]
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    return [value]


def analyse_graph(gm: torch.fx.GraphModule) -> GraphFacts:
    """Find the size SymInt placeholders, other symbols, output structure and marks."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    marked = _size_symbols(placeholders) or shipped_size_symbols(placeholders, output_node)
    size_indices: list[int] = []
    size_exprs: list[Any] = []
    extra: list[str] = []
    for i, node in enumerate(placeholders):
        v = node.meta.get("example_value")
        if not (isinstance(v, torch.SymInt) and v.node.expr.is_symbol):
            continue
        expr = v.node.expr
        # Without mark information (a graph built by hand) the first symbol is the size.
        if expr in marked or (not marked and not size_exprs) or expr in size_exprs:
            size_indices.append(i)
            if expr not in size_exprs:
                size_exprs.append(expr)
        elif str(expr) not in extra:
            extra.append(str(expr))
    result = output_node.args[0]
    returns_tuple = isinstance(result, tuple | list)
    marks: list[tuple[int, int]] = []
    if size_exprs and returns_tuple:
        for i, out in enumerate(result):
            v = out.meta.get("example_value") if isinstance(out, torch.fx.Node) else None
            if isinstance(v, torch.Tensor):
                for d, s in enumerate(v.shape):
                    if isinstance(s, torch.SymInt) and s.node.expr in size_exprs:
                        marks.append((i, d))
                        break
    specs = tuple(_placeholder_spec(n) for n in placeholders)
    devices = [
        str(v.device)
        for v in (n.meta.get("example_value") for n in placeholders)
        if isinstance(v, torch.Tensor)
    ]
    # A shipped copy carries the guards of the piece it was cut from (its fresh shape env
    # holds none); a live piece reads them from the shape env it was traced in.
    if SIZE_GUARDS_META in output_node.meta:
        size_guards = tuple(output_node.meta[SIZE_GUARDS_META])
    else:
        size_guards = _size_guards(placeholders, size_exprs)
    basis = gm.code + "\n" + "\n".join(specs)
    if size_guards:
        # Two pieces of one graph that dynamo lets different sizes reach (size 1, and
        # sizes above 1, under the backed strategy) get different keys: a general compiled
        # for the size-1 piece may rightly hold for size 1 alone (see the worker's check).
        basis += "\nsize guards: " + "; ".join(sorted(str(g) for g in size_guards))
    fingerprint = hashlib.sha256(basis.encode()).hexdigest()
    return GraphFacts(
        size_index=size_indices[0] if size_indices else None,
        size_indices=tuple(size_indices),
        size_symbol=str(size_exprs[0]) if size_exprs else None,
        size_symbols=tuple(str(e) for e in size_exprs),
        extra_symbols=tuple(extra),
        returns_tuple=returns_tuple,
        output_marks=tuple(marks),
        fingerprint=fingerprint,
        placeholder_specs=specs,
        size_guards=size_guards,
        device=devices[0] if devices else "cpu",
        size_dims=_size_dims(placeholders, marked | set(size_exprs)) if size_exprs else None,
        extra_dims=extra_dims(placeholders, extra),
        tensor_free=tensor_free(gm),
    )
