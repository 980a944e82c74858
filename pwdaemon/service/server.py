"""`pwdaemon serve`: the host compile service on a Unix socket (anyio).

One event loop owns all state (queue, connections, counters); blocking work (compiles,
store I/O) runs in worker threads through `anyio.to_thread`, and the only other
threads are the watchdog observers (config file) and the metrics HTTP server, which
hand events to the loop through its token or read plain counters.

Compiles run in the same worker pool as the embedded engine (`ProcessExecutor`), under
one concurrency limit for the host, and publish into the shared `ArtifactStore`, where
every client's store watcher sees them; the submitting connections also get a `done`
reply with the artifact's path.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import anyio.lowlevel
from anyio.abc import SocketAttribute

from pwdaemon.config import CompileConfig
from pwdaemon.service.config import ConfigManager, ConfigWatcher, ReloadOutcome, ServiceConfig
from pwdaemon.service.credentials import AllowList, check_peer
from pwdaemon.service.listener import Connection, bind_socket
from pwdaemon.service.metrics import (
    ServiceCollector,
    ServiceMetricsServer,
    ServiceSnapshot,
    ServiceStats,
)
from pwdaemon.service.notify import Notifier
from pwdaemon.service.protocol import (
    SERVICE_PROTOCOL,
    JobOutcome,
    MessageType,
    ProtocolError,
    RefusalReason,
    SubmitRequest,
    SubmitResult,
    check_version,
    classify_frame_error,
    error_reply,
    reply,
)
from pwdaemon.service.queue import JobQueue, ServiceJob
from pwdaemon.store import ArtifactStore, UnsafeStoreError
from pwdaemon.version import __version__
from pwdaemon.workers.compiler import JobSpec
from pwdaemon.workers.executor import Executor, ProcessExecutor
from pwdaemon.workers.framing import Frame, FrameError, PeerClosed, read_frame_async
from pwdaemon.workers.process import CompileError

log = logging.getLogger(__name__)

_STORE_STATS_EVERY_S = 10.0
_RELOAD_DEBOUNCE_S = 0.3


class Service:
    """The host compile service. `run()` serves until SIGTERM/SIGINT, then drains."""

    def __init__(
        self,
        config: ConfigManager,
        *,
        notifier: Notifier | None = None,
        executor: Executor | None = None,
    ) -> None:
        self.configs = config
        self.config: ServiceConfig = config.current
        self.notifier = notifier or Notifier()
        self.store = ArtifactStore(self.config.store, dir_mode=0o755)
        env = {**self.store.inductor_env()}
        # Triton's cache too (GPU kernels) inside the store, unless the unit set one.
        env.setdefault(
            "TRITON_CACHE_DIR", os.environ.get("TRITON_CACHE_DIR", str(self.store.root / "triton"))
        )
        os.environ.update(env)  # the service process loads nothing, but keep one view
        compile_config = CompileConfig(
            workers=self.config.workers,
            timeout_s=self.config.timeout_s,
            niceness=self.config.niceness,
            retries=0,
        )
        self.executor: Executor = executor or ProcessExecutor(compile_config, env)
        self.queue = JobQueue()
        self.stats = ServiceStats()
        self.allow = self._allow_list(self.config)
        self.started = time.monotonic()
        self.metrics: ServiceMetricsServer | None = None
        self._waiters: dict[str, set[Connection]] = defaultdict(set)
        self._connections: set[Connection] = set()
        self._conn_ids = 0
        self._changed = anyio.Event()
        self._stopping = False
        self._store_stats = (0, 0)
        self._workdir = Path(tempfile.mkdtemp(prefix="pwdaemon-serve-"))
        self._tg: anyio.abc.TaskGroup | None = None
        self._token: anyio.lowlevel.EventLoopToken | None = None
        self._listener: anyio.abc.SocketListener | None = None
        self._accept_scope: anyio.CancelScope | None = None
        self._reload_generation = 0

    @staticmethod
    def _allow_list(config: ServiceConfig) -> AllowList:
        base = AllowList.default()
        return AllowList.of(base.uids | set(config.allow_uids), base.gids | set(config.allow_gids))

    # ---- life cycle -------------------------------------------------------------------

    async def run(self) -> None:
        self._token = anyio.lowlevel.current_token()
        self._changed = anyio.Event()
        self._accept_scope = anyio.CancelScope()
        sock = bind_socket(self.config.socket, self.config.socket_mode)
        listener = await anyio.abc.SocketListener.from_socket(sock)
        self._listener = listener
        if self.config.metrics_port is not None:
            self.metrics = ServiceMetricsServer(
                ServiceCollector(self.snapshot), self.config.metrics_port, self.config.metrics_addr
            )
            log.info("metrics on %s", self.metrics.url)
        watcher = self._watch_config()
        log.info(
            "pwdaemon %s serving on %s (store %s, %d concurrent compiles, allowed %s)",
            __version__,
            self.config.socket,
            self.store.root,
            self.config.workers,
            self.allow.describe(),
        )
        self.notifier.ready(self.status_line())
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._accept_loop, listener)
                tg.start_soon(self._dispatch_loop)
                tg.start_soon(self._heartbeat_loop)
                tg.start_soon(self._store_stats_loop)
                if self.config.prestart_workers:
                    tg.start_soon(self._prestart)
                await self._wait_for_signals()
                await self._drain()
                tg.cancel_scope.cancel()
        finally:
            await self._cleanup(watcher)

    async def _prestart(self) -> None:
        try:
            await anyio.to_thread.run_sync(self.executor.start, abandon_on_cancel=True)
        except CompileError as exc:
            log.warning("compile workers did not start (retried per job): %s", exc)

    async def _wait_for_signals(self) -> None:
        with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for signum in signals:
                if signum == signal.SIGHUP:
                    log.info("SIGHUP: reloading %s", self.configs.path)
                    await self.reload()
                    continue
                log.info("%s: draining", signal.Signals(signum).name)
                return

    async def _drain(self) -> None:
        """Stop taking work, let running compiles finish within the bound, then stop."""
        self._stopping = True
        self.notifier.stopping(f"draining: {self.queue.running} compiles running")
        if self._accept_scope is not None:
            self._accept_scope.cancel()
        if self._listener is not None:
            await self._listener.aclose()
        for job in self.queue.cancel_queued():
            await self._complete(job, JobOutcome.CANCELLED, reason="the service is stopping")
        with anyio.move_on_after(self.config.drain_timeout_s) as scope:
            while self.queue.running:
                await self._wait_changed()
        if scope.cancelled_caught:
            log.warning(
                "%d compiles still running after %.0f s; killing their workers",
                self.queue.running,
                self.config.drain_timeout_s,
            )
        # Killing the workers also unblocks the threads waiting on their pipes, so the
        # job tasks report `crashed` to their clients (who fall back to embedded).
        await anyio.to_thread.run_sync(self.executor.close, 5.0)
        with anyio.move_on_after(10.0):
            while self.queue.running:
                await self._wait_changed()

    async def _cleanup(self, watcher: ConfigWatcher | None) -> None:
        if watcher is not None:
            watcher.stop()
        if self.metrics is not None:
            self.metrics.close()
        if not self.config.socket.startswith("@"):
            with contextlib.suppress(OSError):
                os.unlink(self.config.socket)
        self.executor.close(1.0)
        shutil.rmtree(self._workdir, ignore_errors=True)
        self.notifier.close()
        log.info("pwdaemon service stopped")

    # ---- configuration ----------------------------------------------------------------

    def _watch_config(self) -> ConfigWatcher | None:
        path = self.configs.path
        if path is None:
            return None
        if not path.parent.is_dir():
            log.info("config directory %s does not exist; not watching it", path.parent)
            return None

        def changed() -> None:
            # On the observer's thread: hand over to the loop.
            if self._token is not None:
                with contextlib.suppress(RuntimeError):
                    anyio.from_thread.run_sync(self._schedule_reload, token=self._token)

        try:
            return ConfigWatcher(path, changed).start()
        except OSError as exc:
            log.warning("cannot watch %s (%s); reload with SIGHUP", path, exc)
            return None

    def _schedule_reload(self) -> None:
        # Debounced: one save is several events (truncate, write, close), and reading
        # between them would see a half-written file.
        self._reload_generation += 1
        if self._tg is not None:
            self._tg.start_soon(self._reload_when_quiet, self._reload_generation)

    async def _reload_when_quiet(self, generation: int) -> None:
        await anyio.sleep(_RELOAD_DEBOUNCE_S)
        if generation == self._reload_generation:
            await self.reload()

    async def reload(self) -> ReloadOutcome:
        outcome, config = await anyio.to_thread.run_sync(self.configs.reload)
        if outcome is ReloadOutcome.APPLIED:
            self.config = config
            self.allow = self._allow_list(config)
            logging.getLogger("pwdaemon").setLevel(config.log_level.upper())
            self._poke()  # the concurrency limit may have grown
        return outcome

    # ---- connections ------------------------------------------------------------------

    async def _accept_loop(self, listener: anyio.abc.SocketListener) -> None:
        # Connections run in the service's task group, not under this scope: stopping
        # the accepts at drain time leaves open connections to get their replies.
        assert self._accept_scope is not None
        with self._accept_scope:
            while True:
                try:
                    stream = await listener.accept()
                except OSError as exc:  # EMFILE and friends: back off, keep serving
                    log.warning("accept failed: %s", exc)
                    await anyio.sleep(0.5)
                    continue
                assert self._tg is not None
                self._tg.start_soon(self._serve_connection, stream)

    async def _serve_connection(self, stream: anyio.abc.SocketStream) -> None:
        raw = stream.extra(SocketAttribute.raw_socket)
        peer, verdict = check_peer(raw, self.allow)
        self.stats.connections[verdict] += 1
        if not verdict.allowed:
            uid = peer.uid if peer is not None else "unknown"
            self.stats.refusals[RefusalReason.CREDENTIALS] += 1
            with contextlib.suppress(Exception):
                await stream.send(error_reply(RefusalReason.CREDENTIALS, f"uid {uid} not allowed"))
            await stream.aclose()
            return
        assert peer is not None
        self._conn_ids += 1
        client = f"uid{peer.uid}/pid{peer.pid}"
        conn = Connection(f"c{self._conn_ids}/{client}", client, stream)
        self._connections.add(conn)
        self.stats.clients_connected += 1
        try:
            await self._read_loop(conn)
        finally:
            conn.closed = True
            self._connections.discard(conn)
            self.stats.clients_connected -= 1
            self._forget(conn)
            with contextlib.suppress(Exception):
                await stream.aclose()

    def _forget(self, conn: Connection) -> None:
        """A closed connection stops waiting; its client withdraws from jobs for which
        no other connection of the same client still waits (clients may use one
        connection per job)."""
        gone: list[str] = []
        for digest in conn.waiting:
            waiters = self._waiters.get(digest, set())
            waiters.discard(conn)
            if not any(c.client == conn.client for c in waiters):
                gone.append(digest)
        conn.waiting.clear()
        dropped = self.queue.withdraw(conn.client, gone)
        for job in dropped:
            self._waiters.pop(job.digest, None)
        if dropped:
            self._poke()

    async def _read_loop(self, conn: Connection) -> None:
        while not conn.closed:
            try:
                frame = await read_frame_async(conn.read_exact, self.config.max_payload_bytes)
            except PeerClosed:
                return
            except FrameError as exc:
                await self._refuse(conn, classify_frame_error(exc), str(exc))
                return
            try:
                await self._handle(conn, frame)
            except ProtocolError as exc:
                await self._refuse(conn, exc.reason, exc.detail)
                return

    async def _refuse(self, conn: Connection, reason: RefusalReason, detail: str) -> None:
        self.stats.refusals[reason] += 1
        log.warning("refused a request from %s (%s): %s", conn.id, reason, detail)
        await conn.send(error_reply(reason, detail))

    async def _handle(self, conn: Connection, frame: Frame) -> None:
        check_version(frame)
        if frame.type == MessageType.PING:
            await conn.send(
                reply(
                    MessageType.PONG,
                    pid=os.getpid(),
                    version=__version__,
                    store=str(self.store.root),
                    uid=os.geteuid(),
                    stopping=self._stopping,
                )
            )
        elif frame.type == MessageType.STATUS:
            await conn.send(reply(MessageType.STATUS_REPLY, status=self.status()))
        elif frame.type == MessageType.SUBMIT:
            await self._submit(conn, SubmitRequest.from_frame(frame))
        else:
            raise ProtocolError(RefusalReason.UNKNOWN_TYPE, f"unknown message type {frame.type!r}")

    async def _submit(self, conn: Connection, req: SubmitRequest) -> None:
        digest = req.key.digest
        if self._stopping:
            raise ProtocolError(RefusalReason.SHUTTING_DOWN, "the service is stopping")
        path = await self._lookup(req)
        if path is not None:
            self.stats.submits[SubmitResult.STORED] += 1
            await conn.send(reply(MessageType.ACCEPTED, digest=digest, result=SubmitResult.STORED))
            await conn.send(self._done_frame(digest, JobOutcome.STORED, path=str(path)))
            return
        result, job = self.queue.submit(conn.client, req)
        self.stats.submits[result] += 1
        conn.waiting.add(digest)
        self._waiters[digest].add(conn)
        log.debug("submit %s %s from %s: %s", digest[:12], req.target.label, conn.id, result)
        await conn.send(
            reply(MessageType.ACCEPTED, digest=digest, result=result, hotness=job.hotness)
        )
        self._poke()

    async def _lookup(self, req: SubmitRequest) -> Path | None:
        try:
            return await anyio.to_thread.run_sync(self.store.lookup, req.key)
        except (UnsafeStoreError, OSError) as exc:
            log.error("cannot read the shared store: %s", exc)
            return None

    # ---- jobs -------------------------------------------------------------------------

    def _poke(self) -> None:
        # Wake everything waiting now; later waiters get the fresh event. Waiters check
        # their condition before waiting, with no await in between, so nothing is lost.
        self._changed.set()
        self._changed = anyio.Event()

    async def _wait_changed(self) -> None:
        await self._changed.wait()

    async def _dispatch_loop(self) -> None:
        while True:
            changed = self._changed
            while not self._stopping and self.queue.running < self.config.workers:
                job = self.queue.pop_next()
                if job is None:
                    break
                assert self._tg is not None
                self._tg.start_soon(self._run_job, job)
            await changed.wait()

    async def _run_job(self, job: ServiceJob) -> None:
        req = job.request
        started = time.monotonic()
        self.stats.queue_wait_seconds.observe(started - job.submitted_at)
        out = self._workdir / f"{job.digest}.bin"
        outcome, path, seconds, reason = JobOutcome.FAILED, None, 0.0, ""
        try:
            stored = await self._lookup(req)  # published meanwhile by another process?
            if stored is not None:
                outcome, path = JobOutcome.STORED, str(stored)
            else:
                spec = JobSpec(req.graph, req.target, str(out), dict(req.options), req.fault)
                result = await anyio.to_thread.run_sync(
                    self.executor.run, spec, self.config.timeout_s, abandon_on_cancel=True
                )
                seconds = float(result.get("seconds", time.monotonic() - started))
                self.stats.compile_seconds.observe(seconds)
                published = await anyio.to_thread.run_sync(self._publish, job, result, seconds)
                if published is None:
                    reason = "the shared store could not be written (see the service log)"
                else:
                    outcome, path = JobOutcome.OK, str(published)
        except CompileError as exc:
            known = {o.value for o in JobOutcome}
            outcome = JobOutcome(exc.outcome) if exc.outcome in known else JobOutcome.FAILED
            reason = exc.reason
        except Exception as exc:  # a bug here must cost one job, never the service
            log.exception("job %s failed inside the service", job.digest[:12])
            reason = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            with contextlib.suppress(OSError):
                out.unlink()
        level = logging.INFO if outcome.has_artifact else logging.WARNING
        log.log(
            level,
            "job %s %s: %s in %.1f s for %d client(s)%s",
            job.digest[:12],
            req.target.label,
            outcome,
            seconds,
            len(job.requesters),
            f" ({reason})" if reason else "",
        )
        await self._complete(job, outcome, path=path, seconds=seconds, reason=reason)

    def _publish(self, job: ServiceJob, result: dict[str, Any], seconds: float) -> Path | None:
        src = result.get("path")
        if not src:
            return None
        extra = {"service": True, "clients": len(job.requesters), "pid": os.getpid()}
        return self.store.publish(job.request.key, src, compile_seconds=seconds, extra=extra)

    async def _complete(
        self,
        job: ServiceJob,
        outcome: JobOutcome,
        *,
        path: str | None = None,
        seconds: float = 0.0,
        reason: str = "",
    ) -> None:
        self.queue.finish(job)
        self.stats.jobs[(job.request.target.kind.value, outcome.value)] += 1
        frame = self._done_frame(job.digest, outcome, path=path, seconds=seconds, reason=reason)
        for conn in self._waiters.pop(job.digest, set()):
            conn.waiting.discard(job.digest)
            await conn.send(frame)
        self._poke()

    @staticmethod
    def _done_frame(
        digest: str,
        outcome: JobOutcome,
        *,
        path: str | None = None,
        seconds: float = 0.0,
        reason: str = "",
    ) -> bytes:
        return reply(
            MessageType.DONE,
            digest=digest,
            outcome=outcome,
            path=path,
            seconds=seconds,
            reason=reason,
        )

    # ---- reporting --------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        # WATCHDOG=1 is sent from the event loop itself: a wedged loop stops the pings
        # and systemd restarts the service, which is the point of the watchdog.
        interval = self.notifier.watchdog_interval_s
        period = min(interval or self.config.status_interval_s, self.config.status_interval_s)
        last_status = ""
        while True:
            if interval:
                self.notifier.watchdog()
            line = self.status_line()
            if line != last_status:
                self.notifier.status(line)
                last_status = line
            await anyio.sleep(period)

    async def _store_stats_loop(self) -> None:
        while True:
            try:
                self._store_stats = await anyio.to_thread.run_sync(self.store.stats)
            except OSError as exc:
                log.debug("store stats: %s", exc)
            await anyio.sleep(_STORE_STATS_EVERY_S)

    def status_line(self) -> str:
        done = sum(n for (_, o), n in self.stats.jobs.items() if o == JobOutcome.OK)
        return (
            f"{self.queue.depth} queued, {self.queue.running} compiling, "
            f"{self.stats.clients_connected} clients, {done} compiled"
        )

    def status(self) -> dict[str, Any]:
        now = time.monotonic()
        by_outcome: dict[str, int] = defaultdict(int)
        for (_, outcome), n in self.stats.jobs.items():
            by_outcome[outcome] += n
        jobs = sorted(self.queue.jobs(), key=lambda j: (-j.hotness, j.seq))
        return {
            "pid": os.getpid(),
            "version": __version__,
            "proto": SERVICE_PROTOCOL,
            "uptime_s": round(now - self.started, 3),
            "socket": self.config.socket,
            "store": str(self.store.root),
            "metrics_url": self.metrics.url if self.metrics is not None else None,
            "concurrency_limit": self.config.workers,
            "worker_pids": self.executor.pids(),
            "worker_restarts": self.executor.restarts,
            "queued": self.queue.depth,
            "in_flight": self.queue.running,
            "clients": self.stats.clients_connected,
            "jobs": dict(by_outcome),
            "submits": {str(k): v for k, v in self.stats.submits.items()},
            "config_reloads": {str(k): v for k, v in self.configs.reloads.items()},
            "config_error": self.configs.last_error,
            "stopping": self._stopping,
            "queue": [
                {
                    "digest": j.digest[:12],
                    "target": j.request.target.label,
                    "state": str(j.state),
                    "hotness": j.hotness,
                    "clients": len(j.requesters),
                    "age_s": round(now - j.submitted_at, 3),
                }
                for j in jobs[:50]
            ],
        }

    def snapshot(self) -> ServiceSnapshot:
        """For the metrics thread: plain reads of loop-owned values."""
        return ServiceSnapshot(
            stats=self.stats,
            queue_depth=self.queue.depth,
            in_flight=self.queue.running,
            concurrency_limit=self.config.workers,
            worker_restarts=self.executor.restarts,
            config_reloads=dict(self.configs.reloads),
            store_bytes=self._store_stats[0],
            store_artifacts=self._store_stats[1],
            store_write_errors=self.store.write_errors,
            uptime_seconds=time.monotonic() - self.started,
        )


def serve(config: ConfigManager, notifier: Notifier | None = None) -> None:
    """Run the service in this thread until a stop signal; the CLI's entry point."""
    anyio.run(Service(config, notifier=notifier).run)
