"""Graph capture: a torch.compile backend that hands every graph piece a dispatcher.

The live module is patched the way `nn.Module.compile()` does it (its
`_compiled_call_impl`), so callers keep calling `model(...)`. Before each call the size
dimension of the inputs is marked *unbacked* with one shared shape id: one graph serves
every size, size 1 included (a backed `mark_dynamic` would specialise 0/1 and retrace on
the request path), and inputs sharing the size share one symbol.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch._dynamo import decorators as dynamo_decorators

from pwdaemon.serving.dispatch import Dispatcher, match_output_structure
from pwdaemon.serving.inputs import copy_input

_MARK_PARAMS = inspect.signature(dynamo_decorators.mark_unbacked).parameters
# shape_id (torch >= 2.11) makes every marked input share one symbol.
_HAS_SHAPE_ID = "shape_id" in _MARK_PARAMS
# Dynamo keeps its cache on the code object of `forward`, shared by every instance of a
# module class, and each capture guards on its own shape id: without isolation every
# attach of a class (another instance, or attach after detach) adds an entry to one
# shared bucket, and the 9th hits `recompile_limit` and silently runs un-captured.
# isolate_recompiles (torch >= 2.13) gives each capture its own bucket.
_COMPILE_KWARGS: dict[str, Any] = (
    {"isolate_recompiles": True}
    if "isolate_recompiles" in inspect.signature(torch.compile).parameters
    else {}
)


def mark_size(t: torch.Tensor, dim: int, shape_id: str) -> None:
    if _HAS_SHAPE_ID:
        dynamo_decorators.mark_unbacked(t, dim, shape_id=shape_id)
    else:  # pragma: no cover - older torch: symbols unify through the graph's ops
        dynamo_decorators.mark_unbacked(t, dim)


@dataclass
class GraphPiece:
    """One graph dynamo handed to the backend, and what serving it needs."""

    index: int
    gm: torch.fx.GraphModule
    dispatcher: Dispatcher
    size_index: int | None  # flat-argument index of the size SymInt
    size_symbol: str | None
    extra_symbols: tuple[str, ...]  # other dynamic symbols (then: general tier only)
    returns_tuple: bool
    output_marks: tuple[tuple[int, int], ...]  # (output index, dim) carrying the size
    fingerprint: str = ""
    placeholder_specs: tuple[str, ...] = field(default_factory=tuple)

    @property
    def specializable(self) -> bool:
        return self.size_index is not None and not self.extra_symbols


def _placeholder_spec(node: torch.fx.Node) -> str:
    v = node.meta.get("example_value")
    if isinstance(v, torch.Tensor):
        return f"{node.name}:tensor{tuple(str(s) for s in v.shape)}:{v.dtype}:{v.device}"
    if isinstance(v, torch.SymInt):
        return f"{node.name}:symint:{v.node.expr}"
    return f"{node.name}:{type(v).__name__}"


def analyse_graph(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """Find the size SymInt placeholder, other symbols, output structure and marks."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    size_index: int | None = None
    size_expr: Any = None
    extra: list[str] = []
    for i, node in enumerate(placeholders):
        v = node.meta.get("example_value")
        if isinstance(v, torch.SymInt) and v.node.expr.is_symbol:
            if size_index is None:
                size_index, size_expr = i, v.node.expr
            elif v.node.expr != size_expr and str(v.node.expr) not in extra:
                extra.append(str(v.node.expr))
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    result = output_node.args[0]
    returns_tuple = isinstance(result, tuple | list)
    marks: list[tuple[int, int]] = []
    if size_expr is not None and returns_tuple:
        for i, out in enumerate(result):
            v = out.meta.get("example_value") if isinstance(out, torch.fx.Node) else None
            if isinstance(v, torch.Tensor):
                for d, s in enumerate(v.shape):
                    if isinstance(s, torch.SymInt) and s.node.expr == size_expr:
                        marks.append((i, d))
                        break
    specs = tuple(_placeholder_spec(n) for n in placeholders)
    fingerprint = hashlib.sha256((gm.code + "\n" + "\n".join(specs)).encode()).hexdigest()
    return {
        "size_index": size_index,
        "size_symbol": str(size_expr) if size_expr is not None else None,
        "extra_symbols": tuple(extra),
        "returns_tuple": returns_tuple,
        "output_marks": tuple(marks),
        "fingerprint": fingerprint,
        "placeholder_specs": specs,
    }


class Tracer:
    """Owns the torch.compile wrapper around one module and the pieces it captured."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        dynamic: Mapping[str, int] | None,
        on_piece: Callable[[GraphPiece], None],
        size_cap: int,
        sample_bytes: int,
        background: bool = False,
    ) -> None:
        self.model = model
        # Background capture: until dynamo has captured the model (on another thread, from
        # a copy of the first call's inputs), calls run the plain module, so the first
        # request costs what eager costs instead of dynamo's one-time trace.
        self.background = background
        self._traced = threading.Event()
        self._capture_thread: threading.Thread | None = None
        self.trace_error: BaseException | None = None
        self.shape_id = f"pwdaemon_size_{id(self):x}"
        self.pieces: list[GraphPiece] = []
        self._on_piece = on_piece
        self._size_cap = size_cap
        self._sample_bytes = sample_bytes
        self._lock = threading.Lock()
        self._dynamic = dict(dynamic) if dynamic else None
        self._positions: dict[str, int] = {}
        if self._dynamic:
            params = list(inspect.signature(model.forward).parameters)
            unknown = [name for name in self._dynamic if name not in params]
            if unknown:
                raise ValueError(
                    f"dynamic names {unknown} are not arguments of "
                    f"{type(model).__name__}.forward{tuple(params)}"
                )
            self._positions = {name: params.index(name) for name in self._dynamic}
        # True until a whole model call completes without capturing a new piece.
        self._settling = True
        self._first_calls = threading.RLock()
        self._compiled = torch.compile(model._call_impl, backend=self._backend, **_COMPILE_KWARGS)

    # ---- the call path (installed as model._compiled_call_impl) ---------------------

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.background and not self._traced.is_set():
            self._start_background_trace(args, kwargs)
            return self.model._call_impl(*args, **kwargs)
        self._mark_inputs(args, kwargs)
        if not self._settling:
            return self._compiled(*args, **kwargs)
        # Until the pieces are known, calls go through dynamo one at a time: concurrent
        # first calls would each trace the frame and capture duplicate pieces (each
        # with its own dispatcher and compiles). Once settled, this path is never taken.
        with self._first_calls:
            if not self._settling:
                return self._compiled(*args, **kwargs)
            before = len(self.pieces)
            out = self._compiled(*args, **kwargs)
            self._settle(before)
            return out

    def _start_background_trace(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        with self._lock:
            if self._capture_thread is not None:
                return
            # Copies: the caller may reuse or mutate its tensors after the call returns.
            args_copy = tuple(copy_input(a) for a in args)
            kwargs_copy = {k: copy_input(v) for k, v in kwargs.items()}
            grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
            self._capture_thread = threading.Thread(
                target=self._trace_in_background,
                args=(args_copy, kwargs_copy, grad, inference),
                name="pwdaemon-trace",
                daemon=True,
            )
            self._capture_thread.start()

    def _trace_in_background(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], grad: bool, inference: bool
    ) -> None:
        # The caller's grad/inference mode, so dynamo's guards hold on the serving thread.
        try:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                self._mark_inputs(args, kwargs)
                with self._first_calls:
                    before = len(self.pieces)
                    self._compiled(*args, **kwargs)
                    self._settle(before)
        except BaseException as exc:
            self.trace_error = exc
            logging.getLogger("pwdaemon").warning(
                "pwdaemon: background capture failed; capturing on the next call: %s", exc
            )
        finally:
            self._traced.set()

    def wait_traced(self, timeout: float | None = None) -> bool:
        """Background capture only: block until dynamo captured the model."""
        return self._traced.wait(timeout)

    def _mark_inputs(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        shape_id = self.shape_id
        if self._dynamic is None:
            # Default: dim 0 of every tensor argument whose dim 0 equals the first one's.
            size = -1
            for a in args:
                if isinstance(a, torch.Tensor) and a.dim() > 0:
                    if size < 0:
                        size = a.shape[0]
                    if a.shape[0] == size:
                        mark_size(a, 0, shape_id)
            for a in kwargs.values():
                if isinstance(a, torch.Tensor) and a.dim() > 0:
                    if size < 0:
                        size = a.shape[0]
                    if a.shape[0] == size:
                        mark_size(a, 0, shape_id)
            return
        for name, dim in self._dynamic.items():
            t = kwargs.get(name)
            if t is None:
                pos = self._positions[name]
                t = args[pos] if pos < len(args) else None
            if isinstance(t, torch.Tensor):
                # A negative dim counts from the end, as everywhere in torch; dynamo's
                # mark ignores one, which would trace static and retrace every size.
                ndim = t.dim()
                d = dim + ndim if dim < 0 else dim
                if 0 <= d < ndim:
                    mark_size(t, d, shape_id)

    def _settle(self, before: int) -> None:
        # Outputs of a piece that is followed by another (a graph break) must carry the
        # size mark into dynamo's resumed frame, or it would trace that frame static and
        # retrace at the next size. The last piece's outputs need no mark.
        with self._lock:
            if len(self.pieces) != before:
                return  # still discovering pieces; look again after the next call
            self._settling = False
            if self.pieces:
                self.pieces[-1].dispatcher.mark_outputs = None

    # ---- the backend ---------------------------------------------------------------

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        facts = analyse_graph(gm)
        with self._lock:
            index = len(self.pieces)
            eager = gm.forward
            dispatcher = Dispatcher(
                index,
                eager,
                facts["size_index"],
                size_cap=self._size_cap,
                sample_bytes=self._sample_bytes,
            )
            piece = GraphPiece(index=index, gm=gm, dispatcher=dispatcher, **facts)
            if piece.output_marks:
                dispatcher.mark_outputs = self._output_marker(piece.output_marks)
            self.pieces.append(piece)
            self._settling = True
        self._on_piece(piece)
        return dispatcher

    def _output_marker(self, marks: tuple[tuple[int, int], ...]) -> Callable[[Any], None]:
        shape_id = self.shape_id

        def mark(out: Any) -> None:
            for i, d in marks:
                t = out[i]
                if isinstance(t, torch.Tensor):
                    mark_size(t, d, shape_id)

        return mark


def wrap_compiled(fn: Callable[..., Any], piece: GraphPiece) -> Callable[..., Any]:
    """A compiled artifact shaped like the piece's graph output."""
    return match_output_structure(fn, piece.returns_tuple)
