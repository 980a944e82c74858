"""Tests for grafana/: the dashboards match their generator and pwdaemon's metrics.

The metric names a panel may use come from the real collector run against a source
with every field populated (so histogram `_bucket`/`_sum`/`_count` and labelled
counters all appear), not from a hand-kept list.
"""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from pwdaemon.metrics.exposition import PwdaemonCollector
from pwdaemon.metrics.stats import HistogramCounts, ModelMetrics, PieceMetrics, TraceMetrics

GRAFANA = Path(__file__).resolve().parents[2] / "grafana"
Json = dict[str, Any]


def load_builder() -> ModuleType:
    # grafana/ is not a package: load the script by path, its siblings from the folder.
    if str(GRAFANA) not in sys.path:
        sys.path.insert(0, str(GRAFANA))
    spec = importlib.util.spec_from_file_location(
        "pwdaemon_build_dashboards", GRAFANA / "build_dashboards.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


builder = load_builder()


@pytest.fixture(scope="module")
def dashboards() -> dict[str, Json]:
    return {
        name: json.loads((GRAFANA / "dashboards" / name).read_text(encoding="utf-8"))
        for name in builder.DASHBOARDS
    }


# ---- what pwdaemon exports ---------------------------------------------------------


@dataclass
class FullSource:
    def metrics_snapshot(self) -> ModelMetrics:
        hist = HistogramCounts()
        hist.observe(2.0)
        return ModelMetrics(
            model="m",
            pieces=[PieceMetrics(0, 2, {"eager": 1, "size": 1}, 3, 1, {"size": 1})],
            jobs_by_outcome={("size", "ok"): 1},
            compile_seconds=hist,
            hot_to_swap_seconds=hist,
            queue_depth=1,
            in_flight=1,
            validation_rejects_by_reason={"mismatch": 1},
            failures_by_reason={"timeout": 1},
            worker_restarts=1,
            loads_by_source={"compiled": 1},
            store_bytes=1,
            store_artifacts=1,
            store_write_errors=1,
            trace=TraceMetrics(
                pieces_by_strategy={"unbacked": 1},
                graph_breaks=1,
                recompiles_by_cause={"settling": 1},
                miss_calls=1,
                error_calls=1,
                fallbacks_by_strategy={"unbacked": 1},
                pieces_on_eager=1,
            ),
        )


def families(collector: Any) -> dict[str, set[str]]:
    registry = CollectorRegistry()
    registry.register(collector)
    text = generate_latest(registry).decode()
    out = {fam.name: {s.name for s in fam.samples} for fam in text_string_to_metric_families(text)}
    assert all(out.values()), f"families without samples: {out}"
    return out


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """family name -> its sample names, as a scrape of a serving process shows them."""
    return families(PwdaemonCollector([FullSource()]))


@pytest.fixture(scope="module")
def service_exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    """The same for the host service: the collector over a real `Service`'s snapshot
    (constructed on a temporary store, not started). Every labelled counter starts at 0
    for all its label values, so a fresh service already shows every series.
    tests/integration/test_service.py checks this dashboard against a live scrape too."""
    from pwdaemon.service.config import ConfigManager
    from pwdaemon.service.metrics import ServiceCollector
    from pwdaemon.service.server import Service

    tmp = tmp_path_factory.mktemp("service")
    svc = Service(ConfigManager(None, {"store": str(tmp / "store"), "socket": str(tmp / "s")}))
    try:
        return families(ServiceCollector(svc.snapshot))
    finally:
        svc.executor.close(1.0)


SERVICE_DASHBOARD = "pwdaemon-service.json"


def exports_for(
    name: str, exported: dict[str, set[str]], service_exported: dict[str, set[str]]
) -> dict[str, set[str]]:
    return service_exported if name == SERVICE_DASHBOARD else exported


# ---- what the dashboards query -----------------------------------------------------

METRIC_RE = re.compile(r"\bpwdaemon_[a-z0-9_]+")


def panels(dash: Json) -> list[Json]:
    out: list[Json] = []
    for p in dash["panels"]:
        out.append(p)
        out.extend(p.get("panels", []))  # collapsed rows hold their panels
    return out


def exprs(dash: Json) -> list[str]:
    out = [t["expr"] for p in panels(dash) for t in p.get("targets", [])]
    out += [v["query"]["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return out


def referenced(dash: Json) -> set[str]:
    return {m for e in exprs(dash) for m in METRIC_RE.findall(e)}


# ---- tests -------------------------------------------------------------------------


def test_json_is_what_the_generator_writes(dashboards: dict[str, Json]) -> None:
    for name, build in builder.DASHBOARDS.items():
        committed = (GRAFANA / "dashboards" / name).read_text(encoding="utf-8")
        assert committed == builder.render(build()), (
            f"{name} is stale: run `python grafana/build_dashboards.py`"
        )
    assert builder.main(["--check"]) == 0


def test_check_mode_detects_stale_and_write_mode_fixes(tmp_path: Path) -> None:
    assert builder.main(["--check", "--out", str(tmp_path)]) == 1  # nothing there yet
    assert builder.main(["--out", str(tmp_path)]) == 0
    assert builder.main(["--check", "--out", str(tmp_path)]) == 0
    (tmp_path / "pwdaemon.json").write_text("{}\n", encoding="utf-8")
    assert builder.main(["--check", "--out", str(tmp_path)]) == 1


def test_every_queried_metric_is_exported(
    dashboards: dict[str, Json],
    exported: dict[str, set[str]],
    service_exported: dict[str, set[str]],
) -> None:
    for name, dash in dashboards.items():
        sample_names = set().union(*exports_for(name, exported, service_exported).values())
        unknown = referenced(dash) - sample_names
        assert not unknown, f"{name} queries metrics its source does not export: {unknown}"


def test_every_exported_family_is_on_the_serving_dashboard(
    dashboards: dict[str, Json], exported: dict[str, set[str]]
) -> None:
    used = referenced(dashboards["pwdaemon.json"])
    missing = {fam for fam, names in exported.items() if not names & used}
    assert not missing, f"exported but on no panel: {missing}"


def test_every_service_family_is_on_the_service_dashboard(
    dashboards: dict[str, Json], service_exported: dict[str, set[str]]
) -> None:
    used = referenced(dashboards[SERVICE_DASHBOARD])
    missing = {fam for fam, names in service_exported.items() if not names & used}
    assert not missing, f"the service exports these but no panel shows them: {missing}"
    # Per-call serving metrics mean nothing for the service.
    assert not {m for m in used if not m.startswith("pwdaemon_service_")}


KNOWN_UNITS = {"ops", "opm", "percentunit", "short", "none", "s", "bytes"}


def test_every_panel_has_unit_and_description(dashboards: dict[str, Json]) -> None:
    for name, dash in dashboards.items():
        for p in panels(dash):
            if p["type"] == "row":
                assert p["title"]
                continue
            where = f"{name}: {p['title']!r}"
            assert p.get("description", "").strip(), f"{where} has no description"
            unit = p["fieldConfig"]["defaults"].get("unit")
            assert unit in KNOWN_UNITS, f"{where} has unit {unit!r}"
            assert p["targets"], f"{where} has no query"


def test_units_follow_the_metric(dashboards: dict[str, Json]) -> None:
    # A seconds histogram shown in "short", or bytes in "s", is a silent lie.
    for dash in dashboards.values():
        for p in panels(dash):
            if p["type"] != "timeseries":
                continue
            names = {m for t in p["targets"] for m in METRIC_RE.findall(t["expr"])}
            unit = p["fieldConfig"]["defaults"]["unit"]
            if any(
                "compile_duration" in n or "hot_to_swap" in n or "queue_wait" in n for n in names
            ):
                assert unit == "s", p["title"]
            if names & {"pwdaemon_store_bytes", "pwdaemon_service_store_bytes"}:
                assert unit == "bytes", p["title"]
    heat = [p for d in dashboards.values() for p in panels(d) if p["type"] == "heatmap"]
    assert heat and all(p["options"]["yAxis"]["unit"] == "s" for p in heat)


def test_datasource_is_the_template_variable(dashboards: dict[str, Json]) -> None:
    for name, dash in dashboards.items():
        text = (GRAFANA / "dashboards" / name).read_text(encoding="utf-8")
        assert "DS_PROMETHEUS" not in text and "${DS_" not in text
        assert "__inputs" not in dash
        variables = {v["name"]: v for v in dash["templating"]["list"]}
        ds = variables["datasource"]
        assert (ds["type"], ds["query"]) == ("datasource", "prometheus")
        wanted = ("job", "instance") if name == SERVICE_DASHBOARD else ("job", "instance", "model")
        assert "model" in variables or name == SERVICE_DASHBOARD
        for var in wanted:
            assert variables[var]["type"] == "query"
            assert variables[var]["datasource"]["uid"] == "${datasource}"
        for p in panels(dash):
            if p["type"] == "row":
                continue
            assert p["datasource"]["uid"] == "${datasource}", p["title"]
            for t in p["targets"]:
                assert t["datasource"]["uid"] == "${datasource}", p["title"]


def test_queries_filter_and_use_rate_interval(dashboards: dict[str, Json]) -> None:
    counter_like = re.compile(r"pwdaemon_[a-z0-9_]+_(total|bucket|sum|count)\b")
    for dash in dashboards.values():
        for p in panels(dash):
            for t in p.get("targets", []):
                expr = t["expr"]
                ranges = re.findall(r"\[([^\]]*)\]", expr)
                assert all(r == "$__rate_interval" for r in ranges), expr
                for m in counter_like.finditer(expr):
                    # A raw counter plotted as is shows a sawtooth of restarts.
                    head = expr[: m.start()]
                    assert re.search(r"(rate|increase)\($", head), (p["title"], expr)
                    assert expr[m.end() :].startswith("{"), expr
                    assert re.match(r"\{[^}]*\}\[\$__rate_interval\]", expr[m.end() :]), expr
                for sel in re.findall(r"pwdaemon_[a-z0-9_]+(\{[^}]*\})?", expr):
                    assert 'job=~"$job"' in sel and 'instance=~"$instance"' in sel, expr
                # Host-level metrics (the collector's errors, the service) have no model.
                if "pwdaemon_metrics_source_errors" not in expr and "pwdaemon_service_" not in expr:
                    assert 'model=~"$model"' in expr, expr


def test_layout_ids_unique_and_panels_do_not_overlap(dashboards: dict[str, Json]) -> None:
    for dash in dashboards.values():
        ids = [p["id"] for p in panels(dash)]
        assert len(ids) == len(set(ids))
        cells: set[tuple[int, int]] = set()
        for p in panels(dash):
            g = p["gridPos"]
            assert g["x"] + g["w"] <= 24
            mine = {
                (x, y)
                for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])
            }
            assert not cells & mine, p["title"]
            cells |= mine


# ---- provisioning YAML -------------------------------------------------------------
# PyYAML is not a dependency: a parser for the subset these files use (block mappings,
# block lists of mappings, plain scalars, full-line comments) stands in, and is
# cross-checked against PyYAML wherever that happens to be installed.


def parse_yaml_subset(text: str) -> Any:
    lines: list[tuple[int, str]] = []
    for raw in text.splitlines():
        body = raw.strip()
        if not body or body.startswith("#"):
            continue
        if "\t" in raw[: len(raw) - len(raw.lstrip())]:
            raise ValueError(f"tab indent: {raw!r}")
        lines.append((len(raw) - len(raw.lstrip(" ")), body))

    def scalar(s: str) -> Any:
        if s in ("true", "false"):
            return s == "true"
        if re.fullmatch(r"-?\d+", s):
            return int(s)
        if len(s) >= 2 and s[0] == s[-1] and s[0] in "'\"":
            return s[1:-1]
        if " #" in s:
            raise ValueError(f"inline comments are outside the subset: {s!r}")
        return s

    def block(i: int, indent: int) -> tuple[Any, int]:
        if lines[i][1].startswith("- "):
            items: list[Any] = []
            while i < len(lines) and lines[i][0] == indent and lines[i][1].startswith("- "):
                # "- key: v" opens a mapping whose keys sit two columns further in.
                lines[i] = (indent + 2, lines[i][1][2:])
                item, i = block(i, indent + 2)
                items.append(item)
            return items, i
        mapping: dict[str, Any] = {}
        while i < len(lines) and lines[i][0] == indent and not lines[i][1].startswith("- "):
            key, sep, rest = lines[i][1].partition(":")
            if not sep or key in mapping:
                raise ValueError(f"bad or repeated key: {lines[i][1]!r}")
            rest = rest.strip()
            i += 1
            if rest:
                mapping[key] = scalar(rest)
            else:
                if i >= len(lines) or lines[i][0] <= indent:
                    raise ValueError(f"empty block for {key!r}")
                mapping[key], i = block(i, lines[i][0])
        if i < len(lines) and lines[i][0] > indent:
            raise ValueError(f"unexpected indent: {lines[i][1]!r}")
        return mapping, i

    value, end = block(0, lines[0][0])
    if end != len(lines):
        raise ValueError(f"trailing content from: {lines[end][1]!r}")
    return value


def load_yaml(path: Path) -> Any:
    text = path.read_text(encoding="utf-8")
    parsed = parse_yaml_subset(text)
    try:
        import yaml
    except ImportError:
        return parsed
    assert parsed == yaml.safe_load(text)
    return parsed


def test_yaml_subset_parser_rejects_what_it_cannot_read() -> None:
    assert parse_yaml_subset("a: 1\nb:\n  - c: x\n    d: true\n") == {
        "a": 1,
        "b": [{"c": "x", "d": True}],
    }
    for bad in ("a: 1\n  b: 2\n", "a:\n", "a: 1\na: 2\n", "just text\n"):
        with pytest.raises(ValueError):
            parse_yaml_subset(bad)


def test_dashboard_provider_points_at_the_dashboards() -> None:
    conf = load_yaml(GRAFANA / "provisioning" / "dashboards" / "pwdaemon.yaml")
    assert conf["apiVersion"] == 1
    (provider,) = conf["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path.startswith("/")
    # The README's mount must land the dashboards folder exactly there.
    readme = (GRAFANA / "README.md").read_text(encoding="utf-8")
    assert f"/grafana/dashboards:{path}" in readme


def test_prometheus_datasource_provisioning() -> None:
    conf = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yaml")
    assert conf["apiVersion"] == 1
    (ds,) = conf["datasources"]
    assert ds["type"] == "prometheus"
    assert ds["access"] == "proxy"
    assert re.fullmatch(r"https?://[^\s/]+(/\S*)?", ds["url"])
    assert ds["jsonData"]["timeInterval"]
