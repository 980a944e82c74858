"""Building blocks of pwdaemon's Grafana dashboards: queries, panels, layout, the frame.

Every panel of `_serving_panels.py` and `_service_panels.py` is made with these: the
data source is always the `datasource` variable and the layout and frame are shared;
the other conventions `build_dashboards.py` lists are the panels' to keep and the tests'
to check. Stdlib only, as the generator.
"""

from __future__ import annotations

from typing import Any

Json = dict[str, Any]

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


def model_gauge(title: str, description: str, unit: str, metric: str) -> Json:
    """A panel of one per-model gauge, one line per model."""
    return timeseries(
        title, description, unit, [(f"max by (model) ({metric}{{{SEL}}})", "{{model}}")]
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
