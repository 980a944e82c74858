"""The host service's dashboard (`pwdaemon-service.json`): `pwdaemon_service_*` metrics,
which describe the host, not a model, so no model label and no model filter."""

from __future__ import annotations

from _kit import (
    PER_MIN,
    RI,
    SEL_HOST,
    Json,
    dashboard,
    heatmap,
    row,
    target,
    timeseries,
    variables,
)

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
