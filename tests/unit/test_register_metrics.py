"""`Handle.register_metrics`: pwdaemon's families on the user's own registry and endpoint.

Attached models with a fake executor (compiles run the graph eagerly in-process); the
registry is served by prometheus-client's own HTTP server and scraped over HTTP, as a
server that already has a `/metrics` would expose it.
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator

import prometheus_client
import pytest
import torch
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families
from torch import nn

import pwdaemon as pwd
from pwdaemon.testing import FakeExecutor

TIMEOUT = 60.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _attach(model: nn.Module, name: str) -> pwd.Handle:
    return pwd.attach(
        model,
        name=name,
        executor=FakeExecutor(),
        store=False,
        policy=pwd.PolicyConfig(hot_calls=2, tick_s=0.02),
    )


def _calls(text: str, model: str) -> dict[str, float]:
    """pwdaemon_calls_total of `model` by tier."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "pwdaemon_calls_total" and s.labels.get("model") == model:
                out[s.labels["tier"]] = out.get(s.labels["tier"], 0.0) + s.value
    return out


@pytest.fixture
def registry_url() -> Iterator[tuple[CollectorRegistry, str]]:
    registry = CollectorRegistry()
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield registry, f"http://127.0.0.1:{httpd.server_port}/metrics"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5.0)


def _scrape(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def test_two_models_share_a_user_registry_and_detach_removes_only_its_own(
    registry_url: tuple[CollectorRegistry, str],
) -> None:
    registry, url = registry_url
    first, second = _model(), _model()
    a, b = _attach(first, "registry-a"), _attach(second, "registry-b")
    try:
        a.register_metrics(registry)
        b.register_metrics(registry)  # the same registry again: no duplicate error
        a.register_metrics(registry)
        with torch.inference_mode():
            for _ in range(3):
                first(torch.randn(3, 16))
                second(torch.randn(5, 16))
            assert a.wait(sizes=[3], timeout=TIMEOUT), str(a.status())
            for _ in range(4):
                first(torch.randn(3, 16))
        a.engine.flush()  # fold the dispatchers' counters now, on the engine loop
        b.engine.flush()
        text = _scrape(url)
        calls_a = _calls(text, "registry-a")
        assert sum(calls_a.values()) == 7 and calls_a.get("size", 0.0) >= 4, calls_a
        assert sum(_calls(text, "registry-b").values()) == 3
        a.detach()
        text = _scrape(url)
        assert _calls(text, "registry-a") == {}  # its series left with it
        assert sum(_calls(text, "registry-b").values()) == 3
    finally:
        a.detach()
        b.detach()


def test_without_a_registry_the_metrics_go_to_prometheus_clients_default(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A stand-in for the global REGISTRY, looked up at the call as the real one would be
    # (the real one is shared by the whole test process and must stay free of ours).
    default = CollectorRegistry()
    monkeypatch.setattr(prometheus_client, "REGISTRY", default)
    model = _model()
    handle = _attach(model, "registry-default")
    try:
        handle.register_metrics()
        with torch.inference_mode():
            model(torch.randn(2, 16))
        handle.engine.flush()
        assert sum(_calls(generate_latest(default).decode(), "registry-default").values()) == 1
    finally:
        handle.detach()
    assert _calls(generate_latest(default).decode(), "registry-default") == {}
