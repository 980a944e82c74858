"""`attach()` and the handle it returns: the public face of one attached model."""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from pwdaemon.config import (
    CompileConfig,
    PolicyConfig,
    parse_dynamic,
    parse_ranges,
    parse_sizes,
)
from pwdaemon.engine.bytecode_check import check_bytecode_cache
from pwdaemon.engine.cpu_budget import check_cpu_budget, pause_wanted
from pwdaemon.engine.events import HandleStatus, PlanCompleteEvent, SwapEvent
from pwdaemon.engine.loop import Engine
from pwdaemon.engine.options import AttachOptions, TraceMode
from pwdaemon.engine.saved_traces import StoredTraces
from pwdaemon.engine.store_link import StoreLink, model_id
from pwdaemon.service.client import ServiceChoice, executor_for
from pwdaemon.serving.cudagraph import GraphConfig
from pwdaemon.serving.direct import GuardMode
from pwdaemon.serving.dispatch import DEFAULT_SAMPLE_BYTES, DEFAULT_SIZE_CAP, Dispatcher
from pwdaemon.serving.heap import HEAP
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.range_table import Range, RangeTable, Runnable, Tier
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.serving.trace import Tracer
from pwdaemon.store import ArtifactStore
from pwdaemon.workers.executor import Executor, ProcessExecutor

if TYPE_CHECKING:  # prometheus-client is imported when metrics are first asked for
    from prometheus_client.registry import CollectorRegistry

log = logging.getLogger(__name__)

_names = itertools.count()
_attach_lock = threading.Lock()


class AlreadyAttachedError(RuntimeError):
    """The module is already attached (or compiled with torch.compile)."""


class Handle:
    """One attached model: its graph pieces, their tables, the background engine."""

    def __init__(self, model: torch.nn.Module, options: AttachOptions) -> None:
        """Use `attach()`, which checks `options` and routes the model's calls here."""
        self.model = model
        self.options = options
        self.name = options.name
        self.store = options.store.store if options.store is not None else None
        link, failed, remember, shelf = options.store, {}, None, None
        if link is not None:
            # A strategy that failed for this model in an earlier run costs a whole trace
            # again (BERT on an H200: 25 s of the first 32, under traffic): skip it.
            key = model_id(model, options.dynamic)
            failed = link.failed_strategies(key)

            def remember(strategy: ShapeStrategy, why: str) -> None:
                # Called from a tracing call (a serving call's, when tracing inline) and
                # from the engine's loop: the store is the user's disk, never raise.
                try:
                    link.remember_failed_strategy(key, strategy, why)
                except Exception as exc:
                    log.warning("pwdaemon: failed strategy not remembered: %s", exc)

            if options.saved_trace:
                shelf = StoredTraces(link, key)

        # Set by the model's first call as it returns: the engine starts then, so that
        # its start does not share that call's time (`pwdaemon.engine.deferred_start`).
        self._first_call_returned = threading.Event()
        self._tracer = Tracer(
            model,
            dynamic=dict(options.dynamic) if options.dynamic is not None else None,
            on_piece=self._on_piece,
            size_cap=options.size_cap,
            sample_bytes=options.sample_bytes,
            background=options.trace is TraceMode.BACKGROUND,
            hot_calls=options.policy.hot_calls,
            configured_sizes=frozenset(options.sizes),
            failed=failed,
            on_fall_back=remember,
            guards=options.guards,
            first_call_returned=self._first_call_returned,
            shelf=shelf,
        )
        # The engine reads the tracer's records for status and metrics (read-only: the
        # engine sits below the handle and knows the tracer only as `TraceRecords`).
        # Created after the tracer, which calls `_on_piece` (and so the engine) only
        # once the model is called.
        self.engine = Engine(options, trace=self._tracer, on_strategy_failed=remember)
        self._previous_impl: Any = None
        self.detached = False
        self._metrics_server: Any = None
        self._metrics_exported = False  # the engine is a source of the metrics hub

    def _on_piece(self, piece: GraphPiece) -> None:
        # On the serving thread that traced the piece (dynamo's backend): cheap only.
        # Samples are recorded for output validation; caller-owned tensors are told
        # apart from the model's own state by identity.
        piece.dispatcher.record_samples = self.options.compiler.validate
        if not self.options.compiler.validate:
            # The tracer may hand a piece over after calls ran through its dispatcher;
            # inputs recorded meanwhile serve no validation: free them.
            piece.dispatcher.samples.clear()
            piece.dispatcher.sample_written.clear()
        piece.dispatcher.state_ids = frozenset(
            id(t) for t in itertools.chain(self.model.parameters(), self.model.buffers())
        )
        if self.options.compile:
            self.engine.add_piece(piece)

    # ---- graph pieces and tables ---------------------------------------------------

    @property
    def pieces(self) -> Sequence[GraphPiece]:
        """Every graph piece dynamo traced, in trace order."""
        return tuple(self._tracer.pieces)

    @property
    def dispatchers(self) -> Sequence[Dispatcher]:
        """The dispatcher of each graph piece, in trace order."""
        return tuple(p.dispatcher for p in self._tracer.pieces)

    def wait_traced(self, timeout: float | None = None) -> bool:
        """With trace="background": block until dynamo traced the model."""
        return self._tracer.wait_traced(timeout)

    def table(self, graph: int = 0) -> RangeTable:
        """The range table piece `graph` serves from now."""
        return self._tracer.pieces[graph].dispatcher.table

    def install(
        self,
        graph: int,
        at: Range | int | None,
        tier: Tier,
        runnable: Runnable,
        info: Mapping[str, Any] | None = None,
    ) -> RangeTable:
        """Publish `runnable` at a size, a range or (None) the general entry of a piece.

        The runnable takes the piece's flat graph arguments (parameters, the size as an
        int, inputs) and returns what the graph returns. Returns the new table.
        """
        range_ = Range.of(at) if isinstance(at, int) else at
        return self._tracer.pieces[graph].dispatcher.install(range_, tier, runnable, info)

    # ---- background engine ---------------------------------------------------------

    def on_swap(self, callback: Callable[[SwapEvent], None]) -> None:
        """Call `callback(event)` once per published runnable (on the engine's thread)."""
        self.engine.on_swap(callback)

    def on_plan_complete(self, callback: Callable[[PlanCompleteEvent], None]) -> None:
        """Call `callback(event)` once every planned compile has ended (live or failed)."""
        self.engine.on_plan_complete(callback)

    def wait(
        self,
        sizes: Iterable[int] | None = None,
        timeout: float | None = None,
        tier: Tier | None = None,
    ) -> bool:
        """Block until `sizes` serve at `tier` (or, without sizes, the plan completes).

        `tier`: `Tier.SIZE` (compiled for the size), `Tier.GRAPH` (its CUDA graph), or
        None (default) for the best tier the device supports: the CUDA graph on a GPU
        with graphs enabled, else the compiled size. True when done; False on timeout,
        or at once when a wanted size was given up at that tier.

        A CUDA graph is captured on a serving call of its size, so on a GPU the default
        waits for traffic of those sizes: with none coming (a warm-up script, a restart
        that awaits its store), wait for `Tier.SIZE`.

        A piece without a size of its own (pinned to the size it was captured at, or
        with other dynamic sizes) counts for that size with its general compile, all it
        gets; a piece of size arithmetic alone, which gets no compile, does not count.
        """
        return self.engine.wait(sizes, timeout, tier)

    def status(self) -> HandleStatus:
        """Per graph piece: shape strategy, table version, every entry's tier, state,
        hits and timings, and why it is still on eager after its plan (`on_eager_reason`);
        for the model (`trace`): strategies tried, graph breaks with dynamo's reasons,
        recompiles, misses and error fall-backs. `print()` it for a readable report."""
        return self.engine.status()

    def serve_metrics(self, port: int = 0, addr: str = "127.0.0.1") -> Any:
        """Expose Prometheus metrics over HTTP (one endpoint per process, shared)."""
        from pwdaemon.metrics import exposition as _metrics

        _metrics.register_source(self.engine)
        self._metrics_exported = True
        self._metrics_server = _metrics.serve_metrics(port, addr)
        return self._metrics_server

    def register_metrics(self, registry: CollectorRegistry | None = None) -> None:
        """Export this model's metrics through a prometheus-client registry of yours
        instead of (or beside) `serve_metrics`' endpoint: your `/metrics` then carries
        the `pwdaemon_` families. Default: prometheus-client's global `REGISTRY`, the
        one `start_http_server()` and `make_asgi_app()` serve. Every model registered
        so shares one collector in the registry; detach removes the model's series."""
        from prometheus_client import REGISTRY

        from pwdaemon.metrics import exposition as _metrics

        _metrics.register_source(self.engine)
        self._metrics_exported = True
        _metrics.register_into(REGISTRY if registry is None else registry)

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
            if self.options.compile:
                if self._tracer.background is not None:
                    self.engine.start_after_first_call(self._first_call_returned)
                else:  # the first call traces inline: the set-up overlaps that trace
                    self.engine.start()
            self._previous_impl = self.model._compiled_call_impl
            self.model._pwdaemon_handle = self  # type: ignore[assignment]
            # The one assignment that routes model(...) through pwdaemon.
            self.model._compiled_call_impl = self._tracer  # type: ignore[assignment]
            if self.options.freeze_heap:
                HEAP.hold()

    def detach(self, timeout: float = 10.0) -> None:
        """Restore the original call path, cancel queued work, stop the workers."""
        with _attach_lock:
            if self.detached:
                return
            self.detached = True
            self.model._compiled_call_impl = self._previous_impl  # type: ignore[assignment]
            if self.options.freeze_heap:
                HEAP.release()
            with contextlib.suppress(AttributeError):
                del self.model._pwdaemon_handle
        if not self._tracer.stop(timeout):
            log.warning("pwdaemon: %s: the background trace did not end within %.0f s of "
                        "detach; it finishes on its own thread", self.name, timeout)  # fmt: skip
        if self._metrics_exported:
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
    compile: bool = True,
    metrics_port: int | None = None,
    executor: Executor | None = None,
    size_cap: int = DEFAULT_SIZE_CAP,
    sample_bytes: int = DEFAULT_SAMPLE_BYTES,
    store: ArtifactStore | str | os.PathLike[str] | bool | None = None,
    watch_store: bool = True,
    graphs: GraphConfig | None = None,
    trace: str = "background",
    guards: str = "every_call",
    service: ServiceChoice = "auto",
    freeze_heap: bool = True,
    saved_trace: bool = True,
) -> Handle:
    """Serve `model` through pwdaemon; callers keep calling `model(...)`.

    - `sizes`: sizes to specialize up front; `ranges`: (start, end) inclusive pairs to
      compile per range. Both count against the policy's budget.
    - `dynamic`: which dim of which argument carries the size (default: dim 0 of every
      tensor argument whose dim 0 matches the first tensor argument's).
    - `policy` / `compiler`: see `PolicyConfig` and `CompileConfig` for every knob.
    - `compile=False` traces and dispatches (tier 0, plus what you `install`)
      without starting the engine: nothing is compiled in the background.
    - `executor`: replaces the worker-process pool (`pwdaemon.testing` has fakes).
    - `store`: the artifact store (default: `PWDAEMON_CACHE_DIR`, else
      `~/.cache/pwdaemon`); a path or an `ArtifactStore`; False for none. With a store,
      compiled artifacts persist (a restart is warm), the size profile of a run primes the
      next, and `watch_store` picks up artifacts other processes compile.
    - `graphs`: the CUDA-graph tier (GPU models only): see `GraphConfig`.
    - `trace`: "background" (default: calls run the plain module until dynamo has
      traced a copy of the first call's inputs on another thread, which parks while
      serving calls run: the first request costs what eager costs) or "inline" (dynamo
      traces on the first call, which waits for it; tests and notebooks that want the
      pieces right after one call).
    - `guards`: "every_call" (default: dynamo checks its guards on every call, as
      torch.compile does) or "rechecked" (a call whose signature (argument shapes,
      dtypes, values) a graph piece served before runs that piece's compiled code
      without dynamo's guard check in front, which cost 125-370 µs a call on a BERT;
      the guards are checked again on one call per signature every 0.5 s, so a change
      to the module's Python state (its config, a hook) reaches calls within that time;
      see `pwdaemon.serving.direct`). Not the default yet: not run through on a GPU.
    - `service`: where compiles run. "auto" (default): the host's `pwdaemon serve` when
      its socket (`PWDAEMON_SOCKET`, else /run/pwdaemon/pwdaemon.sock) answers now, else
      embedded worker processes; a socket path or True: that service, compiling embedded
      while it is away; False: embedded only. Ignored when `executor` is given.
    - `freeze_heap`: while attached, objects alive at attach, after the loader's set-up
      and after each trace are frozen (`gc.freeze()`), so a garbage collection no longer
      walks torch's, transformers' and dynamo's ~400,000 objects holding the GIL (190-510
      ms that every serving call waited for); the last detach unfreezes them. False
      leaves the collector alone (`pwdaemon.serving.heap` says more).
    - `saved_trace`: with a store and trace="background" (default True), a model that
      dynamo traced as one whole graph has that trace saved in the store (torch's
      precompile), and the next start loads it (0.01-0.2 s alone) instead of tracing
      (1-4 s of the GIL here). The saved trace keeps torch's portable guards only
      (tensor metadata, shapes, grad mode): a change to the module's Python attributes
      made after the save (its config, a hook) is not seen by it; the model's class,
      weights' names, shapes and dtypes, the training flag and the source of every
      function dynamo inlined are checked. False traces every start
      (`pwdaemon.serving.saved_trace` says more).

    Every argument is parsed and checked here, into one `AttachOptions`, before the
    model or the store is touched: a bad value raises and changes nothing.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"attach() takes an nn.Module, got {type(model).__name__}")
    if isinstance(model, torch._dynamo.eval_frame.OptimizedModule):
        raise AlreadyAttachedError(
            "attach() got a torch.compile()d module; pwdaemon compiles the model itself: "
            "attach the plain module (torch.compile(m)._orig_mod)"
        )
    compiler = compiler or CompileConfig()
    # Resolved once here, so the executor and the service client read a plain bool.
    compiler = dataclasses.replace(compiler, pause_during_calls=pause_wanted(compiler, model))
    options = AttachOptions(
        name=name or f"{type(model).__name__.lower()}-{next(_names)}",
        sizes=parse_sizes(sizes),
        ranges=parse_ranges(ranges),
        dynamic=parse_dynamic(dynamic),
        policy=policy or PolicyConfig(),
        compiler=compiler,
        compile=compile,
        executor=executor,
        size_cap=size_cap,
        sample_bytes=sample_bytes,
        watch_store=watch_store,
        graphs=graphs or GraphConfig(),
        trace=TraceMode.parse(trace),
        guards=GuardMode.parse(guards),
        freeze_heap=freeze_heap,
        saved_trace=saved_trace,
    )
    link = _store_link(store, compiler)
    if link is not None:
        options = dataclasses.replace(options, store=link)
    if executor is None and compile:
        # One connect() to the service's socket at most: a missing socket fails at once.
        env = link.store.inductor_env() if link is not None else {}
        options = dataclasses.replace(options, executor=executor_for(service, compiler, env))
        if isinstance(options.executor, ProcessExecutor):
            check_cpu_budget(compiler, model)  # the workers share this host's CPUs with serving
    check_bytecode_cache()  # Inductor's imports after attach must not compile sources
    handle = Handle(model, options)
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
