"""The client side: `ServiceExecutor`, an `Executor` that compiles through the service.

The engine calls `run(spec, timeout)` on one of its runner threads. We submit the job
to the service on a connection of its own and block until the service's `done` reply
names the artifact in the shared store. If the service cannot be reached, refuses us,
stops, or goes away mid-job, the job runs on an embedded `ProcessExecutor` instead (the
same worker code, started on first need), and the service is tried again after a
backoff: a compile is never lost because of the service, and serving never notices.

The job's key is the engine's own: the graph bytes are loaded (fake tensors only, ~10-20
ms, once per graph) to hash the graph's code and placeholder specs exactly as the
engine does, so the service publishes under the key every client's store watcher looks
for, whatever process sent it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pwdaemon.config import CompileConfig
from pwdaemon.service.protocol import (
    DEFAULT_SOCKET,
    SOCKET_ENV,
    JobOutcome,
    MessageType,
    ServiceUnavailable,
    SubmitRequest,
    connect,
    ping,
    recv,
    send,
)
from pwdaemon.store import ArtifactKey, ArtifactStore, UnsafeStoreError, make_key
from pwdaemon.workers.compiler import JobSpec
from pwdaemon.workers.executor import Executor, ProcessExecutor
from pwdaemon.workers.process import CompileError
from pwdaemon.workers.shipping import load_graph

log = logging.getLogger(__name__)

ServiceChoice = str | os.PathLike[str] | bool | None


def default_socket(environ: Mapping[str, str] | None = None) -> str:
    env = os.environ if environ is None else environ
    return env.get(SOCKET_ENV) or DEFAULT_SOCKET


def graph_identity(graph: bytes) -> tuple[str, str]:
    """(fingerprint, device) of GraphPickler bytes, computed as the engine computes them
    for a graph piece (`analyse_graph`'s fingerprint, the first tensor input's device).

    The bytes themselves differ between processes for the same model; this does not.
    """
    from pwdaemon.serving.graph_facts import analyse_graph

    try:
        gm, _ = load_graph(graph)  # under the pickler's lock (GraphPickler is not thread-safe)
    except TypeError as exc:
        raise ServiceUnavailable(f"graph payload: {exc}") from exc
    facts = analyse_graph(gm)
    return facts.fingerprint, facts.device


class ServiceExecutor:
    """Compiles through the host service; falls back to embedded workers per job."""

    def __init__(
        self,
        socket_path: str,
        config: CompileConfig,
        env: dict[str, str] | None = None,
        *,
        connect_timeout_s: float = 2.0,
        retry_s: float = 1.0,
        max_retry_s: float = 30.0,
        embedded: Executor | None = None,
    ) -> None:
        self.socket_path = socket_path
        self._config = config
        self._env = dict(env or {})
        self._connect_timeout_s = connect_timeout_s
        self._retry_s = retry_s
        self._max_retry_s = max_retry_s
        self._backoff_s = retry_s
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._embedded = embedded
        self._identities: dict[str, tuple[str, str]] = {}
        self._socks: set[socket.socket] = set()
        self._service: dict[str, Any] | None = None  # the last pong
        self._closed = False
        # Figures for status and tests.
        self.service_jobs = 0
        self.embedded_jobs = 0
        self.store_pickups = 0  # artifacts found in the service's store after a failed call
        self.fallbacks: list[tuple[float, str]] = []  # (wall time, why)

    # ---- Executor protocol

    @property
    def restarts(self) -> int:
        return self._embedded.restarts if self._embedded is not None else 0

    def start(self) -> None:
        """Says hello to the service; nothing is started (embedded workers start on the
        first job that needs them)."""
        pong = ping(self.socket_path, self._connect_timeout_s)
        if pong is None:
            self._mark_down(f"no service answers on {self.socket_path}")
        else:
            self._service = dict(pong.header)

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        if self._closed:
            raise CompileError("cancelled", "executor is closed")
        if self._service_usable():
            try:
                result = self._run_on_service(spec, timeout)
            except ServiceUnavailable as exc:
                if self._closed:
                    raise CompileError("cancelled", "executor is closed") from exc
                self._mark_down(str(exc))
                stored = self._stored(spec)
                if stored is not None:
                    return stored
            else:
                with self._lock:
                    self._backoff_s = self._retry_s
                    self.service_jobs += 1
                return result
        return self._run_embedded(spec, timeout)

    def pids(self) -> list[int]:
        return self._embedded.pids() if self._embedded is not None else []

    def close(self, timeout: float) -> None:
        self._closed = True
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            # Wakes a runner thread blocked in recv(); it sees `_closed` and stops.
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._embedded is not None:
            self._embedded.close(timeout)

    # ---- the service path

    def _service_usable(self) -> bool:
        with self._lock:
            return time.monotonic() >= self._down_until

    def _mark_down(self, why: str) -> None:
        with self._lock:
            first = self._down_until <= time.monotonic()
            self._down_until = time.monotonic() + self._backoff_s
            retry = self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self._max_retry_s)
            self.fallbacks.append((time.time(), why))
        if first:
            log.warning(
                "pwdaemon service unavailable (%s): compiling embedded, retrying in %.0f s",
                why,
                retry,
            )

    def key_for(self, spec: JobSpec) -> ArtifactKey:
        digest = hashlib.sha256(spec.graph).hexdigest()
        ident = self._identities.get(digest)
        if ident is None:
            ident = self._identities[digest] = graph_identity(spec.graph)
        fingerprint, device = ident
        return make_key(fingerprint, spec.target.label, device=device, options=spec.options)

    def _run_on_service(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        sock = connect(self.socket_path, self._connect_timeout_s)
        try:
            key = self.key_for(spec)
        except Exception as exc:  # an unkeyable graph still compiles, embedded
            sock.close()
            raise ServiceUnavailable(f"cannot compute the graph's key: {exc}") from exc
        request = SubmitRequest(
            key=key,
            target=spec.target,
            graph=spec.graph,
            options=dict(spec.options),
            fault=spec.fault,
            client=f"pid {os.getpid()}",
        )
        with self._lock:
            self._socks.add(sock)
        try:
            send(sock, request.encode())
            # The job may wait in the host's queue before its compile starts: the
            # deadline covers both, like a job waiting for an embedded worker.
            deadline = time.monotonic() + timeout
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise CompileError("timeout", f"service did not finish within {timeout:g} s")
                sock.settimeout(left)
                try:
                    frame = recv(sock)
                except TimeoutError:
                    raise CompileError(
                        "timeout", f"service did not finish within {timeout:g} s"
                    ) from None
                if frame.type == MessageType.ACCEPTED:
                    continue
                if frame.type != MessageType.DONE or frame.get("digest") != key.digest:
                    raise ServiceUnavailable(f"unexpected reply {frame.type!r}")
                return self._result(frame.header)
        finally:
            with self._lock:
                self._socks.discard(sock)
            sock.close()

    @staticmethod
    def _result(done: Mapping[str, Any]) -> dict[str, Any]:
        try:
            outcome = JobOutcome(str(done.get("outcome")))
        except ValueError:
            raise ServiceUnavailable(f"unknown outcome {done.get('outcome')!r}") from None
        if outcome is JobOutcome.CANCELLED:
            # The service stopped before compiling it: compile here instead.
            raise ServiceUnavailable(f"service cancelled the job: {done.get('reason')}")
        if not outcome.has_artifact:
            # The compile itself failed; an embedded compile would fail the same way.
            raise CompileError(outcome.value, f"(service) {done.get('reason')}")
        path = done.get("path")
        if not isinstance(path, str) or not os.path.exists(path):
            raise ServiceUnavailable(f"service reported an artifact we cannot see: {path}")
        return {"path": path, "seconds": float(done.get("seconds") or 0.0), "source": "service"}

    def _stored(self, spec: JobSpec) -> dict[str, Any] | None:
        """The artifact, if the service published it before going away."""
        info = self._service
        if not info or not info.get("store"):
            return None
        try:
            store = ArtifactStore(
                info["store"], create=False, trusted_uids=[int(info.get("uid", 0))]
            )
            path = store.lookup(self.key_for(spec))
        except (UnsafeStoreError, OSError, ValueError) as exc:
            log.debug("service store not usable: %s", exc)
            return None
        if path is None:
            return None
        with self._lock:
            self.store_pickups += 1
        return {"path": str(path), "seconds": 0.0, "source": "service-store"}

    # ---- the embedded path

    def _run_embedded(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        with self._lock:
            if self._embedded is None:
                self._embedded = ProcessExecutor(self._config, self._env)
            embedded = self._embedded
        with self._lock:
            self.embedded_jobs += 1
        return embedded.run(spec, timeout)


def executor_for(
    service: ServiceChoice, config: CompileConfig, env: dict[str, str] | None = None
) -> Executor:
    """The executor `attach(service=...)` uses.

    - "auto": the service if its socket (PWDAEMON_SOCKET, else /run/pwdaemon/
      pwdaemon.sock) answers a ping now, else embedded workers;
    - True, or a socket path: the service, falling back to embedded per job while it is
      away;
    - False or None: embedded workers only.
    """
    if service is None or service is False:
        return ProcessExecutor(config, env)
    if service is True or service == "auto":
        path = default_socket()
    elif isinstance(service, str | os.PathLike):
        path = os.fspath(service)
    else:
        raise TypeError(f"service must be 'auto', a socket path, True, False or None: {service!r}")
    if service == "auto" and ping(path, timeout=0.5) is None:
        return ProcessExecutor(config, env)
    return ServiceExecutor(path, config, env)


def service_store(path: str | None = None) -> Path | None:
    """The store directory the service at `path` publishes into, if it answers."""
    pong = ping(path or default_socket())
    store = pong.get("store") if pong is not None else None
    return Path(store) if isinstance(store, str) else None
