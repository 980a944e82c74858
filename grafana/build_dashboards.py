"""The one definition of pwdaemon's Grafana dashboards; the JSON files are generated.

    python grafana/build_dashboards.py           # rewrite grafana/dashboards/*.json
    python grafana/build_dashboards.py --check   # exit 1 if the committed JSON is stale

Edit panels here, never in the JSON (or in Grafana's UI followed by an export): the
JSON is committed so it can be provisioned or imported without running Python, and
tests/test_grafana.py checks it matches this file and that every query names a metric
pwdaemon actually exports.

Conventions every panel follows (the tests enforce them):
- the data source is the `datasource` template variable, `${datasource}`, so one
  dashboard works against any Prometheus without an import-time `DS_...` input;
- every query filters on the `job`, `instance` and (where the metric has it) `model`
  variables;
- counters go through rate()/increase() over `$__rate_interval`, which Grafana keeps at
  least four scrape intervals long, so a panel never shows gaps at a short zoom;
- every panel has a unit and a description.
Stdlib only: it must run wherever the repository is checked out.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

Json = dict[str, Any]

DASHBOARD_DIR = Path(__file__).resolve().parent / "dashboards"
DS: Json = {"type": "prometheus", "uid": "${datasource}"}
RI = "$__rate_interval"

# Label filters. Metrics without a model label (the collector's own error counter)
# filter on job and instance only.
SEL_HOST = 'job=~"$job", instance=~"$instance"'
SEL = SEL_HOST + ', model=~"$model"'

# Compile jobs, failures and restarts are rare: per minute reads better than 0.0x/s.
PER_MIN = "60 * "

WIDTH = 24  # Grafana's grid is 24 columns wide
PIECE = "{{model}} graph {{graph}}"  # legend of a per-graph-piece series


def target(expr: str, legend: str, ref: str, **extra: Any) -> Json:
    return {
        "datasource": DS,
        "editorMode": "code",
        "expr": expr,
        "legendFormat": legend,
        "range": True,
        "refId": ref,
        **extra,
    }


def timeseries(
    title: str,
    description: str,
    unit: str,
    queries: list[tuple[str, str]],
    *,
    stacked: bool = False,
    min_: float | None = 0,
    max_: float | None = None,
    width: int = 12,
) -> Json:
    defaults: Json = {
        "unit": unit,
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 30 if stacked else 10,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if stacked else "none", "group": "A"},
        },
    }
    if min_ is not None:
        defaults["min"] = min_
    if max_ is not None:
        defaults["max"] = max_
    return {
        "type": "timeseries",
        "title": title,
        "description": description,
        "datasource": DS,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        },
        "targets": [
            target(expr, legend, chr(ord("A") + i)) for i, (expr, legend) in enumerate(queries)
        ],
        "_width": width,
    }


def heatmap(title: str, description: str, bucket_metric: str, y_unit: str) -> Json:
    expr = f"sum by (le) (increase({bucket_metric}{{{SEL}}}[{RI}]))"
    return {
        "type": "heatmap",
        "title": title,
        "description": description,
        "datasource": DS,
        # The cells count jobs; the y axis (the buckets) carries the time unit.
        "fieldConfig": {"defaults": {"unit": "short"}, "overrides": []},
        "options": {
            "calculate": False,
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64},
            "yAxis": {"axisPlacement": "left", "unit": y_unit},
            "rowsFrame": {"layout": "auto"},
            "tooltip": {"mode": "single", "yHistogram": True},
            "legend": {"show": True},
        },
        "targets": [target(expr, "{{le}}", "A", format="heatmap")],
        "_width": 12,
    }


def row(title: str) -> Json:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "_width": WIDTH}


def quantiles(metric: str, who: str) -> list[tuple[str, str]]:
    """p50, p95 and the mean of a histogram, per model."""
    out = [
        (
            f"histogram_quantile({q}, sum by (model, le) (rate({metric}_bucket{{{SEL}}}[{RI}])))",
            f"p{round(q * 100)} {{{{model}}}}",
        )
        for q in (0.5, 0.95)
    ]
    out.append(
        (
            f"sum by (model) (rate({metric}_sum{{{SEL}}}[{RI}])) / "
            f"sum by (model) (rate({metric}_count{{{SEL}}}[{RI}]))",
            f"mean {{{{model}}}} ({who})",
        )
    )
    return out


# ---- panels, each defined once and shared by the dashboards that show it ----------


def calls_by_tier() -> Json:
    return timeseries(
        "Calls by tier",
        "Calls per second, by the tier of the runnable that answered them: eager "
        "(captured graph in Python), general (one dynamic-shape compile), range/size "
        "(specialized compiles), graph (CUDA-graph replay). Stacked: the top is total "
        "traffic.",
        "ops",
        [(f"sum by (tier) (rate(pwdaemon_calls_total{{{SEL}}}[{RI}]))", "{{tier}}")],
        stacked=True,
    )


def specialized_ratio() -> Json:
    return timeseries(
        "Specialized-hit ratio",
        "Share of calls answered by a runnable specialized for their size or range "
        "(tiers range, size, graph). Low while hot sizes are still compiling; a ratio "
        "that stays low means traffic brings more sizes than the budget specializes.",
        "percentunit",
        [
            (
                f"sum by (model) (rate(pwdaemon_specialized_calls_total{{{SEL}}}[{RI}])) / "
                f"sum by (model) (rate(pwdaemon_calls_total{{{SEL}}}[{RI}]))",
                "{{model}}",
            )
        ],
        max_=1,
    )


def live_entries() -> Json:
    return timeseries(
        "Live runnables by tier",
        "Runnables in the published dispatch tables, by tier, summed over graph pieces.",
        "short",
        [(f"sum by (tier) (pwdaemon_live_entries{{{SEL}}})", "{{tier}}")],
        stacked=True,
    )


def table_versions() -> Json:
    return timeseries(
        "Dispatch table version",
        "Version of each graph piece's dispatch table; every swap of a new runnable "
        "adds one. A step is a swap; a flat line means nothing new landed.",
        "none",
        [(f"max by (model, graph) (pwdaemon_table_version{{{SEL}}})", PIECE)],
    )


def distinct_sizes() -> Json:
    return timeseries(
        "Distinct sizes seen",
        "Input sizes counted individually per graph piece. It stops growing at the "
        "size-histogram cap; later new sizes show up in 'Calls past the size cap'.",
        "short",
        [(f"max by (model, graph) (pwdaemon_distinct_sizes{{{SEL}}})", PIECE)],
    )


def size_overflow() -> Json:
    return timeseries(
        "Calls past the size cap",
        "Calls per second whose size arrived after the size histogram was full and was "
        "counted as 'other'. Non-zero means the traffic's size spread exceeds the cap, "
        "so the policy cannot see those sizes get hot.",
        "ops",
        [
            (
                f"sum by (model, graph) (rate(pwdaemon_size_overflow_calls_total{{{SEL}}}[{RI}]))",
                PIECE,
            )
        ],
    )


def graph_pieces() -> Json:
    return timeseries(
        "Graph pieces by strategy",
        "Graph pieces dynamo captured, by the shape strategy each was captured with. "
        "More than one piece per model means graph breaks (see 'Graph breaks and "
        "recompiles'; status() and the log give each break's reason).",
        "short",
        [(f"sum by (model, strategy) (pwdaemon_graph_pieces{{{SEL}}})", "{{model}} {{strategy}}")],
        stacked=True,
    )


def pieces_on_eager() -> Json:
    return timeseries(
        "Pieces left on eager",
        "Graph pieces with no compiled runnable after their planned compiles ended "
        "(general failed or gave up, general tier off...). Should be 0; status() and a "
        "WARNING log line say why for each piece.",
        "short",
        [(f"sum by (model) (pwdaemon_pieces_on_eager{{{SEL}}})", "{{model}}")],
    )


def trace_events() -> Json:
    return timeseries(
        "Graph breaks and recompiles",
        "Per minute: graph breaks dynamo reported, tracing calls that captured new "
        "pieces (by cause), and shape strategies that failed and fell back to the next. "
        "All should stop once the model has settled.",
        "opm",
        [
            (
                f"{PER_MIN}sum by (model) (rate(pwdaemon_graph_breaks_total{{{SEL}}}[{RI}]))",
                "breaks {{model}}",
            ),
            (
                f"{PER_MIN}sum by (model, cause) (rate(pwdaemon_recompiles_total{{{SEL}}}[{RI}]))",
                "recompiles {{model}} {{cause}}",
            ),
            (
                f"{PER_MIN}sum by (model, strategy) "
                f"(rate(pwdaemon_strategy_fallbacks_total{{{SEL}}}[{RI}]))",
                "fallbacks {{model}} {{strategy}}",
            ),
        ],
    )


def eager_calls() -> Json:
    return timeseries(
        "Calls served eager by the tracer",
        "Calls per second whose input no captured piece served (a new dtype, rank, grad "
        "mode or layout: a trace miss), and calls that raised on pwdaemon's path and "
        "were re-run eager. A steady miss rate means a stray input that is not hot yet.",
        "ops",
        [
            (
                f"sum by (model) (rate(pwdaemon_trace_misses_total{{{SEL}}}[{RI}]))",
                "misses {{model}}",
            ),
            (
                f"sum by (model) (rate(pwdaemon_error_fallback_calls_total{{{SEL}}}[{RI}]))",
                "errors {{model}}",
            ),
        ],
    )


def queue_and_in_flight() -> Json:
    return timeseries(
        "Compile queue and in flight",
        "Compile jobs waiting for a worker (queued) and running in one (in flight). A "
        "queue that keeps growing means workers cannot keep up with what becomes hot.",
        "short",
        [
            (f"sum by (model) (pwdaemon_compile_queue_depth{{{SEL}}})", "queued {{model}}"),
            (f"sum by (model) (pwdaemon_compiles_in_flight{{{SEL}}})", "in flight {{model}}"),
        ],
    )


def jobs_by_outcome() -> Json:
    return timeseries(
        "Compile jobs by outcome",
        "Compile jobs finished per minute, by target kind (size, range, general) and outcome.",
        "opm",
        [
            (
                f"{PER_MIN}sum by (target, outcome) "
                f"(rate(pwdaemon_compile_jobs_total{{{SEL}}}[{RI}]))",
                "{{target}} {{outcome}}",
            )
        ],
        stacked=True,
    )


def compile_duration() -> Json:
    return timeseries(
        "Compile duration p50 / p95",
        "Wall time of one compile job in a worker: median, 95th percentile (estimated "
        "from histogram buckets, 0.1 s to 30 min) and mean.",
        "s",
        quantiles("pwdaemon_compile_duration_seconds", "compile"),
    )


def compile_heatmap() -> Json:
    return heatmap(
        "Compile duration distribution",
        "Compile jobs per histogram bucket of wall time, over time. Cache hits sit at "
        "the bottom; autotuned large graphs at the top.",
        "pwdaemon_compile_duration_seconds_bucket",
        "s",
    )


def hot_to_swap() -> Json:
    return timeseries(
        "Time to specialize (hot to swap)",
        "Time from a size becoming hot to its specialized runnable serving calls: "
        "queueing, compiling, loading and validation together.",
        "s",
        quantiles("pwdaemon_hot_to_swap_seconds", "hot to swap"),
    )


def failures() -> Json:
    return timeseries(
        "Compile failures by reason",
        "Compile jobs that failed, per minute, by reason. The call keeps being served "
        "by the tier below.",
        "opm",
        [
            (
                f"{PER_MIN}sum by (reason) (rate(pwdaemon_compile_failures_total{{{SEL}}}[{RI}]))",
                "{{reason}}",
            )
        ],
        stacked=True,
    )


def validation_rejects() -> Json:
    return timeseries(
        "Validation rejects by reason",
        "Compiled runnables rejected per minute when checked against a live input, by "
        "reason; a rejected runnable is never swapped in.",
        "opm",
        [
            (
                f"{PER_MIN}sum by (reason) "
                f"(rate(pwdaemon_validation_rejects_total{{{SEL}}}[{RI}]))",
                "{{reason}}",
            )
        ],
        stacked=True,
    )


def loads_by_source() -> Json:
    return timeseries(
        "Artifact loads by source",
        "Artifacts loaded per minute, by where they came from: compiled (by our "
        "worker), store (on disk already, e.g. after a restart) or peer (compiled by "
        "another process on the host).",
        "opm",
        [
            (
                f"{PER_MIN}sum by (source) (rate(pwdaemon_artifact_loads_total{{{SEL}}}[{RI}]))",
                "{{source}}",
            )
        ],
        stacked=True,
    )


def model_gauge(title: str, description: str, unit: str, metric: str) -> Json:
    """A panel of one per-model gauge, one line per model."""
    return timeseries(
        title, description, unit, [(f"max by (model) ({metric}{{{SEL}}})", "{{model}}")]
    )


def store_size() -> Json:
    return model_gauge(
        "Artifact store size",
        "Bytes in the artifact store each model uses. Models sharing one store report "
        "the same store, so do not add them up.",
        "bytes",
        "pwdaemon_store_bytes",
    )


def store_artifacts() -> Json:
    return model_gauge(
        "Artifacts in store",
        "Artifacts in the artifact store each model uses (shared stores repeat).",
        "short",
        "pwdaemon_store_artifacts",
    )


def store_write_errors() -> Json:
    return timeseries(
        "Store write errors",
        "Failed artifact writes per minute (disk full, permissions). The runnable is "
        "still served from memory; only other processes and restarts miss it.",
        "opm",
        [
            (
                f"{PER_MIN}sum by (model) (rate(pwdaemon_store_write_errors_total{{{SEL}}}[{RI}]))",
                "{{model}}",
            )
        ],
    )


def cuda_graph_memory() -> Json:
    return model_gauge(
        "CUDA graph memory",
        "GPU memory each model's live CUDA graphs (tier 3) took in its graph pool. At "
        "GraphConfig.memory_budget_bytes the graph with the fewest replays is evicted "
        "before a new one is captured. Empty on CPU hosts.",
        "bytes",
        "pwdaemon_cuda_graph_memory_bytes",
    )


def cuda_graphs() -> Json:
    return model_gauge(
        "Live CUDA graphs",
        "CUDA graphs (tier 3) live per model: one per hot size once its tier-2 "
        "runnable is live on a GPU, fewer after evictions. Empty on CPU hosts.",
        "short",
        "pwdaemon_cuda_graphs",
    )


def worker_restarts() -> Json:
    return timeseries(
        "Worker restarts",
        "Compile worker processes restarted per minute after dying or hanging. "
        "Repeated restarts usually mean a compile crashes or runs out of memory.",
        "opm",
        [
            (
                f"{PER_MIN}sum by (model) (rate(pwdaemon_worker_restarts_total{{{SEL}}}[{RI}]))",
                "{{model}}",
            )
        ],
    )


def metrics_errors() -> Json:
    return timeseries(
        "Metrics collection errors",
        "Scrapes per minute that skipped an attached model's metrics: 'exception' "
        "(its snapshot raised) or 'duplicate_model' (two attached models share a name). "
        "Should be zero.",
        "opm",
        [
            (
                f"{PER_MIN}sum by (reason) "
                f"(rate(pwdaemon_metrics_source_errors_total{{{SEL_HOST}}}[{RI}]))",
                "{{reason}}",
            )
        ],
    )


# ---- dashboards ---------------------------------------------------------------------


def variables(anchor: str = "pwdaemon_compile_queue_depth", *, models: bool = True) -> list[Json]:
    # Every source exports a queue depth, whatever it does, so it names every model.
    # The host service's metrics have no model label: its dashboard has no model filter.

    def query_var(name: str, label: str, query: str) -> Json:
        return {
            "name": name,
            "label": label,
            "type": "query",
            "datasource": DS,
            "definition": query,
            "query": {"query": query, "refId": f"{name}-var"},
            "refresh": 2,  # on time-range change: new instances appear on their own
            "includeAll": True,
            "allValue": ".*",
            "multi": True,
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
            "hide": 0,
            "regex": "",
            "options": [],
        }

    out = [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "refresh": 1,
            "regex": "",
            "hide": 0,
            "current": {},
            "options": [],
        },
        query_var("job", "Job", f"label_values({anchor}, job)"),
        query_var("instance", "Instance", f'label_values({anchor}{{job=~"$job"}}, instance)'),
    ]
    if models:
        out.append(
            query_var(
                "model",
                "Model",
                f'label_values({anchor}{{job=~"$job", instance=~"$instance"}}, model)',
            )
        )
    return out


def layout(panels: list[Json]) -> list[Json]:
    """Assign ids and grid positions left to right, top to bottom."""
    out: list[Json] = []
    x = y = 0
    height = 8
    for i, panel in enumerate(panels, start=1):
        p = dict(panel)
        w = p.pop("_width")
        h = 1 if p["type"] == "row" else height
        if x + w > WIDTH:
            x, y = 0, y + height
        p["id"] = i
        p["gridPos"] = {"h": h, "w": w, "x": x, "y": y}
        out.append(p)
        x += w
        if x >= WIDTH:
            x, y = 0, y + h
    return out


def dashboard(
    uid: str,
    title: str,
    description: str,
    panels: list[Json],
    templating: list[Json] | None = None,
) -> Json:
    return {
        "annotations": {
            "list": [
                {
                    "builtIn": 1,
                    "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                    "enable": True,
                    "hide": True,
                    "iconColor": "rgba(0, 211, 255, 1)",
                    "name": "Annotations & Alerts",
                    "type": "dashboard",
                }
            ]
        },
        "description": description,
        "editable": True,
        "fiscalYearStartMonth": 0,
        "graphTooltip": 1,  # shared crosshair
        "id": None,
        "links": [
            {
                "type": "dashboards",
                "tags": ["pwdaemon"],
                "title": "pwdaemon",
                "asDropdown": False,
                "includeVars": True,
                "keepTime": True,
            }
        ],
        "panels": layout(panels),
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["pwdaemon"],
        "templating": {"list": templating if templating is not None else variables()},
        "time": {"from": "now-6h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": title,
        "uid": uid,
        "version": 1,
    }


def serving_dashboard() -> Json:
    return dashboard(
        "pwdaemon",
        "pwdaemon",
        "Serving processes with pwdaemon attached: which tiers answer calls, how fast "
        "hot sizes get specialized, and what the background compiles cost.",
        [
            row("Traffic"),
            calls_by_tier(),
            specialized_ratio(),
            live_entries(),
            table_versions(),
            distinct_sizes(),
            size_overflow(),
            row("Tracing"),
            graph_pieces(),
            pieces_on_eager(),
            trace_events(),
            eager_calls(),
            row("Compiles"),
            queue_and_in_flight(),
            jobs_by_outcome(),
            compile_duration(),
            compile_heatmap(),
            hot_to_swap(),
            failures(),
            validation_rejects(),
            row("Artifacts and workers"),
            loads_by_source(),
            worker_restarts(),
            cuda_graph_memory(),
            cuda_graphs(),
            store_size(),
            store_artifacts(),
            store_write_errors(),
            metrics_errors(),
        ],
    )


# ---- the host service (`pwdaemon serve`): pwdaemon_service_*, no model label ---------

SVC = "pwdaemon_service_"


def svc_rate(metric: str, by: str, legend: str) -> tuple[str, str]:
    return (f"{PER_MIN}sum by ({by}) (rate({SVC}{metric}_total{{{SEL_HOST}}}[{RI}]))", legend)


def svc_quantiles(metric: str) -> list[tuple[str, str]]:
    out = [
        (
            f"histogram_quantile({q}, "
            f"sum by (le) (rate({SVC}{metric}_bucket{{{SEL_HOST}}}[{RI}])))",
            f"p{round(q * 100)}",
        )
        for q in (0.5, 0.95)
    ]
    out.append(
        (
            f"sum(rate({SVC}{metric}_sum{{{SEL_HOST}}}[{RI}])) / "
            f"sum(rate({SVC}{metric}_count{{{SEL_HOST}}}[{RI}]))",
            "mean",
        )
    )
    return out


def service_panels() -> list[Json]:
    return [
        row("Queue and compiles"),
        timeseries(
            "Queue, in flight and limit",
            "Jobs waiting for a worker (queued), compiling now (in flight), and the host's "
            "concurrency limit (config `workers`). A queue that keeps growing while in "
            "flight sits at the limit means the host needs more compile capacity.",
            "short",
            [
                (f"sum({SVC}queue_depth{{{SEL_HOST}}})", "queued"),
                (f"sum({SVC}in_flight{{{SEL_HOST}}})", "in flight"),
                (f"max({SVC}concurrency_limit{{{SEL_HOST}}})", "limit"),
            ],
        ),
        timeseries(
            "Jobs by outcome",
            "Compile jobs finished per minute by target kind and outcome. 'stored' means the "
            "artifact was already in the store and nothing was compiled; 'cancelled' jobs "
            "were queued when the service stopped (their clients compiled embedded).",
            "opm",
            [svc_rate("jobs", "target, outcome", "{{target}} {{outcome}}")],
            stacked=True,
        ),
        timeseries(
            "Compile duration p50 / p95",
            "Wall time of one compile in a service worker: median, 95th percentile and mean.",
            "s",
            svc_quantiles("compile_duration_seconds"),
        ),
        {
            **heatmap(
                "Compile duration distribution",
                "Compiles per histogram bucket of wall time, over time.",
                f"{SVC}compile_duration_seconds_bucket",
                "s",
            ),
            "targets": [
                target(
                    f"sum by (le) (increase({SVC}compile_duration_seconds_bucket"
                    f"{{{SEL_HOST}}}[{RI}]))",
                    "{{le}}",
                    "A",
                    format="heatmap",
                )
            ],
        },
        timeseries(
            "Queue wait p50 / p95",
            "Time a job waited for a worker before its compile started: what the "
            "concurrency limit costs clients.",
            "s",
            svc_quantiles("queue_wait_seconds"),
        ),
        timeseries(
            "Submits by result",
            "Submits per minute: queued (a new job), deduplicated (joined a running or "
            "queued job for the same key: a compile saved) or stored (already compiled).",
            "opm",
            [svc_rate("submits", "result", "{{result}}")],
            stacked=True,
        ),
        row("Clients"),
        timeseries(
            "Clients connected",
            "Open client connections (serving processes hold one per job in progress).",
            "short",
            [(f"sum({SVC}clients_connected{{{SEL_HOST}}})", "connected")],
        ),
        timeseries(
            "Connections by verdict",
            "Connections per minute by the peer-credential check: allowed by uid, by group, "
            "or refused (the service log names the refused uid).",
            "opm",
            [svc_rate("connections", "verdict", "{{verdict}}")],
            stacked=True,
        ),
        timeseries(
            "Requests refused by reason",
            "Requests answered with an error per minute (the connection is then closed): "
            "malformed or oversized frames, another protocol version, unknown types, bad "
            "submits, refused credentials, or the service shutting down.",
            "opm",
            [svc_rate("frames_refused", "reason", "{{reason}}")],
            stacked=True,
        ),
        timeseries(
            "Config reloads by outcome",
            "Config file re-reads per minute (on change and on SIGHUP). 'invalid' means the "
            "file is broken and the running configuration was kept: see the log.",
            "opm",
            [svc_rate("config_reloads", "outcome", "{{outcome}}")],
            stacked=True,
        ),
        row("Workers and store"),
        timeseries(
            "Worker restarts",
            "Compile workers replaced per minute after dying or hanging.",
            "opm",
            [svc_rate("worker_restarts", "instance", "{{instance}}")],
        ),
        timeseries(
            "Shared store size",
            "Bytes in the shared artifact store (refreshed every 10 s).",
            "bytes",
            [(f"max({SVC}store_bytes{{{SEL_HOST}}})", "bytes")],
        ),
        timeseries(
            "Shared store artifacts",
            "Artifacts in the shared store.",
            "short",
            [(f"max({SVC}store_artifacts{{{SEL_HOST}}})", "artifacts")],
        ),
        timeseries(
            "Store write errors",
            "Failed writes to the shared store per minute (read-only or full disk): "
            "compiles still reach their clients only through the store, so this must be 0.",
            "opm",
            [svc_rate("store_write_errors", "instance", "{{instance}}")],
        ),
        timeseries(
            "Uptime",
            "Seconds since the service started; a drop is a restart (crash, watchdog, upgrade).",
            "s",
            [(f"max by (instance) ({SVC}uptime_seconds{{{SEL_HOST}}})", "{{instance}}")],
            width=24,
        ),
    ]


def service_dashboard() -> Json:
    return dashboard(
        "pwdaemon-service",
        "pwdaemon service",
        "The host compile service (`pwdaemon serve`): one queue and worker pool for "
        "every serving process on the host, its clients, and the shared artifact store.",
        service_panels(),
        templating=variables(f"{SVC}queue_depth", models=False),
    )


DASHBOARDS: dict[str, Callable[[], Json]] = {
    "pwdaemon.json": serving_dashboard,
    "pwdaemon-service.json": service_dashboard,
}


def render(dash: Json) -> str:
    return json.dumps(dash, indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if any committed dashboard differs from this file",
    )
    parser.add_argument("--out", type=Path, default=DASHBOARD_DIR, help="dashboards folder")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for name, build in DASHBOARDS.items():
        path: Path = args.out / name
        text = render(build())
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        if args.check:
            stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {path}")
    if stale:
        print(
            "stale dashboards (run `python grafana/build_dashboards.py`): " + ", ".join(stale),
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
