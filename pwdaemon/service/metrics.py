"""What the service exports to Prometheus, read from plain counters at scrape time.

The server bumps the counters in `ServiceStats` from its event loop (ints and dicts,
no locks: a scrape reading a value one event stale is fine). Every labelled counter
starts with all its label values at 0, so each family has samples from the first
scrape and rate() has a baseline. Families are `pwdaemon_service_*`: they describe the
host service, not a model, and carry no `model` label.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from prometheus_client import start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import CollectorRegistry
from prometheus_client.utils import floatToGoString

from pwdaemon.metrics.stats import HistogramCounts
from pwdaemon.service.config import ReloadOutcome
from pwdaemon.service.credentials import Verdict
from pwdaemon.service.protocol import JobOutcome, RefusalReason, SubmitResult

TARGET_KINDS = ("general", "range", "size")


@dataclass
class ServiceStats:
    """Counters and gauges the server keeps; the collector reads them."""

    jobs: dict[tuple[str, str], int] = field(
        default_factory=lambda: {(t, o.value): 0 for t in TARGET_KINDS for o in JobOutcome}
    )
    submits: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SubmitResult, 0))
    connections: dict[str, int] = field(default_factory=lambda: dict.fromkeys(Verdict, 0))
    refusals: dict[str, int] = field(default_factory=lambda: dict.fromkeys(RefusalReason, 0))
    compile_seconds: HistogramCounts = field(default_factory=HistogramCounts)
    queue_wait_seconds: HistogramCounts = field(default_factory=HistogramCounts)
    clients_connected: int = 0


@dataclass(frozen=True)
class ServiceSnapshot:
    stats: ServiceStats
    queue_depth: int
    in_flight: int
    concurrency_limit: int
    worker_restarts: int
    config_reloads: dict[ReloadOutcome, int]
    store_bytes: int
    store_artifacts: int
    store_write_errors: int
    uptime_seconds: float


Kind = Literal["counter", "gauge", "histogram"]

# name (counters without _total), kind, help, labels
SERVICE_FAMILIES: tuple[tuple[str, Kind, str, tuple[str, ...]], ...] = (
    ("pwdaemon_service_queue_depth", "gauge", "Compile jobs queued, waiting for a worker.", ()),
    ("pwdaemon_service_in_flight", "gauge", "Compile jobs running in a worker now.", ()),
    (
        "pwdaemon_service_concurrency_limit",
        "gauge",
        "Compiles allowed to run at once for all clients (config `workers`).",
        (),
    ),
    (
        "pwdaemon_service_jobs",
        "counter",
        "Compile jobs finished, by target kind and outcome (stored: the artifact was "
        "already in the store, nothing compiled).",
        ("target", "outcome"),
    ),
    (
        "pwdaemon_service_compile_duration_seconds",
        "histogram",
        "Wall time of one compile in a worker.",
        (),
    ),
    (
        "pwdaemon_service_queue_wait_seconds",
        "histogram",
        "Time a job waited in the queue before a worker took it.",
        (),
    ),
    (
        "pwdaemon_service_submits",
        "counter",
        "Submits received, by result: queued (a new job), deduplicated (joined a job "
        "for the same key), stored (already in the store).",
        ("result",),
    ),
    ("pwdaemon_service_clients_connected", "gauge", "Client connections open now.", ()),
    (
        "pwdaemon_service_connections",
        "counter",
        "Connections accepted or refused by the peer-credential check.",
        ("verdict",),
    ),
    (
        "pwdaemon_service_frames_refused",
        "counter",
        "Requests answered with an error (the connection is then closed), by reason.",
        ("reason",),
    ),
    (
        "pwdaemon_service_config_reloads",
        "counter",
        "Config file re-reads, by outcome (invalid: the running config was kept).",
        ("outcome",),
    ),
    (
        "pwdaemon_service_worker_restarts",
        "counter",
        "Compile worker processes restarted after dying or hanging.",
        (),
    ),
    ("pwdaemon_service_store_bytes", "gauge", "Bytes held by the shared artifact store.", ()),
    ("pwdaemon_service_store_artifacts", "gauge", "Artifacts in the shared store.", ()),
    (
        "pwdaemon_service_store_write_errors",
        "counter",
        "Failed writes to the shared artifact store.",
        (),
    ),
    ("pwdaemon_service_uptime_seconds", "gauge", "Seconds since the service started.", ()),
)


def _family(name: str, kind: Kind, help_: str, labels: tuple[str, ...]) -> Metric:
    if kind == "counter":
        return CounterMetricFamily(name, help_, labels=labels)
    if kind == "gauge":
        return GaugeMetricFamily(name, help_, labels=labels)
    return HistogramMetricFamily(name, help_, labels=labels)


class ServiceCollector:
    """A prometheus-client collector over `snapshot()` (called on the scrape thread)."""

    def __init__(self, snapshot: Callable[[], ServiceSnapshot]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterator[Metric]:
        for spec in SERVICE_FAMILIES:
            yield _family(*spec)

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot()
        fams = {spec[0]: _family(*spec) for spec in SERVICE_FAMILIES}

        def add(name: str, value: float, *labels: str) -> None:
            fam = fams[name]
            assert isinstance(fam, CounterMetricFamily | GaugeMetricFamily)
            fam.add_metric(list(labels), value)

        def hist(name: str, h: HistogramCounts) -> None:
            fam = fams[name]
            assert isinstance(fam, HistogramMetricFamily)
            buckets = [(floatToGoString(b), float(c)) for b, c in h.cumulative()]
            fam.add_metric([], buckets, sum_value=h.total)

        add("pwdaemon_service_queue_depth", s.queue_depth)
        add("pwdaemon_service_in_flight", s.in_flight)
        add("pwdaemon_service_concurrency_limit", s.concurrency_limit)
        for (target, outcome), n in sorted(dict(s.stats.jobs).items()):
            add("pwdaemon_service_jobs", n, target, outcome)
        hist("pwdaemon_service_compile_duration_seconds", s.stats.compile_seconds)
        hist("pwdaemon_service_queue_wait_seconds", s.stats.queue_wait_seconds)
        for result, n in sorted(dict(s.stats.submits).items()):
            add("pwdaemon_service_submits", n, str(result))
        add("pwdaemon_service_clients_connected", s.stats.clients_connected)
        for verdict, n in sorted(dict(s.stats.connections).items()):
            add("pwdaemon_service_connections", n, str(verdict))
        for reason, n in sorted(dict(s.stats.refusals).items()):
            add("pwdaemon_service_frames_refused", n, str(reason))
        for outcome, n in sorted(s.config_reloads.items()):
            add("pwdaemon_service_config_reloads", n, str(outcome))
        add("pwdaemon_service_worker_restarts", s.worker_restarts)
        add("pwdaemon_service_store_bytes", s.store_bytes)
        add("pwdaemon_service_store_artifacts", s.store_artifacts)
        add("pwdaemon_service_store_write_errors", s.store_write_errors)
        add("pwdaemon_service_uptime_seconds", s.uptime_seconds)
        yield from fams.values()


class ServiceMetricsServer:
    """The service's own HTTP endpoint, with a registry holding only service metrics."""

    def __init__(self, collector: ServiceCollector, port: int, addr: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(collector)  # type: ignore[arg-type]
        self.addr = addr
        self._httpd: Any
        self._thread: threading.Thread
        self._httpd, self._thread = start_http_server(port, addr=addr, registry=self.registry)
        self.port = int(self._httpd.server_port)

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(5.0)
