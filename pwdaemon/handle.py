"""`attach()` and the handle it returns: the public face of one attached model."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import anyio.to_thread
import torch

from pwdaemon.config import (
    CompileConfig,
    PolicyConfig,
    parse_dynamic,
    parse_ranges,
    parse_sizes,
)
from pwdaemon.engine.events import HandleStatus, PlanCompleteEvent, SwapEvent
from pwdaemon.engine.loop import Engine
from pwdaemon.engine.store_link import StoreLink
from pwdaemon.serving.cudagraph import GraphConfig
from pwdaemon.serving.dispatch import DEFAULT_SAMPLE_BYTES, DEFAULT_SIZE_CAP, Dispatcher
from pwdaemon.serving.range_table import Range, RangeTable, Runnable, Tier
from pwdaemon.serving.trace import GraphPiece, Tracer
from pwdaemon.store import ArtifactStore
from pwdaemon.workers.executor import Executor

_names = itertools.count()
_attach_lock = threading.Lock()


class AlreadyAttachedError(RuntimeError):
    """The module is already attached (or compiled with torch.compile)."""


class Handle:
    """One attached model: its graph pieces, their tables, the background engine."""

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        sizes: tuple[int, ...],
        ranges: tuple[Range, ...],
        dynamic: dict[str, int] | None,
        policy: PolicyConfig,
        compile_config: CompileConfig,
        background: bool,
        executor: Executor | None,
        size_cap: int,
        sample_bytes: int,
        store: StoreLink | None,
        watch_store: bool,
        graphs: GraphConfig | None,
        trace: str,
    ) -> None:
        self.model = model
        self.name = name
        self.store = store.store if store is not None else None
        self.engine = Engine(
            name,
            policy=policy,
            compile_config=compile_config,
            sizes=sizes,
            ranges=ranges,
            executor=executor,
            store=store,
            watch_store=watch_store,
            graphs=graphs,
        )
        self._background = background
        self._tracer = Tracer(
            model,
            dynamic=dynamic,
            on_piece=self._on_piece,
            size_cap=size_cap,
            sample_bytes=sample_bytes,
            background=trace == "background",
        )
        self._previous_impl: Any = None
        self.detached = False
        self._metrics_server: Any = None

    def _on_piece(self, piece: GraphPiece) -> None:
        piece.dispatcher.record_samples = self.engine.config.validate
        piece.dispatcher.state_ids = frozenset(
            id(t) for t in itertools.chain(self.model.parameters(), self.model.buffers())
        )
        if self._background:
            self.engine.add_piece(piece)

    # ---- graph pieces and tables ---------------------------------------------------

    @property
    def pieces(self) -> Sequence[GraphPiece]:
        """Every graph piece dynamo traced, in trace order."""
        return tuple(self._tracer.pieces)

    @property
    def dispatchers(self) -> Sequence[Dispatcher]:
        return tuple(p.dispatcher for p in self._tracer.pieces)

    def wait_traced(self, timeout: float | None = None) -> bool:
        """With trace="background": block until dynamo traced the model."""
        return self._tracer.wait_traced(timeout) if self._tracer.background else True

    def table(self, graph: int = 0) -> RangeTable:
        return self._tracer.pieces[graph].dispatcher.table

    def install(
        self,
        graph: int,
        target: Range | int | None,
        tier: Tier,
        runnable: Runnable,
        info: Mapping[str, Any] | None = None,
    ) -> RangeTable:
        """Publish `runnable` for a size, a range or (None) the general entry of a piece.

        The runnable takes the piece's flat graph arguments (parameters, the size as an
        int, inputs) and returns what the graph returns. Returns the new table.
        """
        range_ = Range.of(target) if isinstance(target, int) else target
        return self._tracer.pieces[graph].dispatcher.install(range_, tier, runnable, info)

    # ---- background engine ---------------------------------------------------------

    def on_swap(self, callback: Callable[[SwapEvent], None]) -> None:
        """Call `callback(event)` once per published runnable (on the engine's thread)."""
        self.engine.on_swap(callback)

    def on_plan_complete(self, callback: Callable[[PlanCompleteEvent], None]) -> None:
        """Call `callback(event)` once every planned compile has ended (live or failed)."""
        self.engine.on_plan_complete(callback)

    def wait(self, sizes: Iterable[int] | None = None, timeout: float | None = None) -> bool:
        """Block until `sizes` serve specialized (or, without sizes, the plan completes).

        True when done; False on timeout or when a wanted size failed or was dropped.
        """
        return self.engine.wait(sizes, timeout)

    async def wait_async(
        self, sizes: Iterable[int] | None = None, timeout: float | None = None
    ) -> bool:
        """`wait` for async code (asyncio or trio, through anyio)."""
        wanted = None if sizes is None else list(sizes)
        return await anyio.to_thread.run_sync(
            self.engine.wait, wanted, timeout, abandon_on_cancel=True
        )

    def status(self) -> HandleStatus:
        """Per graph piece: table version and every entry's tier, state, hits, timings."""
        return self.engine.status()

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1") -> Any:
        """Expose Prometheus metrics over HTTP (one endpoint per process, shared)."""
        from pwdaemon.metrics import exposition as _metrics

        _metrics.register_source(self.engine)
        self._metrics_server = _metrics.serve_metrics(port, addr)
        return self._metrics_server

    # ---- attach / detach -----------------------------------------------------------

    def _attach(self) -> None:
        with _attach_lock:
            if getattr(self.model, "_pwdaemon_handle", None) is not None:
                raise AlreadyAttachedError(
                    f"{type(self.model).__name__} is already attached to pwdaemon; "
                    "call handle.detach() first"
                )
            if self.model._compiled_call_impl is not None:
                raise AlreadyAttachedError(
                    f"{type(self.model).__name__} was compiled with torch.compile/"
                    "nn.Module.compile(); pwdaemon compiles it itself: attach the plain module"
                )
            if self._background:
                self.engine.start()
            self._previous_impl = self.model._compiled_call_impl
            self.model._pwdaemon_handle = self  # type: ignore[assignment]
            # The one assignment that routes model(...) through pwdaemon.
            self.model._compiled_call_impl = self._tracer  # type: ignore[assignment]

    def detach(self, timeout: float = 10.0) -> None:
        """Restore the original call path, cancel queued work, stop the workers."""
        with _attach_lock:
            if self.detached:
                return
            self.detached = True
            self.model._compiled_call_impl = self._previous_impl  # type: ignore[assignment]
            with contextlib.suppress(AttributeError):
                del self.model._pwdaemon_handle
        if self._metrics_server is not None:
            from pwdaemon.metrics import exposition as _metrics

            _metrics.unregister_source(self.engine)
        self.engine.close(timeout)

    close = detach

    def __enter__(self) -> Handle:
        return self

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def __repr__(self) -> str:
        state = "detached" if self.detached else "attached"
        return f"<pwdaemon.Handle {self.name} {state}, {len(self._tracer.pieces)} graph pieces>"


def attach(
    model: torch.nn.Module,
    *,
    sizes: Sequence[int] = (),
    ranges: Sequence[Range | tuple[int, int]] = (),
    dynamic: Mapping[str, int] | None = None,
    policy: PolicyConfig | None = None,
    compiler: CompileConfig | None = None,
    name: str | None = None,
    background: bool = True,
    metrics_port: int | None = None,
    executor: Executor | None = None,
    size_cap: int = DEFAULT_SIZE_CAP,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    store: ArtifactStore | str | os.PathLike[str] | bool | None = None,
    watch_store: bool = True,
    graphs: GraphConfig | None = None,
    trace: str = "inline",
) -> Handle:
    """Serve `model` through pwdaemon; callers keep calling `model(...)`.

    - `sizes`: sizes to specialize up front; `ranges`: (start, end) inclusive pairs to
      compile per range. Both count against the policy's budget.
    - `dynamic`: which dim of which argument carries the size (default: dim 0 of every
      tensor argument whose dim 0 matches the first tensor argument's).
    - `policy` / `compiler`: see `PolicyConfig` and `CompileConfig` for every knob.
    - `background=False` captures and dispatches (tier 0, plus what you `install`)
      without starting the engine.
    - `executor`: replaces the worker-process pool (`pwdaemon.testing` has fakes).
    - `store`: the artifact store (default: `PWDAEMON_CACHE_DIR`, else
      `~/.cache/pwdaemon`); a path or an `ArtifactStore`; False for none. With a store,
      compiled artifacts persist (a restart is warm), the size profile of a run primes the
      next, and `watch_store` picks up artifacts other processes compile.
    - `graphs`: the CUDA-graph tier (GPU models only): see `GraphConfig`.
    - `trace`: "inline" (dynamo traces the model on the first call, which waits for
      it) or "background" (calls run the plain module until dynamo has traced a copy of
      the first call's inputs on another thread: the first request costs what eager
      costs).
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise AlreadyAttachedError(
            "attach() got a torch.compile()d module; pwdaemon compiles the model itself: "
            "attach the plain module (torch.compile(m)._orig_mod)"
        )
    policy = policy or PolicyConfig()
    compiler = compiler or CompileConfig()
    policy.validate()
    compiler.validate_config()
    if graphs is not None:
        graphs.validate()
    if trace not in ("inline", "background"):
        raise ValueError(f"trace must be 'inline' or 'background', got {trace!r}")
    if size_cap < 1:
        raise ValueError(f"size_cap must be >= 1, got {size_cap}")
    parsed_sizes = parse_sizes(sizes)
    parsed_ranges = parse_ranges(ranges)
    if len(parsed_sizes) > policy.budget:
        raise ValueError(
            f"{len(parsed_sizes)} sizes configured but the specialization budget is "
            f"{policy.budget}; raise PolicyConfig(budget=...) or list fewer sizes"
        )
    link = _store_link(store, compiler)
    handle = Handle(
        model,
        name=name or f"{type(model).__name__.lower()}-{next(_names)}",
        sizes=parsed_sizes,
        ranges=parsed_ranges,
        dynamic=parse_dynamic(dynamic),
        policy=policy,
        compile_config=compiler,
        background=background,
        executor=executor,
        size_cap=size_cap,
        sample_bytes=sample_bytes,
        store=link,
        watch_store=watch_store,
        graphs=graphs,
        trace=trace,
    )
    handle._attach()
    if metrics_port is not None:
        handle.serve_metrics(metrics_port)
    return handle


def _store_link(
    store: ArtifactStore | str | os.PathLike[str] | bool | None, compiler: CompileConfig
) -> StoreLink | None:
    if store is False:
        return None
    if store is None or store is True:
        store = ArtifactStore()
    elif not isinstance(store, ArtifactStore):
        store = ArtifactStore(store)
    # A CPU artifact does not bundle its C++ kernels: this process and the workers must
    # share one Inductor cache, kept inside the store so a restart rebuilds nothing.
    os.environ.update(store.inductor_env())
    return StoreLink(store, compiler.options)
