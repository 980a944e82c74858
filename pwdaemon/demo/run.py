"""`pwdaemon demo`: watch pwdaemon serve a small transformer while it compiles behind it.

Attaches the bundled `TinyTransformer` with the defaults (embedded worker pool, no
service), drives it with seeded synthetic traffic (`_traffic`) for a bounded time, and
shows, live: every size the traffic brought, the tier serving it now, its compile, the
table version, the job queue, recent swaps and the latency of the last few seconds.

Every sampled call (every `--check-every`th, plus the first call of each size on each
tier) is compared with an eager reference copy of the model (float32, atol 1e-4, rtol
1e-4). The summary at the end reports mismatches (the exit code is 1 if there are any),
compiles, time from a size turning hot to its swap, the worst call during warm-up
against the median, and eager / general / specialized speed per hot size measured on
the same recorded inputs.

With no terminal (or `--plain`) it prints progress lines instead of the live view.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import math
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pwdaemon.config import CompileConfig, PolicyConfig
from pwdaemon.demo.traffic import Call, Traffic, TrafficConfig
from pwdaemon.engine.events import EntryStatus, HandleStatus, PieceStatus, SwapEvent
from pwdaemon.handle import Handle, attach
from pwdaemon.models import DEMO_CONFIG, demo_model, example_tokens
from pwdaemon.serving.dispatch import Dispatcher
from pwdaemon.serving.range_table import Tier
from pwdaemon.workers.executor import Executor

__all__ = ["ATOL", "RTOL", "DemoOptions", "DemoResult", "add_demo_parser", "cmd_demo", "run_demo"]

ATOL = 1e-4
RTOL = 1e-4
DEFAULT_DURATION_S = 60.0
QUICK_DURATION_S = 20.0
LATENCY_WINDOW_S = 3.0
PLAIN_EVERY_S = 2.0
LIVE_EVERY_S = 0.25
STOP_GRACE_S = 3.0
SPEED_SIZES = 8  # the summary times this many of the hottest specialized sizes
SUMMARY_ROWS = 15  # hot sizes listed in the summary

TIER_STYLE = {
    "eager": "red",
    "general": "yellow",
    "range": "cyan",
    "size": "bold green",
    "graph": "bold magenta",
}
STATE_STYLE = {
    "live": "green",
    "compiling": "bold yellow",
    "queued": "cyan",
    "failed": "bold red",
    "rejected": "bold red",
    "dropped": "dim",
    "cancelled": "dim",
    "warm": "magenta",
    "seen": "dim",
}


@dataclass(frozen=True)
class DemoOptions:
    """What `pwdaemon demo` does; the CLI flags map one to one."""

    duration: float = DEFAULT_DURATION_S
    seed: int = 0
    plain: bool = False
    rate: float = 100.0
    """Mean calls per second the traffic asks for (the loop serves as fast as it can)."""
    decode_max: int = 128
    prefill_max: int = 512
    """Sizes stay small on a CPU; the benchmarks use the full 1..2048."""
    phases: int = 4
    """How many times the popular sizes shift during the run."""
    check_every: int = 10
    workers: int | None = None
    hot_calls: int | None = None
    store: str | None = None
    """Artifact store directory (None: pwdaemon's default store)."""
    fresh: bool = False
    """Use a new, empty store (and Inductor cache) for this run, removed at the end."""
    general: bool = True
    """Compile the general (dynamic-shape) runnable first, as `attach()` does by default."""
    stop_after_swaps: int = 0
    """End early, a few seconds after this many specialized swaps (0: run the duration)."""
    threads: int | None = None
    """Serving's intra-op threads (None: half the CPUs; the rest is the compilers')."""

    def traffic_config(self) -> TrafficConfig:
        expected_calls = max(1, int(self.rate * self.duration))
        return TrafficConfig(
            seed=self.seed,
            decode_max=self.decode_max,
            prefill_max=self.prefill_max,
            phase_calls=max(1, expected_calls // max(1, self.phases)),
            rate=self.rate,
        )


@dataclass
class SizeRecord:
    """What the demo saw of one size."""

    calls: int = 0
    latencies: list[float] = field(default_factory=list)
    tiers: Counter[str] = field(default_factory=Counter)
    hot_at: float | None = None  # when the size reached the policy's hot_calls
    checked_tiers: set[str] = field(default_factory=set)


@dataclass(frozen=True)
class SwapRecord:
    at: float  # seconds since the demo started
    event: SwapEvent


@dataclass(frozen=True)
class Mismatch:
    index: int
    size: int
    tier: str
    max_abs_diff: float


@dataclass(frozen=True)
class SpeedRow:
    """Median seconds of one recorded input through each tier's runnable."""

    size: int
    eager_s: float
    general_s: float | None
    size_s: float


@dataclass
class DemoResult:
    """Everything the summary reports, for tests and for the benchmarks."""

    duration: float = 0.0
    calls: int = 0
    checked: int = 0
    mismatches: list[Mismatch] = field(default_factory=list)
    swaps: list[SwapRecord] = field(default_factory=list)
    sizes: dict[int, SizeRecord] = field(default_factory=dict)
    entries: list[EntryStatus] = field(default_factory=list)
    calls_by_tier: Counter[str] = field(default_factory=Counter)
    hot_to_swap: dict[int, float] = field(default_factory=dict)
    first_call_s: float = 0.0
    warmup_end_s: float = 0.0
    warmup_max_ms: float = 0.0
    warmup_max_size: int = 0
    warmup_max_tier: str = ""
    median_ms: float = 0.0
    warmup_worst_vs_own_median: float = 0.0
    warmup_worst_own_size: int = 0
    speed: list[SpeedRow] = field(default_factory=list)
    graph_pieces: int = 0
    error: str | None = None

    @property
    def specialized_swaps(self) -> list[SwapRecord]:
        return [s for s in self.swaps if s.event.tier in (Tier.SIZE, Tier.RANGE, Tier.GRAPH)]

    @property
    def exit_code(self) -> int:
        """0: every checked call matched; 1: mismatches or an error; 130: interrupted."""
        if self.mismatches:
            return 1
        if self.error == "interrupted":
            return 130
        return 1 if self.error else 0


# ---- measurement helpers ---------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100), nearest rank; 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100.0 * len(ordered)) - 1))
    return ordered[rank]


def _time_call(fn: Callable[..., Any], args: Sequence[Any], budget_s: float = 0.1) -> float:
    """Median seconds of `fn(*args)` over repeats within about `budget_s` (>= 5 runs)."""
    with torch.no_grad():
        fn(*args)  # warm caches
        times: list[float] = []
        spent = 0.0
        while len(times) < 5 or (spent < budget_s and len(times) < 200):
            t0 = time.perf_counter()
            fn(*args)
            dt = time.perf_counter() - t0
            times.append(dt)
            spent += dt
    return statistics.median(times)


def _ordinal(n: int) -> str:
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def default_threads() -> int:
    """Half the CPUs for serving, at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


def _fmt_s(seconds: float | None, digits: int = 1) -> str:
    return "-" if seconds is None else f"{seconds:.{digits}f}"


def _fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"


# ---- the run ---------------------------------------------------------------------------


class DemoRun:
    """One demo run: the traffic loop, its records, the views, the summary."""

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
        self._next_plain = 0.0
        self._fresh_dir: str | None = None
        self._compiling_since: dict[tuple[int, str], float] = {}
        self._next_view = 0.0
        self._schedule_offset = 0.0
        self._stop_at: float | None = None  # set by stop_after_swaps

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
        if not use_live:
            self._print_plain_header()
        live: Live | None = None
        try:
            if use_live:
                live = Live(
                    self._render(None),
                    console=self.console,
                    auto_refresh=False,
                    transient=False,
                    redirect_stdout=True,
                    redirect_stderr=True,
                    vertical_overflow="crop",
                )
                live.start()
            self._loop(model, reference, gen, traffic, live)
        except KeyboardInterrupt:
            self.result.error = "interrupted"
        except Exception as exc:  # reported in the summary, exit code 1
            self.result.error = f"{type(exc).__name__}: {exc}"
        finally:
            self.result.duration = time.monotonic() - self.start
            status = self._safe_status()
            self._drain_swaps()
            if live is not None:
                live.update(self._render(status), refresh=True)
                live.stop()
            self._finish(status)
        return self.result

    def _loop(
        self,
        model: torch.nn.Module,
        reference: torch.nn.Module,
        gen: torch.Generator,
        traffic: Traffic,
        live: Live | None,
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
                    self._idle_until(due, live)
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
                    # The first call pays dynamo's capture: the traffic's clock starts
                    # after it, instead of firing the calls due meanwhile as one burst.
                    self.result.first_call_s = dt
                    self._schedule_offset = at - call.at
                dispatcher = self._main_dispatcher()
                self._record(call, dt, at, tier, hot_calls)
                rec = self.sizes[call.size]
                if call.index % opts.check_every == 0 or tier not in rec.checked_tiers:
                    rec.checked_tiers.add(tier)
                    self._check(call, tier, tokens, out, reference)
                if at >= self._next_view:
                    self._refresh_view(at, live)

    def _idle_until(self, at: float, live: Live | None) -> None:
        while True:
            now = time.monotonic() - self.start
            if now >= at:
                return
            if now >= self._next_view:
                self._refresh_view(now, live)
            time.sleep(min(at - now, max(0.0, self._next_view - now), 0.05))

    def _refresh_view(self, now: float, live: Live | None) -> None:
        self._next_view = now + LIVE_EVERY_S
        new = self._drain_swaps()
        if live is not None:
            live.update(self._render(self._safe_status()), refresh=True)
            return
        for s in new:
            self.console.print(self._plain_swap_line(s), highlight=False, soft_wrap=True)
        if now >= self._next_plain:
            self._next_plain = now + PLAIN_EVERY_S
            self.console.print(
                self._plain_line(now, self._safe_status()), highlight=False, soft_wrap=True
            )

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

    def _safe_status(self) -> HandleStatus | None:
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

    # ---- shared view data ------------------------------------------------------------

    def _main_index(self) -> int | None:
        """The graph piece that carries the size: the first specializable one."""
        pieces = self.handle.pieces if self.handle is not None else ()
        if not pieces:
            return None
        return next((p.index for p in pieces if p.specializable), pieces[0].index)

    def _main_dispatcher(self) -> Dispatcher | None:
        index = self._main_index()
        if index is None or self.handle is None:
            return None
        return self.handle.pieces[index].dispatcher

    def _piece_status(self, status: HandleStatus) -> PieceStatus:
        index = self._main_index()
        return next((p for p in status.pieces if p.graph == index), status.pieces[0])

    def _size_entries(self, status: HandleStatus | None) -> dict[int, EntryStatus]:
        out: dict[int, EntryStatus] = {}
        if status is None or not status.pieces:
            return out
        for e in self._piece_status(status).entries:
            if e.range is not None and e.range.is_size:
                out[e.range.start] = e
        return out

    def _general_entry(self, status: HandleStatus | None) -> EntryStatus | None:
        if status is None or not status.pieces:
            return None
        return next((e for e in self._piece_status(status).entries if e.target == "general"), None)

    def _tier_now(self, size: int) -> str:
        dispatcher = self._main_dispatcher()
        return "eager" if dispatcher is None else dispatcher.table.lookup(size).tier.value

    def _state_text(self, entry: EntryStatus) -> Text:
        """An entry's state; a running compile shows for how long it has been running."""
        label = entry.state
        if entry.state == "compiling":
            since = self._compiling_since.get((self._main_index() or 0, entry.target))
            if since is not None:
                label = f"compiling {time.monotonic() - self.start - since:.0f}s"
        elif entry.state == "queued" and entry.attempts:
            label = f"queued (retry {entry.attempts})"
        if entry.source not in (None, "compiled") and entry.state == "live":
            label += f" ({entry.source})"
        return Text(label, style=STATE_STYLE.get(entry.state, ""))

    def _size_state(self, size: int, entry: EntryStatus | None) -> str:
        if entry is not None:
            return entry.state
        rec = self.sizes.get(size)
        # Called often enough to be hot at an empty queue, but a long queue raises the
        # bar (PolicyConfig.queue_pressure) or the budget is spent: "warm".
        return "warm" if rec is not None and rec.calls >= self.policy.hot_calls else "seen"

    def _window_stats(self) -> tuple[float, float, float]:
        lat = [dt for _, dt in self.window]
        return percentile(lat, 50), percentile(lat, 99), max(lat, default=0.0)

    # ---- live view -------------------------------------------------------------------

    def _render(self, status: HandleStatus | None) -> RenderableType:
        opts = self.options
        now = time.monotonic() - self.start if self.start else 0.0
        elapsed = min(now, opts.duration)
        height = self.console.size.height
        width = self.console.size.width

        cfg = DEMO_CONFIG
        title = Text.assemble(
            ("pwdaemon demo", "bold"),
            "  TinyTransformer: ",
            f"{cfg.layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab}, seq {cfg.seq}; "
            "the batch is the dynamic size",
        )
        bar_width = max(10, min(40, width - 60))
        filled = int(bar_width * elapsed / opts.duration) if opts.duration > 0 else bar_width
        progress = Text.assemble(
            ("elapsed ", "dim"),
            f"{elapsed:5.1f} s / {opts.duration:g} s  ",
            ("━" * filled, "green"),
            ("━" * (bar_width - filled), "grey23"),
            ("   traffic phase ", "dim"),
            f"{self.phase + 1}/{opts.phases}",
            ("   seed ", "dim"),
            str(opts.seed),
        )
        rate = self.result.calls / now if now > 0 else 0.0
        version = self._piece_status(status).table_version if status and status.pieces else 0
        queue = status.queue_depth if status else 0
        in_flight = status.in_flight if status else 0
        pids = list(status.worker_pids) if status else []
        plan = "complete" if status and status.plan_complete else "running"
        counts = Text.assemble(
            ("calls ", "dim"),
            f"{self.result.calls:,} ({rate:.0f}/s)",
            ("   sizes seen ", "dim"),
            str(len(self.sizes)),
            ("   table ", "dim"),
            (f"v{version}", "bold"),
            ("   queue ", "dim"),
            (str(queue), "bold cyan" if queue else ""),
            ("   in flight ", "dim"),
            (str(in_flight), "bold yellow" if in_flight else ""),
            ("   workers ", "dim"),
            f"{len(pids)}"
            + (
                f" (pid {', '.join(map(str, pids))})"
                if pids
                else " (starting)"
                if self.executor is None
                else " (in-process)"
            ),
            ("   plan ", "dim"),
            plan,
        )
        p50, p99, worst = self._window_stats()
        mism = len(self.result.mismatches)
        latency = Text.assemble(
            (f"latency (last {LATENCY_WINDOW_S:g} s): ", "dim"),
            ("p50 ", "dim"),
            (_fmt_ms(p50), "bold"),
            ("  p99 ", "dim"),
            (_fmt_ms(p99), "bold"),
            ("  max ", "dim"),
            _fmt_ms(worst),
            ("   checked vs eager reference ", "dim"),
            f"{self.result.checked:,} calls, ",
            (f"{mism} mismatches", "bold red" if mism else "green"),
        )
        tiers = self._tier_bar()
        header = Panel(
            Group(progress, counts, latency, tiers),
            title=title,
            title_align="left",
            box=box.ROUNDED,
        )

        rows_room = max(5, height - 15)
        sizes_table = self._sizes_table(status, rows_room)
        swaps = self._swaps_panel(rows_room)
        body = Table.grid(padding=(0, 4))
        body.add_column()
        body.add_column()
        body.add_row(sizes_table, swaps)
        return Group(header, body)

    def _tier_bar(self) -> Text:
        total = sum(self.result.calls_by_tier.values())
        parts: list[tuple[str, str] | str] = [("calls by tier ", "dim")]
        for tier in ("eager", "general", "range", "size", "graph"):
            n = self.result.calls_by_tier.get(tier, 0)
            if n == 0 and tier in ("range", "graph"):
                continue
            share = 100.0 * n / total if total else 0.0
            parts.append((f"{tier} {share:4.1f}%", TIER_STYLE[tier]))
            parts.append("   ")
        return Text.assemble(*parts)

    def _sizes_table(self, status: HandleStatus | None, rows: int) -> RenderableType:
        entries = self._size_entries(status)
        ordered = sorted(self.sizes.items(), key=lambda kv: (-kv[1].calls, kv[0]))
        shown = ordered[: max(1, rows - 1)]
        hidden = ordered[len(shown) :]
        table = Table(
            box=box.SIMPLE_HEAD,
            title=f"sizes, by calls (top {len(shown)} of {len(ordered)})",
            title_justify="left",
            title_style="bold",
            pad_edge=False,
        )
        table.add_column("size", justify="right")
        table.add_column("calls", justify="right")
        table.add_column("served by")
        table.add_column("compile s", justify="right")
        table.add_column("state")
        table.add_column("hot→swap s", justify="right")
        general = self._general_entry(status)
        if general is not None:
            table.add_row(
                Text("general", style="yellow"),
                "",
                Text("(dynamic)", style="dim"),
                _fmt_s(general.compile_seconds),
                self._state_text(general),
                "",
            )
        for size, rec in shown:
            entry = entries.get(size)
            tier = self._tier_now(size)
            state = self._size_state(size, entry)
            h2s = self.result.hot_to_swap.get(size)
            table.add_row(
                str(size),
                f"{rec.calls:,}",
                Text(tier, style=TIER_STYLE.get(tier, "")),
                _fmt_s(entry.compile_seconds if entry else None),
                self._state_text(entry)
                if entry is not None
                else Text(state, style=STATE_STYLE.get(state, "")),
                _fmt_s(h2s),
            )
        if hidden:
            calls = sum(r.calls for _, r in hidden)
            jobs = sum(1 for s, _ in hidden if s in entries)
            note = f"+ {len(hidden)} more sizes, {calls:,} calls"
            if jobs:
                note += f", {jobs} with a compile job"
            table.caption = note
            table.caption_justify = "left"
        return table

    def _swaps_panel(self, rows: int) -> RenderableType:
        table = Table(
            box=box.SIMPLE_HEAD,
            title=f"recent swaps ({len(self.result.swaps)} in all)",
            title_justify="left",
            title_style="bold",
            pad_edge=False,
        )
        table.add_column("at", justify="right")
        table.add_column("runnable")
        table.add_column("ver", justify="right")
        table.add_column("compile", justify="right")
        table.add_column("hot→swap", justify="right")
        table.add_column("check")
        recent = self.result.swaps[-max(1, rows) :]
        for s in reversed(recent):
            e = s.event
            label = "general" if e.range is None else f"{e.tier.value} {e.range}"
            h2s = self.result.hot_to_swap.get(e.size) if e.size is not None else None
            table.add_row(
                f"{s.at:.1f} s",
                Text(label, style=TIER_STYLE.get(e.tier.value, "")),
                f"v{e.version}",
                f"{e.compile_seconds:.1f} s" + ("" if e.source == "compiled" else f" ({e.source})"),
                "-" if h2s is None else f"{h2s:.1f} s",
                Text("validated", style="green") if e.validated else Text("-", style="dim"),
            )
        if not recent:
            table.add_row(
                "",
                Text("none yet: serving on eager while workers compile", style="dim"),
                "",
                "",
                "",
                "",
            )
        return table

    # ---- plain view ------------------------------------------------------------------

    def _print_plain_header(self) -> None:
        o = self.options
        cfg = DEMO_CONFIG
        self.console.print(
            f"pwdaemon demo: TinyTransformer ({cfg.layers} layers, d_model {cfg.d_model}, "
            f"vocab {cfg.vocab}, seq {cfg.seq}); {o.duration:g} s of traffic at ~{o.rate:g} "
            f"calls/s, sizes 1..{o.prefill_max}, seed {o.seed}; checking every "
            f"{o.check_every}th call against eager (atol {ATOL:g}, rtol {RTOL:g})",
            highlight=False,
            soft_wrap=True,
        )

    def _plain_line(self, now: float, status: HandleStatus | None) -> str:
        p50, p99, _ = self._window_stats()
        version = self._piece_status(status).table_version if status and status.pieces else 0
        queue = status.queue_depth if status else 0
        in_flight = status.in_flight if status else 0
        total = sum(self.result.calls_by_tier.values()) or 1
        tiers = " ".join(
            f"{t} {100.0 * n / total:.0f}%"
            for t, n in sorted(self.result.calls_by_tier.items(), key=lambda kv: kv[0])
        )
        live_sizes = sorted(s for s, e in self._size_entries(status).items() if e.state == "live")
        return (
            f"[{now:5.1f}s] calls {self.result.calls:>6}  sizes {len(self.sizes):>3}  "
            f"table v{version}  queue {queue}  in flight {in_flight}  "
            f"p50 {_fmt_ms(p50)}  p99 {_fmt_ms(p99)}  tiers: {tiers}  "
            f"specialized: {','.join(map(str, live_sizes)) or '-'}  "
            f"mismatches {len(self.result.mismatches)}"
        )

    def _plain_swap_line(self, s: SwapRecord) -> str:
        e = s.event
        label = "general (dynamic)" if e.range is None else f"{e.tier.value} {e.range}"
        h2s = self.result.hot_to_swap.get(e.size) if e.size is not None else None
        extra = "" if h2s is None else f", hot->swap {h2s:.1f} s"
        check = ", validated" if e.validated else ""
        return (
            f"[{s.at:5.1f}s] swap: {label} live in table v{e.version}, compiled in "
            f"{e.compile_seconds:.2f} s ({e.source}){extra}{check}"
        )

    # ---- end of run ------------------------------------------------------------------

    def _finish(self, status: HandleStatus | None) -> None:
        r = self.result
        handle = self.handle
        entries = self._size_entries(status)
        r.entries = list(self._piece_status(status).entries) if status and status.pieces else []
        r.graph_pieces = len(handle.pieces) if handle is not None else 0
        dispatcher = self._main_dispatcher()
        table = dispatcher.table if dispatcher is not None else None
        samples = dict(dispatcher.samples) if dispatcher is not None else {}
        if handle is not None:
            # Stop the workers first: the speed measurements want a quiet machine.
            handle.detach()
        self._latency_figures()
        if table is not None:
            live = [s for s in entries if table.exact.get(s) is not None and s in samples]
            live.sort(key=lambda s: -self.sizes[s].calls if s in self.sizes else 0)
            for size in sorted(live[:SPEED_SIZES]):
                entry, sample = table.exact[size], samples[size]
                eager = _time_call(table.eager.runnable, sample)
                general = (
                    _time_call(table.general.runnable, sample)
                    if table.general is not None
                    else None
                )
                specialized = _time_call(entry.runnable, sample)
                r.speed.append(SpeedRow(size, eager, general, specialized))
        self._print_summary(status)

    def _latency_figures(self) -> None:
        r = self.result
        calls = self.all_calls[1:]  # the first call is dynamo's capture, reported apart
        if not calls:
            return
        r.median_ms = statistics.median(dt for _, dt, _, _ in calls) * 1e3
        last_swap = max((s.at for s in r.swaps), default=r.duration)
        r.warmup_end_s = last_swap
        warm = [c for c in calls if c[0] <= last_swap] or calls
        _, dt, size, tier = max(warm, key=lambda c: c[1])
        r.warmup_max_ms, r.warmup_max_size, r.warmup_max_tier = dt * 1e3, size, tier
        own = {
            s: statistics.median(rec.latencies[1:] if s == calls[0][2] else rec.latencies)
            for s, rec in self.sizes.items()
            if rec.calls >= 5
        }
        worst, worst_size = 0.0, 0
        for _, dt, size, _ in warm:
            m = own.get(size)
            if m and dt / m > worst:
                worst, worst_size = dt / m, size
        r.warmup_worst_vs_own_median, r.warmup_worst_own_size = worst, worst_size

    def _print_summary(self, status: HandleStatus | None) -> None:
        r, o, con = self.result, self.options, self.console
        con.print()
        con.rule("[bold]pwdaemon demo: summary", align="left")
        total = sum(r.calls_by_tier.values()) or 1
        pieces = (
            "dynamo captured 1 graph, used for every size (no retrace)"
            if r.graph_pieces == 1
            else f"dynamo captured {r.graph_pieces} graph pieces"
        )
        con.print(
            f"Ran {r.duration:.1f} s: {r.calls:,} calls, {len(r.sizes)} distinct sizes "
            f"(1..{max(r.sizes, default=0)}), seed {o.seed}; {pieces}.",
            highlight=False,
        )
        tiers = ", ".join(
            f"{t} {100.0 * r.calls_by_tier.get(t, 0) / total:.1f}%"
            for t in ("eager", "general", "range", "size")
            if r.calls_by_tier.get(t, 0) or t in ("eager", "general", "size")
        )
        con.print(f"Calls served by tier: {tiers}.", highlight=False)
        mism = len(r.mismatches)
        verdict = "[bold green]0 mismatches[/]" if not mism else f"[bold red]{mism} MISMATCHES[/]"
        con.print(
            f"Correctness: {r.checked:,} calls (every {o.check_every}th, plus the first call of "
            f"each size on each tier) compared with an eager reference copy, float32, "
            f"atol {ATOL:g} rtol {RTOL:g}: {verdict}.",
            highlight=False,
        )
        for m in r.mismatches[:10]:
            con.print(
                f"  call {m.index}: size {m.size} on {m.tier}, max abs diff {m.max_abs_diff:.3g}",
                highlight=False,
            )
        if r.error:
            con.print(f"[bold red]The run stopped early: {r.error}[/]", highlight=False)

        # Compiles.
        jobs = [e for e in r.entries if e.target != "eager"]
        states = Counter(e.state for e in jobs)
        live_sizes = sum(1 for e in jobs if e.state == "live" and e.tier is not Tier.GENERAL)
        general = next((e for e in jobs if e.target == "general"), None)
        parts = [f"{n} {state}" for state, n in sorted(states.items())]
        if general is None:
            general_text = "no general compile (--no-general)"
        elif general.state == "live" and general.compile_seconds is not None:
            general_text = f"general live (compiled in {general.compile_seconds:.1f} s)"
        else:
            general_text = f"general {general.state}"
        unfinished = states.get("queued", 0) + states.get("compiling", 0)
        con.print(
            f"Compiles: {len(jobs)} jobs ({', '.join(parts) or 'none'}); {general_text}, "
            f"{live_sizes} specialized size{'s' if live_sizes != 1 else ''} live."
            + (f" The {unfinished} unfinished were cancelled by detach." if unfinished else ""),
            highlight=False,
        )
        compiled = [e.compile_seconds for e in jobs if e.compile_seconds is not None]
        if compiled:
            con.print(
                f"Compile seconds per job: median {statistics.median(compiled):.2f}, "
                f"max {max(compiled):.2f}, total {sum(compiled):.1f} "
                "(in worker processes; serving never waited for one).",
                highlight=False,
            )
        if r.hot_to_swap:
            h = list(r.hot_to_swap.values())
            con.print(
                f"Hot to swap (a size's {_ordinal(self.policy.hot_calls)} call to its "
                "specialized "
                f"runnable going live): median {statistics.median(h):.1f} s, "
                f"min {min(h):.1f} s, max {max(h):.1f} s over {len(h)} sizes.",
                highlight=False,
            )

        # Latency.
        if r.median_ms:
            con.print(
                f"Latency: first call {r.first_call_s:.2f} s (dynamo's one-time capture); "
                f"after it, median {r.median_ms:.2f} ms. During warm-up (until the last swap, "
                f"{r.warmup_end_s:.1f} s) the slowest call took {r.warmup_max_ms:.1f} ms "
                f"(size {r.warmup_max_size} on {r.warmup_max_tier}) = "
                f"{r.warmup_max_ms / r.median_ms:.1f}x the median; against its own size's "
                f"median the worst call was {r.warmup_worst_vs_own_median:.1f}x "
                f"(size {r.warmup_worst_own_size}).",
                highlight=False,
            )

        # Per hot size: what happened to it, then how fast each tier runs it.
        entries = self._size_entries(status)
        order = sorted(entries, key=lambda s: (-r.sizes[s].calls if s in r.sizes else 0, s))
        if order:
            con.print(self._jobs_table(order[:SUMMARY_ROWS], entries, len(order)))
        if r.speed:
            con.print(self._speed_table())
            vs_eager = [row.eager_s / row.size_s for row in r.speed]
            vs_general = [
                row.general_s / row.size_s for row in r.speed if row.general_s is not None
            ]
            line = (
                f"Specialized vs eager: median {statistics.median(vs_eager):.2f}x over "
                f"{len(vs_eager)} sizes"
            )
            if vs_general:
                line += (
                    f"; vs general (dynamic shapes): median {statistics.median(vs_general):.2f}x"
                )
            con.print(line + ".", highlight=False)
        con.print(
            f"Result: {'OK' if r.exit_code == 0 else 'FAILED'} "
            f"({len(r.specialized_swaps)} specialized swaps, {mism} mismatches).",
            style="bold green" if r.exit_code == 0 else "bold red",
            highlight=False,
        )

    def _jobs_table(self, order: list[int], entries: dict[int, EntryStatus], total: int) -> Table:
        r = self.result
        table = Table(
            box=box.SIMPLE_HEAD,
            title="Hot sizes: every size that got a compile job",
            title_justify="left",
            title_style="bold",
        )
        table.add_column("size", justify="right")
        table.add_column("calls", justify="right")
        table.add_column("e/g/s calls", justify="right")
        table.add_column("served by")
        table.add_column("job")
        table.add_column("compile s", justify="right")
        table.add_column("hot→swap s", justify="right")
        for size in order:
            e = entries[size]
            rec = r.sizes.get(size, SizeRecord())
            by_tier = "/".join(str(rec.tiers.get(t, 0)) for t in ("eager", "general", "size"))
            tier = "size" if e.state == "live" else self._tier_end()
            table.add_row(
                str(size),
                f"{rec.calls:,}",
                by_tier,
                Text(tier, style=TIER_STYLE.get(tier, "")),
                Text(e.state, style=STATE_STYLE.get(e.state, "")),
                _fmt_s(e.compile_seconds, 2),
                _fmt_s(r.hot_to_swap.get(size)),
            )
        table.caption = "e/g/s: calls served on eager / general / the size's own runnable"
        if total > len(order):
            rest = [entries[s].state for s in entries if s not in set(order)]
            counts = ", ".join(f"{n} {state}" for state, n in sorted(Counter(rest).items()))
            table.caption += f"\n+ {total - len(order)} less called sizes with a job ({counts})"
        table.caption_justify = "left"
        return table

    def _speed_table(self) -> Table:
        table = Table(
            box=box.SIMPLE_HEAD,
            title="Speed per specialized size (same recorded input through each tier)",
            title_justify="left",
            title_style="bold",
        )
        table.add_column("size", justify="right")
        table.add_column("eager", justify="right")
        table.add_column("general", justify="right")
        table.add_column("specialized", justify="right")
        table.add_column("vs eager", justify="right")
        table.add_column("vs general", justify="right")
        for row in self.result.speed:
            table.add_row(
                str(row.size),
                _fmt_ms(row.eager_s),
                _fmt_ms(row.general_s) if row.general_s is not None else "-",
                _fmt_ms(row.size_s),
                f"{row.eager_s / row.size_s:.2f}x",
                f"{row.general_s / row.size_s:.2f}x" if row.general_s is not None else "-",
            )
        return table

    def _tier_end(self) -> str:
        # After detach the table is gone from the model; the status says what served.
        general = next((e for e in self.result.entries if e.target == "general"), None)
        return "general" if general is not None and general.state == "live" else "eager"


def run_demo(
    options: DemoOptions, console: Console | None = None, executor: Executor | None = None
) -> DemoResult:
    """Run the demo; prints the live view (or plain lines) and the summary to `console`.

    `executor` replaces the worker processes (`pwdaemon.testing.FakeExecutor` in tests).
    """
    return DemoRun(options, console or Console(), executor).run()


# ---- command line ----------------------------------------------------------------------


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def add_demo_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `demo` on the main parser's subparsers."""
    parser = subparsers.add_parser(
        "demo",
        help="serve a bundled small transformer under synthetic traffic, live",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help=f"how long to run the traffic (default {DEFAULT_DURATION_S:g}; "
        f"{QUICK_DURATION_S:g} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run (~{QUICK_DURATION_S:g} s)",
    )
    parser.add_argument("--seed", type=int, default=0, help="traffic and weights seed (default 0)")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="print progress lines instead of the live view (the default with no terminal)",
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        default=DemoOptions.rate,
        metavar="CALLS_PER_S",
        help=f"mean calls per second the traffic asks for (default {DemoOptions.rate:g})",
    )
    parser.add_argument(
        "--max-size",
        type=_positive_int,
        default=DemoOptions.prefill_max,
        metavar="N",
        help=f"largest (prefill) batch (default {DemoOptions.prefill_max}; decode sizes "
        f"stay within 1..{DemoOptions.decode_max})",
    )
    parser.add_argument(
        "--check-every",
        type=_positive_int,
        default=DemoOptions.check_every,
        metavar="N",
        help=f"compare every Nth call with an eager reference (default {DemoOptions.check_every})",
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=None,
        metavar="N",
        help="compile worker processes (default: pwdaemon's, a quarter of the CPUs)",
    )
    parser.add_argument(
        "--no-general",
        dest="general",
        action="store_false",
        help="skip the general (dynamic-shape) compile: the first hot size compiles sooner",
    )
    parser.add_argument(
        "--stop-after-swaps",
        type=_positive_int,
        default=0,
        metavar="N",
        help=f"end early, {STOP_GRACE_S:g} s after N specialized sizes went live "
        "(for CI: --duration becomes a limit)",
    )
    parser.add_argument(
        "--threads",
        type=_positive_int,
        default=None,
        metavar="N",
        help=f"serving's intra-op threads (default {default_threads()}: half the CPUs, "
        "the rest is left to the compile workers)",
    )
    store = parser.add_mutually_exclusive_group()
    store.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help="artifact store directory (default: pwdaemon's; a second run loads from it)",
    )
    store.add_argument(
        "--fresh",
        action="store_true",
        help="start from an empty store and Inductor cache (every compile for real)",
    )
    parser.set_defaults(func=cmd_demo)


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    duration = args.duration
    if duration is None:
        duration = QUICK_DURATION_S if args.quick else DEFAULT_DURATION_S
    decode_max = min(DemoOptions.decode_max, max(1, args.max_size - 1))
    return DemoOptions(
        duration=duration,
        seed=args.seed,
        plain=args.plain,
        rate=args.rate,
        decode_max=decode_max,
        prefill_max=max(args.max_size, decode_max + 1),
        phases=3 if duration <= QUICK_DURATION_S else 4,
        check_every=args.check_every,
        workers=args.workers,
        store=args.store,
        fresh=args.fresh,
        general=args.general,
        stop_after_swaps=args.stop_after_swaps,
        threads=args.threads,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """`pwdaemon demo`: returns 0 when every checked call matched the eager reference."""
    console = Console(file=sys.stdout)
    result = run_demo(options_from_args(args), console)
    return result.exit_code
