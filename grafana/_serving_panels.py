"""The serving dashboard's panels (`pwdaemon.json`): one function per panel."""

from __future__ import annotations

from _kit import (
    PER_MIN,
    PIECE,
    RI,
    SEL,
    SEL_HOST,
    Json,
    dashboard,
    heatmap,
    model_gauge,
    quantiles,
    row,
    timeseries,
)

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
