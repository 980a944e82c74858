"""Prometheus metrics for pwdaemon: a scrape-time collector and one HTTP endpoint.

The serving path never touches a metric object: the engine keeps plain integers
(see `pwdaemon.metrics.stats`), and everything here is built from
`MetricsSource.metrics_snapshot()` only when Prometheus scrapes. A labelled
`Counter.labels(...).inc()` per call would cost a dict lookup and a lock on every
request, which the design forbids.

Several attached models in one process share one endpoint through a module-level
hub: each model registers its source with `register_source`, and
`serve_metrics` starts (at most) one HTTP server per process that exposes every
registered source. The server uses its own `CollectorRegistry`, so the user's
metrics in the global default registry are neither exposed nor disturbed by it;
users who would rather expose our metrics on their own endpoint call
`Handle.register_metrics(their_registry)` (`register_into` here).

Exported families (all carry a `model` label except the collector's own error
counter): see `METRIC_FAMILIES`.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

from prometheus_client import start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from pwdaemon.metrics.stats import HistogramCounts, MetricsSource, ModelMetrics

__all__ = [
    "METRIC_FAMILIES",
    "MetricFamilySpec",
    "MetricsServer",
    "PwdaemonCollector",
    "SPECIALIZED_TIERS",
    "register_into",
    "register_source",
    "serve_metrics",
    "unregister_source",
]

logger = logging.getLogger(__name__)

# Tiers that count as a "specialized hit": a runnable compiled for the call's size or
# a range holding it (tier 2), or its CUDA-graph replay (tier 3). Eager and general
# are the fallbacks a specialization exists to replace.
SPECIALIZED_TIERS: frozenset[str] = frozenset({"range", "size", "graph"})


@dataclass(frozen=True)
class MetricFamilySpec:
    """One exported metric family: name as exposed (counters without `_total`)."""

    name: str
    kind: Literal["counter", "gauge", "histogram"]
    help: str
    labels: tuple[str, ...]

    def family(self) -> Metric:
        """An empty family of this spec, ready for `add_metric`."""
        if self.kind == "counter":
            return CounterMetricFamily(self.name, self.help, labels=self.labels)
        if self.kind == "gauge":
            return GaugeMetricFamily(self.name, self.help, labels=self.labels)
        return HistogramMetricFamily(self.name, self.help, labels=self.labels)


_M = ("model",)
_MG = ("model", "graph")

METRIC_FAMILIES: tuple[MetricFamilySpec, ...] = (
    MetricFamilySpec(
        "pwdaemon_calls",
        "counter",
        "Calls answered, by the tier of the runnable that answered them.",
        ("model", "graph", "tier"),
    ),
    MetricFamilySpec(
        "pwdaemon_specialized_calls",
        "counter",
        "Calls answered by a size- or range-specialized runnable (tiers range, size, "
        "graph); divide by pwdaemon_calls_total for the specialized-hit ratio.",
        _MG,
    ),
    MetricFamilySpec(
        "pwdaemon_live_entries",
        "gauge",
        "Runnables currently in the dispatch table, by tier.",
        ("model", "graph", "tier"),
    ),
    MetricFamilySpec(
        "pwdaemon_table_version",
        "gauge",
        "Version of the published dispatch table (bumped by every swap).",
        _MG,
    ),
    MetricFamilySpec(
        "pwdaemon_distinct_sizes",
        "gauge",
        "Distinct input sizes counted individually (bounded by the size-histogram cap).",
        _MG,
    ),
    MetricFamilySpec(
        "pwdaemon_size_overflow_calls",
        "counter",
        "Calls whose size arrived after the size-histogram cap was reached "
        "(counted together as 'other').",
        _MG,
    ),
    MetricFamilySpec(
        "pwdaemon_compile_jobs",
        "counter",
        "Compile jobs finished, by target kind and outcome.",
        ("model", "target", "outcome"),
    ),
    MetricFamilySpec(
        "pwdaemon_compile_duration_seconds",
        "histogram",
        "Wall time of one compile job in a worker.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_hot_to_swap_seconds",
        "histogram",
        "Time from a size becoming hot to its specialized runnable being swapped in.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_compile_queue_depth",
        "gauge",
        "Compile jobs waiting for a worker.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_compiles_in_flight",
        "gauge",
        "Compile jobs running in a worker now.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_compile_failures",
        "counter",
        "Compile jobs that failed, by reason.",
        ("model", "reason"),
    ),
    MetricFamilySpec(
        "pwdaemon_validation_rejects",
        "counter",
        "Compiled runnables rejected by validation on a live input, by reason.",
        ("model", "reason"),
    ),
    MetricFamilySpec(
        "pwdaemon_worker_restarts",
        "counter",
        "Compile worker processes restarted after dying or hanging.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_artifact_loads",
        "counter",
        "Artifacts loaded into the serving process, by where they came from "
        "(compiled, store, peer).",
        ("model", "source"),
    ),
    MetricFamilySpec(
        "pwdaemon_store_bytes",
        "gauge",
        "Bytes held by the artifact store this model uses.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_store_artifacts",
        "gauge",
        "Artifacts held by the artifact store this model uses.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_cuda_graphs",
        "gauge",
        "Live CUDA graphs (tier 3) of the model.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_cuda_graph_memory_bytes",
        "gauge",
        "GPU memory the model's live CUDA graphs took in its graph pool when captured "
        "(what GraphConfig.memory_budget_bytes counts).",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_store_write_errors",
        "counter",
        "Failed writes to the artifact store.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_graph_pieces",
        "gauge",
        "Graph pieces dynamo captured for the model, by the shape strategy each was "
        "captured with; more than one piece means graph breaks.",
        ("model", "strategy"),
    ),
    MetricFamilySpec(
        "pwdaemon_graph_breaks",
        "counter",
        "Graph breaks dynamo reported while tracing the model (status() and the log "
        "give each one's reason).",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_recompiles",
        "counter",
        "Tracing calls after the first that captured new pieces, by cause (settling: "
        "a first call still discovering pieces; hot_signature: a stray input got hot).",
        ("model", "cause"),
    ),
    MetricFamilySpec(
        "pwdaemon_trace_misses",
        "counter",
        "Calls whose input no captured piece served (new dtype, rank, grad mode or "
        "layout): they ran eager.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_error_fallback_calls",
        "counter",
        "Calls that raised on pwdaemon's path and were answered by eager instead.",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_strategy_fallbacks",
        "counter",
        "Shape strategies that failed on their first tracing call and handed over to "
        "the next, by the strategy that failed.",
        ("model", "strategy"),
    ),
    MetricFamilySpec(
        "pwdaemon_pieces_on_eager",
        "gauge",
        "Graph pieces with no compiled runnable after their planned compiles ended "
        "(status() says why for each).",
        _M,
    ),
    MetricFamilySpec(
        "pwdaemon_metrics_source_errors",
        "counter",
        "Scrapes that skipped a registered source, by reason "
        "(exception: metrics_snapshot raised; duplicate_model: another source already "
        "exported that model label).",
        ("reason",),
    ),
)


def _add_histogram(family: Metric, labels: Sequence[str], hist: HistogramCounts) -> None:
    assert isinstance(family, HistogramMetricFamily)
    buckets = [(floatToGoString(bound), float(count)) for bound, count in hist.cumulative()]
    family.add_metric(labels, buckets, sum_value=hist.total)


def _add_model(fams: dict[str, Metric], m: ModelMetrics) -> None:
    """Append every series of one model's snapshot to the families."""

    def add(name: str, labels: Sequence[str], value: float) -> None:
        fam = fams[name]
        assert isinstance(fam, CounterMetricFamily | GaugeMetricFamily)
        fam.add_metric(labels, value)

    model = m.model
    for piece in m.pieces:
        graph = str(piece.graph)
        specialized = 0
        for tier, calls in sorted(piece.calls_by_tier.items()):
            add("pwdaemon_calls", (model, graph, tier), calls)
            if tier in SPECIALIZED_TIERS:
                specialized += calls
        add("pwdaemon_specialized_calls", (model, graph), specialized)
        for tier, live in sorted(piece.live_entries_by_tier.items()):
            add("pwdaemon_live_entries", (model, graph, tier), live)
        add("pwdaemon_table_version", (model, graph), piece.table_version)
        add("pwdaemon_distinct_sizes", (model, graph), piece.distinct_sizes)
        add("pwdaemon_size_overflow_calls", (model, graph), piece.overflow_calls)
    for (target, outcome), n in sorted(m.jobs_by_outcome.items()):
        add("pwdaemon_compile_jobs", (model, target, outcome), n)
    _add_histogram(fams["pwdaemon_compile_duration_seconds"], (model,), m.compile_seconds)
    _add_histogram(fams["pwdaemon_hot_to_swap_seconds"], (model,), m.hot_to_swap_seconds)
    add("pwdaemon_compile_queue_depth", (model,), m.queue_depth)
    add("pwdaemon_compiles_in_flight", (model,), m.in_flight)
    for reason, n in sorted(m.failures_by_reason.items()):
        add("pwdaemon_compile_failures", (model, reason), n)
    for reason, n in sorted(m.validation_rejects_by_reason.items()):
        add("pwdaemon_validation_rejects", (model, reason), n)
    add("pwdaemon_worker_restarts", (model,), m.worker_restarts)
    for source, n in sorted(m.loads_by_source.items()):
        add("pwdaemon_artifact_loads", (model, source), n)
    add("pwdaemon_store_bytes", (model,), m.store_bytes)
    add("pwdaemon_store_artifacts", (model,), m.store_artifacts)
    add("pwdaemon_store_write_errors", (model,), m.store_write_errors)
    add("pwdaemon_cuda_graphs", (model,), m.cuda_graphs)
    add("pwdaemon_cuda_graph_memory_bytes", (model,), m.cuda_graph_bytes)
    t = m.trace
    for strategy, n in sorted(t.pieces_by_strategy.items()):
        add("pwdaemon_graph_pieces", (model, strategy), n)
    add("pwdaemon_graph_breaks", (model,), t.graph_breaks)
    for cause, n in sorted(t.recompiles_by_cause.items()):
        add("pwdaemon_recompiles", (model, cause), n)
    add("pwdaemon_trace_misses", (model,), t.miss_calls)
    add("pwdaemon_error_fallback_calls", (model,), t.error_calls)
    for strategy, n in sorted(t.fallbacks_by_strategy.items()):
        add("pwdaemon_strategy_fallbacks", (model, strategy), n)
    add("pwdaemon_pieces_on_eager", (model,), t.pieces_on_eager)


class PwdaemonCollector:
    """A prometheus-client collector over a set of `MetricsSource`s.

    Thread-safe: sources are added and removed from engine threads while the HTTP
    server's threads call `collect`. `metrics_snapshot` runs on the scraping thread.
    """

    def __init__(self, sources: Iterable[MetricsSource] = ()) -> None:
        self._lock = threading.Lock()
        self._sources: list[MetricsSource] = list(sources)
        # Cumulative, so the error counter is monotonic across scrapes; both reasons
        # start at 0 so rate() has a baseline before the first error.
        self._errors: Counter[str] = Counter({"exception": 0, "duplicate_model": 0})
        # Warn once per (source, reason): a broken source would otherwise log at
        # every scrape (every 15 s by default) for as long as it stays registered.
        self._warned: set[tuple[int, str]] = set()

    def add(self, source: MetricsSource) -> None:
        """Start exporting `source`; adding one already present does nothing."""
        with self._lock:
            if not any(s is source for s in self._sources):
                self._sources.append(source)

    def remove(self, source: MetricsSource) -> None:
        """Stop exporting `source`; removing one not present does nothing."""
        with self._lock:
            # Identity, not ==: two sources may compare equal (dataclasses) and still
            # be different models.
            self._sources = [s for s in self._sources if s is not source]
            self._warned = {w for w in self._warned if w[0] != id(source)}

    def sources(self) -> list[MetricsSource]:
        with self._lock:
            return list(self._sources)

    def describe(self) -> Iterator[Metric]:
        """Empty families, so a registry can detect name clashes at registration."""
        for spec in METRIC_FAMILIES:
            yield spec.family()

    def collect(self) -> Iterator[Metric]:
        snapshots = self._snapshots()
        fams = {spec.name: spec.family() for spec in METRIC_FAMILIES}
        for snap in snapshots:
            _add_model(fams, snap)
        errors = fams["pwdaemon_metrics_source_errors"]
        assert isinstance(errors, CounterMetricFamily)
        with self._lock:
            counts = sorted(self._errors.items())
        for reason, n in counts:
            errors.add_metric((reason,), n)
        yield from fams.values()

    def _snapshots(self) -> list[ModelMetrics]:
        out: list[ModelMetrics] = []
        seen: set[str] = set()
        for source in self.sources():
            try:
                snap = source.metrics_snapshot()
            except Exception:
                # One broken source must not fail the whole scrape (a 500 would hide
                # every other model's metrics too).
                self._error(source, "exception", exc_info=True)
                continue
            if snap.model in seen:
                # Two sources with one model label would export duplicate series,
                # which Prometheus rejects for the whole scrape: keep the first.
                self._error(source, "duplicate_model", exc_info=False, model=snap.model)
                continue
            seen.add(snap.model)
            out.append(snap)
        return out

    def _error(
        self, source: MetricsSource, reason: str, *, exc_info: bool, model: str = ""
    ) -> None:
        with self._lock:
            self._errors[reason] += 1
            first = (id(source), reason) not in self._warned
            self._warned.add((id(source), reason))
        level = logging.WARNING if first else logging.DEBUG
        logger.log(
            level,
            "pwdaemon metrics: skipped source %r (%s%s)",
            source,
            reason,
            f", model={model!r}" if model else "",
            exc_info=exc_info,
        )


# The process-wide hub every attached model registers into.
_HUB = PwdaemonCollector()


def register_source(source: MetricsSource) -> None:
    """Export `source` on the process's endpoint (and any `register_into` registry)."""
    _HUB.add(source)


def unregister_source(source: MetricsSource) -> None:
    """Stop exporting `source`; its series vanish from the next scrape."""
    _HUB.remove(source)


_REGISTERING = threading.Lock()  # one check-then-register at a time


def register_into(registry: CollectorRegistry) -> PwdaemonCollector:
    """Add the hub's collector to a registry of the user's (e.g. the global REGISTRY),
    once: every attached model may ask for the same registry (`Handle.register_metrics`),
    and a registry holding it already is left as it is.

    Returns the collector, so `registry.unregister(collector)` undoes it. A registry
    whose own metrics clash with pwdaemon's names raises ValueError (prometheus-client's
    duplicate check).
    """
    with _REGISTERING:
        # prometheus-client's registry keeps its collectors in `_collector_to_names`, a
        # private attribute: asking the registry, not a list of our own, keeps an
        # unregister by the user followed by another registration right. Without the
        # attribute the registration is simply tried (a repeat then raises ValueError).
        if _HUB not in getattr(registry, "_collector_to_names", {}):
            registry.register(_HUB)
    return _HUB


class MetricsServer:
    """The process's metrics HTTP endpoint, as returned by `serve_metrics`."""

    def __init__(self, addr: str, requested_port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_HUB)
        self.addr = addr
        self.requested_port = requested_port
        self._httpd, self._thread = start_http_server(
            requested_port, addr=addr, registry=self.registry
        )
        # With port 0 the OS picked one; the bound socket says which.
        self.port: int = int(self._httpd.server_port)
        self._closed = False

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    @property
    def closed(self) -> bool:
        return self._closed

    def close(self) -> None:
        """Stop serving and free the port; later `serve_metrics` calls start anew."""
        global _SERVER
        with _SERVER_LOCK:
            if self._closed:
                return
            self._closed = True
            if _SERVER is self:
                _SERVER = None
        self._httpd.shutdown()  # returns once serve_forever has exited
        self._httpd.server_close()
        self._thread.join(timeout=5.0)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else "serving"
        return f"<MetricsServer {self.url} {state}>"


_SERVER_LOCK = threading.Lock()
_SERVER: MetricsServer | None = None


def serve_metrics(port: int = 0, addr: str = "127.0.0.1") -> MetricsServer:
    """Start the process's one metrics endpoint, or return the one already running.

    Every attached model may call this: a call with the same `addr` and either the
    same `port` or port 0 ("any") returns the running server. A call asking for a
    different address or port while one runs raises RuntimeError, since a second
    endpoint would export the same series twice. Port 0 lets the OS pick a free port;
    `MetricsServer.port` and `.url` tell which.

    The endpoint lives until `MetricsServer.close()` or process exit; detaching one
    model should `unregister_source` its source, not close the shared server.
    Binds 127.0.0.1 unless told otherwise: exposing it is a deliberate choice.
    """
    global _SERVER
    with _SERVER_LOCK:
        current = _SERVER
        if current is not None:
            if current.addr == addr and port in (0, current.port):
                return current
            raise RuntimeError(
                f"pwdaemon metrics already served at {current.url}; "
                f"cannot also serve on {addr}:{port} (close() it first)"
            )
        _SERVER = MetricsServer(addr, port)
        return _SERVER
