"""The demo's live view (rich, for a terminal): a header with the run's figures, every
size with the tier serving it and its job, and the recent swaps."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich import box
from rich.console import Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from pwdaemon.demo.options import LATENCY_WINDOW_S
from pwdaemon.demo.style import STATE_STYLE, TIER_STYLE, fmt_ms, fmt_s, titled_table
from pwdaemon.engine.events import EntryStatus, HandleStatus
from pwdaemon.models import DEMO_CONFIG

if TYPE_CHECKING:
    from pwdaemon.demo.records import SwapRecord
    from pwdaemon.demo.run import DemoRun

__all__ = ("LiveView",)

# Lines the header panel and the tables' titles take: the rest of the terminal's height
# goes to table rows.
_CHROME_LINES = 15


class LiveView:
    """Redraws the whole screen on each refresh; the last frame stays after the run."""

    def __init__(self, run: DemoRun) -> None:
        self.run = run
        self._live = Live(
            self.render(None),
            console=run.console,
            auto_refresh=False,
            transient=False,
            # Anything printed meanwhile (warnings, logs) goes above the view instead of
            # tearing it.
            redirect_stdout=True,
            redirect_stderr=True,
            vertical_overflow="crop",
        )

    def start(self) -> None:
        """Take over the terminal."""
        self._live.start()

    def refresh(self, now: float, new_swaps: list[SwapRecord]) -> None:
        """Redraw with a fresh status (new swaps are in the run's records already)."""
        self._live.update(self.render(self.run.safe_status()), refresh=True)

    def stop(self, status: HandleStatus | None) -> None:
        """Draw the final frame and give the terminal back."""
        self._live.update(self.render(status), refresh=True)
        self._live.stop()

    def render(self, status: HandleStatus | None) -> RenderableType:
        """The whole screen for `status`."""
        run = self.run
        rows_room = max(5, run.console.size.height - _CHROME_LINES)
        body = Table.grid(padding=(0, 4))
        body.add_column()
        body.add_column()
        body.add_row(self._sizes_table(status, rows_room), self._swaps_table(rows_room))
        return Group(self._header(status), body)

    def _header(self, status: HandleStatus | None) -> Panel:
        run = self.run
        opts, result = run.options, run.result
        now = run.now()
        elapsed = min(now, opts.duration)
        cfg = DEMO_CONFIG
        title = Text.assemble(
            ("pwdaemon demo", "bold"),
            "  TinyTransformer: ",
            f"{cfg.layers} layers, d_model {cfg.d_model}, vocab {cfg.vocab}, seq {cfg.seq}; "
            "the batch is the dynamic size",
        )
        bar_width = max(10, min(40, run.console.size.width - 60))
        filled = int(bar_width * elapsed / opts.duration) if opts.duration > 0 else bar_width
        progress = Text.assemble(
            ("elapsed ", "dim"),
            f"{elapsed:5.1f} s / {opts.duration:g} s  ",
            ("━" * filled, "green"),
            ("━" * (bar_width - filled), "grey23"),
            ("   traffic phase ", "dim"),
            f"{run.phase + 1}/{opts.phases}",
            ("   seed ", "dim"),
            str(opts.seed),
        )
        rate = result.calls / now if now > 0 else 0.0
        queue = status.queue_depth if status else 0
        in_flight = status.in_flight if status else 0
        pids = list(status.worker_pids) if status else []
        if pids:
            workers = f"{len(pids)} (pid {', '.join(map(str, pids))})"
        else:
            workers = "0 (starting)" if run.executor is None else "0 (in-process)"
        counts = Text.assemble(
            ("calls ", "dim"),
            f"{result.calls:,} ({rate:.0f}/s)",
            ("   sizes seen ", "dim"),
            str(len(run.sizes)),
            ("   table ", "dim"),
            (f"v{run.table_version(status)}", "bold"),
            ("   queue ", "dim"),
            (str(queue), "bold cyan" if queue else ""),
            ("   in flight ", "dim"),
            (str(in_flight), "bold yellow" if in_flight else ""),
            ("   workers ", "dim"),
            workers,
            ("   plan ", "dim"),
            "complete" if status and status.plan_complete else "running",
        )
        p50, p99, worst = run.window_stats()
        mism = len(result.mismatches)
        latency = Text.assemble(
            (f"latency (last {LATENCY_WINDOW_S:g} s): ", "dim"),
            ("p50 ", "dim"),
            (fmt_ms(p50), "bold"),
            ("  p99 ", "dim"),
            (fmt_ms(p99), "bold"),
            ("  max ", "dim"),
            fmt_ms(worst),
            ("   checked vs eager reference ", "dim"),
            f"{result.checked:,} calls, ",
            (f"{mism} mismatches", "bold red" if mism else "green"),
        )
        return Panel(
            Group(progress, counts, latency, self._tier_bar()),
            title=title,
            title_align="left",
            box=box.ROUNDED,
        )

    def _tier_bar(self) -> Text:
        by_tier = self.run.result.calls_by_tier
        total = sum(by_tier.values())
        parts: list[tuple[str, str] | str] = [("calls by tier ", "dim")]
        for tier in ("eager", "general", "range", "size", "graph"):
            n = by_tier.get(tier, 0)
            if n == 0 and tier in ("range", "graph"):
                continue
            share = 100.0 * n / total if total else 0.0
            parts.append((f"{tier} {share:4.1f}%", TIER_STYLE[tier]))
            parts.append("   ")
        return Text.assemble(*parts)

    def _state_text(self, entry: EntryStatus) -> Text:
        """An entry's state; a running compile shows for how long it has been running."""
        label = str(entry.state)
        if entry.state == "compiling":
            running = self.run.compiling_for(entry.target)
            if running is not None:
                label = f"compiling {running:.0f}s"
        elif entry.state == "queued" and entry.attempts:
            label = f"queued (retry {entry.attempts})"
        if entry.source not in (None, "compiled") and entry.state == "live":
            label += f" ({entry.source})"
        return Text(label, style=STATE_STYLE.get(entry.state, ""))

    def _sizes_table(self, status: HandleStatus | None, rows: int) -> RenderableType:
        run = self.run
        entries = run.size_entries(status)
        ordered = sorted(run.sizes.items(), key=lambda kv: (-kv[1].calls, kv[0]))
        shown = ordered[: max(1, rows - 1)]
        hidden = ordered[len(shown) :]
        table = titled_table(
            f"sizes, by calls (top {len(shown)} of {len(ordered)})",
            [
                ("size", "right"),
                ("calls", "right"),
                ("served by", "left"),
                ("compile s", "right"),
                ("state", "left"),
                ("hot→swap s", "right"),
            ],
            pad_edge=False,
        )
        general = run.general_entry(status)
        if general is not None:
            table.add_row(
                Text("general", style="yellow"),
                "",
                Text("(dynamic)", style="dim"),
                fmt_s(general.compile_seconds),
                self._state_text(general),
                "",
            )
        for size, rec in shown:
            entry = entries.get(size)
            tier = run.tier_now(size)
            state = run.size_state(size, entry)
            table.add_row(
                str(size),
                f"{rec.calls:,}",
                Text(tier, style=TIER_STYLE.get(tier, "")),
                fmt_s(entry.compile_seconds if entry else None),
                self._state_text(entry)
                if entry is not None
                else Text(state, style=STATE_STYLE.get(state, "")),
                fmt_s(run.result.hot_to_swap.get(size)),
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

    def _swaps_table(self, rows: int) -> RenderableType:
        result = self.run.result
        table = titled_table(
            f"recent swaps ({len(result.swaps)} in all)",
            [
                ("at", "right"),
                ("runnable", "left"),
                ("ver", "right"),
                ("compile", "right"),
                ("hot→swap", "right"),
                ("check", "left"),
            ],
            pad_edge=False,
        )
        recent = result.swaps[-max(1, rows) :]
        for s in reversed(recent):
            e = s.event
            label = "general" if e.range is None else f"{e.tier.value} {e.range}"
            h2s = result.hot_to_swap.get(e.size) if e.size is not None else None
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
