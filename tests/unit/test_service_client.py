"""ServiceExecutor without a service: every job compiles embedded, the service is retried
after a backoff; `executor_for` picks the executor `attach(service=...)` would use."""

from __future__ import annotations

import socket
import threading
from pathlib import Path
from typing import Any

import pytest

from pwdaemon.config import CompileConfig
from pwdaemon.service.client import ServiceExecutor, executor_for
from pwdaemon.service.protocol import JobOutcome, MessageType, ServiceUnavailable, reply
from pwdaemon.serving.range_table import Target
from pwdaemon.workers.compiler import JobSpec
from pwdaemon.workers.executor import ProcessExecutor
from pwdaemon.workers.process import CompileError


class StubEmbedded:
    """Stands in for the embedded worker pool: records what it was asked to run."""

    def __init__(self) -> None:
        self.specs: list[JobSpec] = []
        self.restarts = 0
        self.closed = False

    def start(self) -> None:
        pass

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        self.specs.append(spec)
        return {"path": spec.out_path, "seconds": 0.0}

    def pids(self) -> list[int]:
        return []

    def close(self, timeout: float) -> None:
        self.closed = True


def spec(tmp_path: Path) -> JobSpec:
    return JobSpec(b"not a graph", Target.parse("size:4"), str(tmp_path / "a.bin"))


def test_no_service_means_embedded_and_a_backoff(tmp_path: Path) -> None:
    stub = StubEmbedded()
    ex = ServiceExecutor(str(tmp_path / "none.sock"), CompileConfig(workers=1), embedded=stub)
    ex.start()
    assert ex.run(spec(tmp_path), 5.0)["path"] == str(tmp_path / "a.bin")
    assert ex.run(spec(tmp_path), 5.0)["path"]  # inside the backoff: no new attempt
    assert len(stub.specs) == 2 and ex.embedded_jobs == 2 and ex.service_jobs == 0
    assert len(ex.fallbacks) == 1 and "none.sock" in ex.fallbacks[0][1]
    ex.close(1.0)
    assert stub.closed
    with pytest.raises(CompileError, match="closed"):
        ex.run(spec(tmp_path), 5.0)


def test_a_service_that_drops_the_connection_means_embedded(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen()

    def accept_and_close() -> None:
        conn, _ = server.accept()
        conn.close()  # like a service killed mid-job

    t = threading.Thread(target=accept_and_close)
    t.start()
    stub = StubEmbedded()
    ex = ServiceExecutor(path, CompileConfig(workers=1), embedded=stub)
    assert ex.run(spec(tmp_path), 5.0)["path"]  # unkeyable graph or lost service: embedded
    t.join(10)
    server.close()
    assert ex.embedded_jobs == 1 and ex.fallbacks


def test_done_replies_map_to_results_and_errors(tmp_path: Path) -> None:
    art = tmp_path / "art.bin"
    art.write_bytes(b"x")
    ok = {"outcome": JobOutcome.OK, "path": str(art), "seconds": 2.0}
    assert ServiceExecutor._result(ok) == {"path": str(art), "seconds": 2.0, "source": "service"}
    with pytest.raises(CompileError) as info:
        ServiceExecutor._result({"outcome": "timeout", "reason": "slow"})
    assert info.value.outcome == "timeout"
    with pytest.raises(ServiceUnavailable):  # the service stopped: compile embedded
        ServiceExecutor._result({"outcome": "cancelled"})
    with pytest.raises(ServiceUnavailable):  # a path we cannot see
        ServiceExecutor._result({"outcome": "ok", "path": str(tmp_path / "gone")})
    assert reply(MessageType.DONE, outcome=JobOutcome.OK)  # StrEnum encodes as text


def test_executor_for_choices(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = CompileConfig(workers=1)
    nowhere = str(tmp_path / "nobody.sock")
    monkeypatch.setenv("PWDAEMON_SOCKET", nowhere)
    assert isinstance(executor_for(False, config), ProcessExecutor)
    assert isinstance(executor_for(None, config), ProcessExecutor)
    assert isinstance(executor_for("auto", config), ProcessExecutor)  # nobody answers
    chosen = executor_for(nowhere, config)  # explicit: the service, with fallback
    assert isinstance(chosen, ServiceExecutor) and chosen.socket_path == nowhere
    assert isinstance(executor_for(True, config), ServiceExecutor)
    with pytest.raises(TypeError):
        executor_for(3, config)  # type: ignore[arg-type]


class PongServer:
    """A socket that answers one ping the way the service does (on its own thread)."""

    def __init__(self, path: str, store: Path) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen()
        self.thread = threading.Thread(target=self._pong, args=(str(store),))
        self.thread.start()

    def _pong(self, store: str) -> None:
        conn, _ = self.server.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(reply(MessageType.PONG, pid=1, store=store))

    def close(self) -> None:
        self.thread.join(10)
        self.server.close()


def test_auto_uses_a_service_that_answers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "s.sock")
    server = PongServer(path, tmp_path)
    monkeypatch.setenv("PWDAEMON_SOCKET", path)
    chosen = executor_for("auto", CompileConfig(workers=1))
    server.close()
    assert isinstance(chosen, ServiceExecutor) and chosen.socket_path == path


def test_attach_uses_the_service_that_answers_and_embedded_otherwise(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import torch

    import pwdaemon as pwd

    path = str(tmp_path / "s.sock")
    monkeypatch.setenv("PWDAEMON_SOCKET", path)
    h = pwd.attach(torch.nn.Linear(4, 4), store=False)  # "auto", nobody listening
    try:
        assert isinstance(h.engine.executor, ProcessExecutor)
    finally:
        h.detach()
    server = PongServer(path, tmp_path)
    h = pwd.attach(torch.nn.Linear(4, 4), store=False)
    server.close()
    try:
        assert isinstance(h.engine.executor, ServiceExecutor)
        assert h.engine.executor.socket_path == path
    finally:
        h.detach()
    h = pwd.attach(torch.nn.Linear(4, 4), store=False, service=False)
    try:
        assert isinstance(h.engine.executor, ProcessExecutor)
    finally:
        h.detach()
