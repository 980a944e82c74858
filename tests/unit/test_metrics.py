"""Tests for pwdaemon.metrics.exposition: the scrape-time collector and the shared endpoint.

Every test scrapes the real HTTP endpoint (port 0, 127.0.0.1) with urllib and parses
the text with prometheus-client's own parser. Model names are unique per test, so
sources other test modules may leave in the process-wide hub cannot interfere.
"""

from __future__ import annotations

import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from prometheus_client import REGISTRY, CollectorRegistry, Gauge, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pwdaemon.metrics.exposition import (
    METRIC_FAMILIES,
    MetricsServer,
    register_into,
    register_source,
    serve_metrics,
    unregister_source,
)
from pwdaemon.metrics.stats import (
    COMPILE_SECONDS_BUCKETS,
    HistogramCounts,
    ModelMetrics,
    PieceMetrics,
    TraceMetrics,
)

Key = tuple[str, frozenset[tuple[str, str]]]


@dataclass
class FakePiece:
    graph: int
    table_version: int = 1
    calls_by_tier: dict[str, int] = field(default_factory=dict)
    distinct_sizes: int = 0
    overflow_calls: int = 0
    live_entries_by_tier: dict[str, int] = field(default_factory=dict)


@dataclass
class FakeSource:
    """A MetricsSource whose numbers the test mutates between scrapes."""

    model: str
    pieces: list[FakePiece] = field(default_factory=lambda: [FakePiece(0)])
    jobs_by_outcome: dict[tuple[str, str], int] = field(default_factory=dict)
    compile_seconds: HistogramCounts = field(default_factory=HistogramCounts)
    hot_to_swap_seconds: HistogramCounts = field(default_factory=HistogramCounts)
    queue_depth: int = 0
    in_flight: int = 0
    validation_rejects_by_reason: dict[str, int] = field(default_factory=dict)
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    worker_restarts: int = 0
    loads_by_source: dict[str, int] = field(default_factory=dict)
    store_bytes: int = 0
    store_artifacts: int = 0
    store_write_errors: int = 0
    trace: TraceMetrics = field(
        default_factory=lambda: TraceMetrics(
            pieces_by_strategy={"unbacked": 1, "backed_oblivious": 0},
            recompiles_by_cause={"settling": 0, "hot_signature": 0},
            fallbacks_by_strategy={"unbacked": 0, "backed_oblivious": 0},
        )
    )

    def metrics_snapshot(self) -> ModelMetrics:
        # A copy, as the engine must hand out: the scrape thread reads it later.
        return ModelMetrics(
            model=self.model,
            pieces=[
                PieceMetrics(
                    graph=p.graph,
                    table_version=p.table_version,
                    calls_by_tier=dict(p.calls_by_tier),
                    distinct_sizes=p.distinct_sizes,
                    overflow_calls=p.overflow_calls,
                    live_entries_by_tier=dict(p.live_entries_by_tier),
                )
                for p in self.pieces
            ],
            jobs_by_outcome=dict(self.jobs_by_outcome),
            compile_seconds=self.compile_seconds,
            hot_to_swap_seconds=self.hot_to_swap_seconds,
            queue_depth=self.queue_depth,
            in_flight=self.in_flight,
            validation_rejects_by_reason=dict(self.validation_rejects_by_reason),
            failures_by_reason=dict(self.failures_by_reason),
            worker_restarts=self.worker_restarts,
            loads_by_source=dict(self.loads_by_source),
            store_bytes=self.store_bytes,
            store_artifacts=self.store_artifacts,
            store_write_errors=self.store_write_errors,
            trace=self.trace,
        )


class BrokenSource:
    def metrics_snapshot(self) -> ModelMetrics:
        raise RuntimeError("engine is gone")


def unique_model(prefix: str = "m") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def sources() -> Iterator[list[object]]:
    """Sources a test registers; all unregistered afterwards, whatever happened."""
    registered: list[object] = []
    yield registered
    for s in registered:
        unregister_source(s)  # type: ignore[arg-type]


def add(registered: list[object], source: object) -> None:
    register_source(source)  # type: ignore[arg-type]
    registered.append(source)


@pytest.fixture(scope="module", autouse=True)
def _close_endpoint_after_module() -> Iterator[None]:
    # One endpoint serves the whole module: close() waits out serve_forever's 0.5 s
    # poll, so a server per test would cost half a second each.
    yield
    serve_metrics(port=0).close()


@pytest.fixture
def server() -> MetricsServer:
    """The process's endpoint: the running one, or a new one if a test closed it."""
    return serve_metrics(port=0)


def fetch(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as resp:
        assert resp.status == 200
        return str(resp.read().decode("utf-8"))


def samples(text: str, model: str | None = None) -> dict[Key, float]:
    """(sample name, label set) -> value, optionally only one model's series."""
    out: dict[Key, float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if model is not None and s.labels.get("model") != model:
                continue
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def key(name: str, **labels: str) -> Key:
    return (name, frozenset(labels.items()))


def test_scrape_reflects_source_and_values_move(
    server: MetricsServer, sources: list[object]
) -> None:
    m = unique_model()
    src = FakeSource(m)
    src.pieces[0].calls_by_tier.update(eager=5, general=3, size=2)
    src.pieces[0].live_entries_by_tier.update(general=1, size=1)
    src.pieces[0].distinct_sizes = 4
    src.jobs_by_outcome[("size", "ok")] = 1
    src.compile_seconds.observe(3.0)
    src.queue_depth = 2
    src.loads_by_source["compiled"] = 1
    add(sources, src)

    before = samples(fetch(server.url), m)
    assert before[key("pwdaemon_calls_total", model=m, graph="0", tier="eager")] == 5
    assert before[key("pwdaemon_calls_total", model=m, graph="0", tier="size")] == 2
    assert before[key("pwdaemon_specialized_calls_total", model=m, graph="0")] == 2
    assert before[key("pwdaemon_live_entries", model=m, graph="0", tier="size")] == 1
    assert before[key("pwdaemon_distinct_sizes", model=m, graph="0")] == 4
    assert before[key("pwdaemon_compile_jobs_total", model=m, target="size", outcome="ok")] == 1
    assert before[key("pwdaemon_compile_queue_depth", model=m)] == 2
    assert before[key("pwdaemon_compile_duration_seconds_count", model=m)] == 1
    assert before[key("pwdaemon_compile_duration_seconds_sum", model=m)] == 3.0
    assert before[key("pwdaemon_compile_duration_seconds_bucket", model=m, le="2.5")] == 0
    assert before[key("pwdaemon_compile_duration_seconds_bucket", model=m, le="5.0")] == 1
    assert key("pwdaemon_compile_failures_total", model=m, reason="timeout") not in before

    # The engine's numbers move; the next scrape must show it with no other action.
    piece = src.pieces[0]
    piece.calls_by_tier["size"] += 10
    piece.calls_by_tier["range"] = 4
    piece.table_version = 7
    piece.overflow_calls = 3
    src.pieces.append(FakePiece(1, calls_by_tier={"eager": 1}))
    src.jobs_by_outcome[("general", "failed")] = 1
    src.failures_by_reason["timeout"] = 1
    src.validation_rejects_by_reason["mismatch"] = 2
    src.compile_seconds.observe(700.0)
    src.hot_to_swap_seconds.observe(12.0)
    src.queue_depth = 0
    src.in_flight = 1
    src.worker_restarts = 1
    src.loads_by_source["store"] = 5
    src.store_bytes = 1 << 20
    src.store_artifacts = 3
    src.store_write_errors = 1

    after = samples(fetch(server.url), m)
    assert after[key("pwdaemon_calls_total", model=m, graph="0", tier="size")] == 12
    assert after[key("pwdaemon_calls_total", model=m, graph="1", tier="eager")] == 1
    assert after[key("pwdaemon_specialized_calls_total", model=m, graph="0")] == 16
    assert after[key("pwdaemon_specialized_calls_total", model=m, graph="1")] == 0
    assert after[key("pwdaemon_table_version", model=m, graph="0")] == 7
    assert after[key("pwdaemon_size_overflow_calls_total", model=m, graph="0")] == 3
    assert (
        after[key("pwdaemon_compile_jobs_total", model=m, target="general", outcome="failed")] == 1
    )
    assert after[key("pwdaemon_compile_failures_total", model=m, reason="timeout")] == 1
    assert after[key("pwdaemon_validation_rejects_total", model=m, reason="mismatch")] == 2
    assert after[key("pwdaemon_compile_duration_seconds_count", model=m)] == 2
    assert after[key("pwdaemon_compile_duration_seconds_bucket", model=m, le="600.0")] == 1
    assert after[key("pwdaemon_compile_duration_seconds_bucket", model=m, le="1800.0")] == 2
    assert after[key("pwdaemon_hot_to_swap_seconds_count", model=m)] == 1
    assert after[key("pwdaemon_hot_to_swap_seconds_sum", model=m)] == 12.0
    assert after[key("pwdaemon_compile_queue_depth", model=m)] == 0
    assert after[key("pwdaemon_compiles_in_flight", model=m)] == 1
    assert after[key("pwdaemon_worker_restarts_total", model=m)] == 1
    assert after[key("pwdaemon_artifact_loads_total", model=m, source="store")] == 5
    assert after[key("pwdaemon_store_bytes", model=m)] == 1 << 20
    assert after[key("pwdaemon_store_artifacts", model=m)] == 3
    assert after[key("pwdaemon_store_write_errors_total", model=m)] == 1


def test_histogram_buckets_are_the_compile_buckets(
    server: MetricsServer, sources: list[object]
) -> None:
    m = unique_model()
    src = FakeSource(m)
    for v in (0.05, 0.1, 1.0, 45.0, 5000.0):
        src.compile_seconds.observe(v)
    add(sources, src)
    got = {
        s.labels["le"]: s.value
        for fam in text_string_to_metric_families(fetch(server.url))
        for s in fam.samples
        if s.name == "pwdaemon_compile_duration_seconds_bucket" and s.labels["model"] == m
    }
    assert [float(le) for le in got] == [*COMPILE_SECONDS_BUCKETS, float("inf")]
    # le is inclusive: 0.1 lands in the 0.1 bucket; 5000 s only in +Inf.
    assert got["0.1"] == 2
    assert got["60.0"] == 4
    assert got["1800.0"] == 4
    assert got["+Inf"] == 5


def test_two_sources_share_one_endpoint(server: MetricsServer, sources: list[object]) -> None:
    a, b = FakeSource(unique_model("a")), FakeSource(unique_model("b"))
    a.queue_depth, b.queue_depth = 3, 9
    add(sources, a)
    # The second attached model asks for an endpoint too and gets the same one.
    assert serve_metrics(port=0) is server
    assert serve_metrics(port=server.port) is server
    add(sources, b)

    got = samples(fetch(server.url))
    assert got[key("pwdaemon_compile_queue_depth", model=a.model)] == 3
    assert got[key("pwdaemon_compile_queue_depth", model=b.model)] == 9
    assert server.url == f"http://127.0.0.1:{server.port}/metrics"
    assert server.port != 0


def test_second_endpoint_on_another_port_is_refused(server: MetricsServer) -> None:
    with pytest.raises(RuntimeError, match="already served"):
        serve_metrics(port=server.port + 1)
    with pytest.raises(RuntimeError, match="already served"):
        serve_metrics(port=0, addr="0.0.0.0")


def test_unregister_removes_series(server: MetricsServer, sources: list[object]) -> None:
    keep, drop = FakeSource(unique_model("keep")), FakeSource(unique_model("drop"))
    for s in (keep, drop):
        s.pieces[0].calls_by_tier["eager"] = 1
        add(sources, s)
    text = fetch(server.url)
    assert samples(text, drop.model) and samples(text, keep.model)

    unregister_source(drop)
    unregister_source(drop)  # a second detach is harmless
    text = fetch(server.url)
    assert samples(text, drop.model) == {}
    assert (
        samples(text, keep.model)[
            key("pwdaemon_calls_total", model=keep.model, graph="0", tier="eager")
        ]
        == 1
    )


def test_registering_twice_exports_once(server: MetricsServer, sources: list[object]) -> None:
    src = FakeSource(unique_model())
    add(sources, src)
    register_source(src)
    # Duplicate series would make the exposition invalid; the parser keeps both.
    names = [
        s.name
        for fam in text_string_to_metric_families(fetch(server.url))
        for s in fam.samples
        if s.labels.get("model") == src.model and s.name == "pwdaemon_compile_queue_depth"
    ]
    assert names == ["pwdaemon_compile_queue_depth"]


def error_count(text: str, reason: str) -> float:
    return samples(text)[key("pwdaemon_metrics_source_errors_total", reason=reason)]


def test_broken_or_duplicate_source_is_skipped_not_fatal(
    server: MetricsServer, sources: list[object]
) -> None:
    good = FakeSource(unique_model())
    good.queue_depth = 4
    twin = FakeSource(good.model)
    twin.queue_depth = 99
    before = fetch(server.url)
    add(sources, good)
    add(sources, BrokenSource())
    add(sources, twin)

    after = fetch(server.url)
    # The first source with a model label wins; the scrape still succeeds.
    assert samples(after, good.model)[key("pwdaemon_compile_queue_depth", model=good.model)] == 4
    assert error_count(after, "exception") == error_count(before, "exception") + 1
    assert error_count(after, "duplicate_model") == error_count(before, "duplicate_model") + 1


def test_close_frees_the_endpoint_and_a_new_one_can_start() -> None:
    first = serve_metrics(port=0)
    url = first.url
    fetch(url)
    first.close()
    first.close()  # idempotent
    assert first.closed
    with pytest.raises(urllib.error.URLError):
        fetch(url)
    second = serve_metrics(port=0)  # left running for the rest of the module
    assert second is not first
    assert not second.closed
    fetch(second.url)


def test_endpoint_does_not_expose_or_touch_the_default_registry(
    server: MetricsServer, sources: list[object]
) -> None:
    add(sources, FakeSource(unique_model()))
    text = fetch(server.url)
    families = {fam.name for fam in text_string_to_metric_families(text)}
    assert families == {spec.name for spec in METRIC_FAMILIES}
    # The default registry (process_*, python_gc_* ...) is the user's: ours is apart.
    default_text = generate_latest(REGISTRY).decode()
    assert "pwdaemon_" not in default_text


def test_register_into_a_user_registry(sources: list[object]) -> None:
    src = FakeSource(unique_model())
    src.store_artifacts = 6
    add(sources, src)
    registry = CollectorRegistry()
    collector = register_into(registry)
    assert register_into(registry) is collector  # another model's call: a no-op
    got = samples(generate_latest(registry).decode(), src.model)
    assert got[key("pwdaemon_store_artifacts", model=src.model)] == 6
    registry.unregister(collector)
    assert "pwdaemon_" not in generate_latest(registry).decode()
    register_into(registry)  # registered again after the user's unregister
    got = samples(generate_latest(registry).decode(), src.model)
    assert got[key("pwdaemon_store_artifacts", model=src.model)] == 6


def test_register_into_refuses_a_registry_whose_names_clash(sources: list[object]) -> None:
    add(sources, FakeSource(unique_model()))
    registry = CollectorRegistry()
    Gauge("pwdaemon_store_artifacts", "the user's own, same name", registry=registry)
    with pytest.raises(ValueError):
        register_into(registry)  # prometheus-client's duplicate check, not swallowed


def test_labels_match_the_declared_families(server: MetricsServer, sources: list[object]) -> None:
    src = FakeSource(unique_model())
    src.pieces[0].calls_by_tier["size"] = 1
    src.pieces[0].live_entries_by_tier["size"] = 1
    src.jobs_by_outcome[("size", "ok")] = 1
    src.failures_by_reason["oom"] = 1
    src.validation_rejects_by_reason["nan"] = 1
    src.loads_by_source["peer"] = 1
    src.hot_to_swap_seconds.observe(1.0)
    add(sources, src)
    declared = {spec.name: set(spec.labels) for spec in METRIC_FAMILIES}
    seen: set[str] = set()
    for fam in text_string_to_metric_families(fetch(server.url)):
        for s in fam.samples:
            if s.labels.get("model") != src.model:
                continue
            seen.add(fam.name)
            assert set(s.labels) - {"le"} == declared[fam.name], s
    assert seen == set(declared) - {"pwdaemon_metrics_source_errors"}


@pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="promtool not on PATH (Debian/Ubuntu: apt-get install prometheus)",
)
def test_promtool_accepts_the_exposition(server: MetricsServer, sources: list[object]) -> None:
    for name in ("a", "b"):
        src = FakeSource(unique_model(name))
        src.pieces[0].calls_by_tier.update(eager=1, size=2)
        src.pieces[0].live_entries_by_tier["size"] = 1
        src.jobs_by_outcome[("size", "ok")] = 1
        src.failures_by_reason["oom"] = 1
        src.validation_rejects_by_reason["mismatch"] = 1
        src.loads_by_source["store"] = 1
        src.compile_seconds.observe(2.0)
        src.hot_to_swap_seconds.observe(20.0)
        add(sources, src)
    add(sources, BrokenSource())  # so the error counter has a non-zero sample too
    text = fetch(server.url)
    proc = subprocess.run(
        ["promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    # promtool prints lint problems and exits 1; a clean exposition prints nothing.
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "" and proc.stderr.strip() == ""


def test_trace_families_carry_counts_with_low_cardinality_labels(
    server: MetricsServer, sources: list[object]
) -> None:
    src = FakeSource(unique_model())
    src.trace = TraceMetrics(
        pieces_by_strategy={"unbacked": 2, "backed_oblivious": 1},
        graph_breaks=3,
        recompiles_by_cause={"settling": 1, "hot_signature": 2},
        miss_calls=7,
        error_calls=4,
        fallbacks_by_strategy={"unbacked": 1, "backed_oblivious": 0},
        pieces_on_eager=1,
    )
    add(sources, src)
    got = samples(fetch(server.url), src.model)
    m = src.model
    assert got[key("pwdaemon_graph_pieces", model=m, strategy="unbacked")] == 2
    assert got[key("pwdaemon_graph_pieces", model=m, strategy="backed_oblivious")] == 1
    assert got[key("pwdaemon_graph_breaks_total", model=m)] == 3
    assert got[key("pwdaemon_recompiles_total", model=m, cause="settling")] == 1
    assert got[key("pwdaemon_recompiles_total", model=m, cause="hot_signature")] == 2
    assert got[key("pwdaemon_trace_misses_total", model=m)] == 7
    assert got[key("pwdaemon_error_fallback_calls_total", model=m)] == 4
    assert got[key("pwdaemon_strategy_fallbacks_total", model=m, strategy="unbacked")] == 1
    assert got[key("pwdaemon_pieces_on_eager", model=m)] == 1
