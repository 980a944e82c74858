"""The demo's plain view (no terminal, or `--plain`): a header line, a progress line
every few seconds and one line per swap, with no escape codes."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pwdaemon.demo.options import ATOL, RTOL
from pwdaemon.demo.style import fmt_ms
from pwdaemon.engine.events import HandleStatus
from pwdaemon.models import DEMO_CONFIG

if TYPE_CHECKING:
    from pwdaemon.demo.records import SwapRecord
    from pwdaemon.demo.run import DemoRun

__all__ = ("PLAIN_EVERY_S", "PlainView")

# A progress line this often: a log of a minute's run stays readable.
PLAIN_EVERY_S = 2.0


class PlainView:
    """Prints lines to the run's console; swaps as they land, progress every PLAIN_EVERY_S."""

    def __init__(self, run: DemoRun) -> None:
        self.run = run
        self._next_line = 0.0

    def _print(self, line: str) -> None:
        self.run.console.print(line, highlight=False, soft_wrap=True)

    def start(self) -> None:
        """Say what the run will do."""
        o = self.run.options
        cfg = DEMO_CONFIG
        self._print(
            f"pwdaemon demo: TinyTransformer ({cfg.layers} layers, d_model {cfg.d_model}, "
            f"vocab {cfg.vocab}, seq {cfg.seq}); {o.duration:g} s of traffic at ~{o.rate:g} "
            f"calls/s, sizes 1..{o.prefill_max}, seed {o.seed}; checking every "
            f"{o.check_every}th call against eager (atol {ATOL:g}, rtol {RTOL:g})"
        )

    def refresh(self, now: float, new_swaps: list[SwapRecord]) -> None:
        """A line per new swap, then a progress line if one is due."""
        for s in new_swaps:
            self._print(self.swap_line(s))
        if now >= self._next_line:
            self._next_line = now + PLAIN_EVERY_S
            self._print(self.progress_line(now, self.run.safe_status()))

    def stop(self, status: HandleStatus | None) -> None:
        """Nothing: the summary follows."""

    def progress_line(self, now: float, status: HandleStatus | None) -> str:
        """Calls, sizes, table version, queue, latency, tiers and live sizes so far."""
        run = self.run
        result = run.result
        p50, p99, _ = run.window_stats()
        queue = status.queue_depth if status else 0
        in_flight = status.in_flight if status else 0
        total = sum(result.calls_by_tier.values()) or 1
        tiers = " ".join(
            f"{t} {100.0 * n / total:.0f}%"
            for t, n in sorted(result.calls_by_tier.items(), key=lambda kv: kv[0])
        )
        live_sizes = sorted(s for s, e in run.size_entries(status).items() if e.state == "live")
        return (
            f"[{now:5.1f}s] calls {result.calls:>6}  sizes {len(run.sizes):>3}  "
            f"table v{run.table_version(status)}  queue {queue}  in flight {in_flight}  "
            f"p50 {fmt_ms(p50)}  p99 {fmt_ms(p99)}  tiers: {tiers}  "
            f"specialized: {','.join(map(str, live_sizes)) or '-'}  "
            f"mismatches {len(result.mismatches)}"
        )

    def swap_line(self, s: SwapRecord) -> str:
        """What went live, in which table version, how long it took."""
        e = s.event
        label = "general (dynamic)" if e.range is None else f"{e.tier.value} {e.range}"
        h2s = self.run.result.hot_to_swap.get(e.size) if e.size is not None else None
        extra = "" if h2s is None else f", hot->swap {h2s:.1f} s"
        check = ", validated" if e.validated else ""
        return (
            f"[{s.at:5.1f}s] swap: {label} live in table v{e.version}, compiled in "
            f"{e.compile_seconds:.2f} s ({e.source}){extra}{check}"
        )
