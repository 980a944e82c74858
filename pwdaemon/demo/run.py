"""One demo run: attach the demo model, drive it with traffic, record what happened.

`DemoRun` owns the traffic loop and its records; it draws through a view (`live` or
`plain`, chosen by whether the console is a terminal) and ends with `summary`. The
views and the summary read the run's records through the query methods below.
"""

from __future__ import annotations

import copy
import inspect
import os
import shutil
import tempfile
import threading
import time
from collections import deque
from typing import Any, Protocol

import torch
from rich.console import Console

from pwdaemon.config import CompileConfig, PolicyConfig
from pwdaemon.demo.live import LiveView
from pwdaemon.demo.options import (
    ATOL,
    LATENCY_WINDOW_S,
    RTOL,
    STOP_GRACE_S,
    DemoOptions,
    default_threads,
)
from pwdaemon.demo.plain import PlainView
from pwdaemon.demo.records import DemoResult, Mismatch, SizeRecord, SwapRecord
from pwdaemon.demo.summary import latency_figures, print_summary, speed_rows
from pwdaemon.demo.traffic import Call, Traffic
from pwdaemon.engine.events import EntryStatus, HandleStatus, PieceStatus, SwapEvent
from pwdaemon.handle import Handle, attach
from pwdaemon.metrics.stats import percentile
from pwdaemon.models import demo_model, example_tokens
from pwdaemon.serving.dispatch import Dispatcher
from pwdaemon.workers.executor import Executor

__all__ = ("DemoRun", "View", "run_demo")

# How often the view redraws (the live view) or polls for swaps (the plain one).
VIEW_EVERY_S = 0.25


class View(Protocol):
    """What the run draws through: the live view or the plain progress lines."""

    def start(self) -> None:
        """Before the first call."""

    def refresh(self, now: float, new_swaps: list[SwapRecord]) -> None:
        """Every VIEW_EVERY_S during the run; `new_swaps` landed since the last refresh."""

    def stop(self, status: HandleStatus | None) -> None:
        """After the last call, with the final status, before the summary."""


class DemoRun:
    """One demo run: the traffic loop and its records."""

    def __init__(
        self, options: DemoOptions, console: Console, executor: Executor | None = None
    ) -> None:
        self.options = options
        self.console = console
        self.executor = executor
        self.policy = (
            PolicyConfig()
            if options.hot_calls is None
            else PolicyConfig(hot_calls=options.hot_calls)
        )
        compile_kwargs: dict[str, Any] = {"general": options.general}
        if options.workers is not None:
            compile_kwargs["workers"] = options.workers
        self.compile_config = CompileConfig(**compile_kwargs)
        self.result = DemoResult()
        self.sizes: dict[int, SizeRecord] = self.result.sizes
        self.window: deque[tuple[float, float]] = deque()
        self.all_calls: list[tuple[float, float, int, str]] = []  # (at, seconds, size, tier)
        self._swap_lock = threading.Lock()
        self._new_swaps: list[SwapRecord] = []
        self.start = 0.0
        self.handle: Handle | None = None
        self.phase = 0
        self._fresh_dir: str | None = None
        self._compiling_since: dict[tuple[int, str], float] = {}
        self._next_view = 0.0
        self._schedule_offset = 0.0
        self._stop_at: float | None = None  # set by stop_after_swaps

    def now(self) -> float:
        """Seconds since the run started (0 before it starts)."""
        return time.monotonic() - self.start if self.start else 0.0

    # ---- callbacks (engine thread) ---------------------------------------------------

    def _on_swap(self, event: SwapEvent) -> None:
        record = SwapRecord(time.monotonic() - self.start, event)
        with self._swap_lock:
            self._new_swaps.append(record)

    def _drain_swaps(self) -> list[SwapRecord]:
        with self._swap_lock:
            new, self._new_swaps = self._new_swaps, []
        self.result.swaps.extend(new)
        wanted = self.options.stop_after_swaps
        if wanted and self._stop_at is None and len(self.result.specialized_swaps) >= wanted:
            # Serve a little longer, so calls run (and are checked) on what just landed.
            self._stop_at = time.monotonic() - self.start + STOP_GRACE_S
        for s in new:
            size = s.event.size
            if size is not None and size in self.sizes:
                hot_at = self.sizes[size].hot_at
                if hot_at is not None and size not in self.result.hot_to_swap:
                    self.result.hot_to_swap[size] = max(0.0, s.at - hot_at)
        return new

    # ---- artifact store ----------------------------------------------------------------

    def _store_kwargs(self) -> dict[str, Any]:
        opts = self.options
        if "store" not in inspect.signature(attach).parameters:
            return {}  # a pwdaemon without an artifact store
        if opts.fresh:
            self._fresh_dir = tempfile.mkdtemp(prefix="pwdaemon-demo-store-")
            return {"store": self._fresh_dir}
        if opts.store is not None:
            return {"store": opts.store}
        return {}

    def _remove_fresh_store(self) -> None:
        if self._fresh_dir is not None:
            shutil.rmtree(self._fresh_dir, ignore_errors=True)
            self._fresh_dir = None

    # ---- main loop -------------------------------------------------------------------

    def run(self) -> DemoResult:
        """Run the traffic, show it, print the summary; the result says what happened."""
        saved_env = {k: os.environ.get(k) for k in ("TORCHINDUCTOR_CACHE_DIR",)}
        saved_threads = torch.get_num_threads()
        # On a small machine the compile workers need cores too: two intra-op threads on
        # two busy cores wait on each other at every op (tens of ms per call).
        torch.set_num_threads(self.options.threads or default_threads())
        try:
            return self._run()
        finally:
            torch.set_num_threads(saved_threads)
            self._remove_fresh_store()
            # attach() may point this process's Inductor cache into the store: undo that
            # for whoever runs next in this process (the tests run the demo in-process).
            for k, v in saved_env.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    def _run(self) -> DemoResult:
        opts = self.options
        model = demo_model(opts.seed)
        reference = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(opts.seed)
        traffic = Traffic(opts.traffic_config())
        use_live = not opts.plain and self.console.is_terminal
        self.start = time.monotonic()
        handle = attach(
            model,
            policy=self.policy,
            compiler=self.compile_config,
            executor=self.executor,
            **self._store_kwargs(),
        )
        self.handle = handle
        handle.on_swap(self._on_swap)
        view: View = LiveView(self) if use_live else PlainView(self)
        try:
            view.start()
            self._loop(model, reference, gen, traffic, view)
        except KeyboardInterrupt:
            self.result.error = "interrupted"
        except Exception as exc:  # reported in the summary, exit code 1
            self.result.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.result.duration = time.monotonic() - self.start
            status = self.safe_status()
            self._drain_swaps()
            view.stop(status)
            self._finish(status)
        return self.result

    def _loop(
        self,
        model: torch.nn.Module,
        reference: torch.nn.Module,
        gen: torch.Generator,
        traffic: Traffic,
        view: View,
    ) -> None:
        opts = self.options
        hot_calls = self.policy.hot_calls
        dispatcher = None
        with torch.no_grad():
            for call in traffic:
                now = time.monotonic() - self.start
                if now >= opts.duration or (self._stop_at is not None and now >= self._stop_at):
                    break
                due = call.at + self._schedule_offset
                if due > now:
                    self._idle_until(due, view)
                self.phase = call.phase
                tokens = example_tokens(call.size, generator=gen)
                tier = (
                    "eager" if dispatcher is None else dispatcher.table.lookup(call.size).tier.value
                )
                t0 = time.perf_counter()
                out = model(tokens)
                dt = time.perf_counter() - t0
                at = time.monotonic() - self.start
                if self.result.calls == 0:
                    # The first call pays dynamo's trace: the traffic's clock starts
                    # after it, instead of firing the calls due meanwhile as one burst.
                    self.result.first_call_s = dt
                    self._schedule_offset = at - call.at
                dispatcher = self.main_dispatcher()
                self._record(call, dt, at, tier, hot_calls)
                rec = self.sizes[call.size]
                if call.index % opts.check_every == 0 or tier not in rec.checked_tiers:
                    rec.checked_tiers.add(tier)
                    self._check(call, tier, tokens, out, reference)
                if at >= self._next_view:
                    self._refresh_view(at, view)

    def _idle_until(self, at: float, view: View) -> None:
        # Paced traffic: sleep until the next call is due, redrawing meanwhile.
        while True:
            now = time.monotonic() - self.start
            if now >= at:
                return
            if now >= self._next_view:
                self._refresh_view(now, view)
            time.sleep(min(at - now, max(0.0, self._next_view - now), 0.05))

    def _refresh_view(self, now: float, view: View) -> None:
        self._next_view = now + VIEW_EVERY_S
        view.refresh(now, self._drain_swaps())

    def _record(self, call: Call, dt: float, at: float, tier: str, hot_calls: int) -> None:
        rec = self.sizes.get(call.size)
        if rec is None:
            rec = self.sizes[call.size] = SizeRecord()
        rec.calls += 1
        rec.latencies.append(dt)
        rec.tiers[tier] += 1
        if rec.calls == hot_calls:
            rec.hot_at = at
        self.result.calls += 1
        self.result.calls_by_tier[tier] += 1
        self.window.append((at, dt))
        while self.window and self.window[0][0] < at - LATENCY_WINDOW_S:
            self.window.popleft()
        self.all_calls.append((at, dt, call.size, tier))

    def _check(
        self,
        call: Call,
        tier: str,
        tokens: torch.Tensor,
        out: torch.Tensor,
        reference: torch.nn.Module,
    ) -> None:
        want = reference(tokens)
        self.result.checked += 1
        if out.shape != want.shape or not torch.allclose(out, want, atol=ATOL, rtol=RTOL):
            diff = float((out - want).abs().max()) if out.shape == want.shape else float("inf")
            self.result.mismatches.append(Mismatch(call.index, call.size, tier, diff))

    def safe_status(self) -> HandleStatus | None:
        """The handle's status, or None (no handle yet, or it failed: a view must not
        stop the traffic). Also notes when each running compile started."""
        if self.handle is None:
            return None
        try:
            status = self.handle.status()
        except Exception:  # a view must not stop the traffic
            return None
        now = time.monotonic() - self.start
        compiling = set()
        for piece in status.pieces:
            for e in piece.entries:
                if e.state == "compiling":
                    key = (piece.graph, e.target)
                    compiling.add(key)
                    self._compiling_since.setdefault(key, now)
        for key in list(self._compiling_since):
            if key not in compiling:
                del self._compiling_since[key]
        return status

    # ---- what the views and the summary read ---------------------------------------

    def main_index(self) -> int | None:
        """The graph piece that carries the size: the first specializable one."""
        pieces = self.handle.pieces if self.handle is not None else ()
        if not pieces:
            return None
        return next((p.index for p in pieces if p.specializable), pieces[0].index)

    def main_dispatcher(self) -> Dispatcher | None:
        """The dispatcher of the main piece, None before dynamo has traced the model."""
        index = self.main_index()
        if index is None or self.handle is None:
            return None
        return self.handle.pieces[index].dispatcher

    def piece_status(self, status: HandleStatus) -> PieceStatus:
        """The main piece's part of `status` (which must have pieces)."""
        index = self.main_index()
        return next((p for p in status.pieces if p.graph == index), status.pieces[0])

    def table_version(self, status: HandleStatus | None) -> int:
        """The main piece's table version, 0 before there is one."""
        return self.piece_status(status).table_version if status and status.pieces else 0

    def size_entries(self, status: HandleStatus | None) -> dict[int, EntryStatus]:
        """The main piece's entries for single sizes, by size."""
        out: dict[int, EntryStatus] = {}
        if status is None or not status.pieces:
            return out
        for e in self.piece_status(status).entries:
            if e.range is not None and e.range.is_size:
                out[e.range.start] = e
        return out

    def general_entry(self, status: HandleStatus | None) -> EntryStatus | None:
        """The main piece's general (dynamic-shape) entry, if it has one."""
        if status is None or not status.pieces:
            return None
        return next((e for e in self.piece_status(status).entries if e.target == "general"), None)

    def tier_now(self, size: int) -> str:
        """The tier that would serve `size` now."""
        dispatcher = self.main_dispatcher()
        return "eager" if dispatcher is None else dispatcher.table.lookup(size).tier.value

    def compiling_for(self, target: str) -> float | None:
        """Seconds the main piece's compile of `target` has been running, if it is."""
        since = self._compiling_since.get((self.main_index() or 0, target))
        return None if since is None else time.monotonic() - self.start - since

    def size_state(self, size: int, entry: EntryStatus | None) -> str:
        """The state of `size`'s job, or for a size without one "warm" or "seen"."""
        if entry is not None:
            return str(entry.state)
        rec = self.sizes.get(size)
        # Called often enough to be hot at an empty queue, but a long queue raises the
        # bar (PolicyConfig.queue_pressure) or the budget is spent: "warm".
        return "warm" if rec is not None and rec.calls >= self.policy.hot_calls else "seen"

    def window_stats(self) -> tuple[float, float, float]:
        """p50, p99 and max latency (seconds) over the last LATENCY_WINDOW_S."""
        lat = [dt for _, dt in self.window]
        return percentile(lat, 50), percentile(lat, 99), max(lat, default=0.0)

    # ---- end of run ------------------------------------------------------------------

    def _finish(self, status: HandleStatus | None) -> None:
        r = self.result
        handle = self.handle
        entries = self.size_entries(status)
        r.entries = list(self.piece_status(status).entries) if status and status.pieces else []
        r.graph_pieces = len(handle.pieces) if handle is not None else 0
        dispatcher = self.main_dispatcher()
        table = dispatcher.table if dispatcher is not None else None
        samples = dict(dispatcher.samples) if dispatcher is not None else {}
        if handle is not None:
            # Stop the workers first: the speed measurements want a quiet machine.
            handle.detach()
        latency_figures(r, self.all_calls)
        if table is not None:
            r.speed.extend(speed_rows(table, samples, entries, self.sizes))
        print_summary(self, status)


def run_demo(
    options: DemoOptions, console: Console | None = None, executor: Executor | None = None
) -> DemoResult:
    """Run the demo; prints the live view (or plain lines) and the summary to `console`.

    `executor` replaces the worker processes (`pwdaemon.testing.FakeExecutor` in tests).
    """
    return DemoRun(options, console or Console(), executor).run()
