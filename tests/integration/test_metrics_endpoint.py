"""End to end: a real attached model, real compiles, the real endpoint scraped over HTTP."""

from __future__ import annotations

import shutil
import subprocess
import urllib.request

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import pwdaemon as pwd

pytestmark = pytest.mark.slow


def _scrape(url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    values = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            values[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return text, values


def _get(values: dict, name: str, **labels: str) -> float:
    total = 0.0
    for (n, lbls), v in values.items():
        if n == name and all(dict(lbls).get(k) == want for k, want in labels.items()):
            total += v
    return total


def test_metrics_move_with_traffic_and_compiles(mlp: nn.Module) -> None:
    # cold_after_s: size 3, called and then waited on, must not go cold while it queues
    # behind the general compile (past 60 s on a loaded machine it was dropped).
    h = pwd.attach(
        mlp,
        name="e2e",
        policy=pwd.PolicyConfig(hot_calls=2, tick_s=0.02, cold_after_s=3600),
        compiler=pwd.CompileConfig(workers=1),
        metrics_port=0,
        store=False,
    )
    try:
        url = h._metrics_server.url
        for n in (3, 3, 3):
            mlp(torch.randn(n, 16))
        assert h.wait(sizes=[3], timeout=120), str(h.status())
        for _ in range(10):
            mlp(torch.randn(3, 16))
        h.engine.flush()  # fold counters now, on the engine loop
        text, v = _scrape(url)
        assert _get(v, "pwdaemon_calls_total", model="e2e", tier="eager") >= 1
        assert _get(v, "pwdaemon_calls_total", model="e2e", tier="size") >= 10
        assert _get(v, "pwdaemon_compile_jobs_total", model="e2e", outcome="ok") == 2
        assert _get(v, "pwdaemon_compile_duration_seconds_count", model="e2e") == 2
        assert _get(v, "pwdaemon_hot_to_swap_seconds_count", model="e2e") == 1
        assert _get(v, "pwdaemon_table_version", model="e2e", graph="0") == 2
        assert _get(v, "pwdaemon_artifact_loads_total", model="e2e", source="compiled") == 2
        assert _get(v, "pwdaemon_distinct_sizes", model="e2e") == 1
        before = _get(v, "pwdaemon_calls_total", model="e2e")
        for _ in range(5):
            mlp(torch.randn(3, 16))
        h.engine.flush()
        _, v2 = _scrape(url)
        assert _get(v2, "pwdaemon_calls_total", model="e2e") == before + 5
        promtool = shutil.which("promtool")
        if promtool is not None:
            r = subprocess.run(
                [promtool, "check", "metrics"],
                input=text,
                text=True,
                capture_output=True,
                check=False,
            )
            assert r.returncode == 0, r.stdout + r.stderr
    finally:
        h.detach()
    _, v3 = _scrape(url)
    assert _get(v3, "pwdaemon_calls_total", model="e2e") == 0  # unregistered on detach
