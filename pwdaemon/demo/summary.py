"""The end of a demo run: latency and speed figures, and the summary it prints.

Speed is measured after detach (the workers are gone, the machine is quiet) on inputs
the dispatcher recorded during the run, through each tier's runnable in turn.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from rich.table import Table
from rich.text import Text

from pwdaemon.demo.options import ATOL, RTOL
from pwdaemon.demo.records import DemoResult, SizeRecord, SpeedRow
from pwdaemon.demo.style import STATE_STYLE, TIER_STYLE, fmt_ms, fmt_s, ordinal, titled_table
from pwdaemon.engine.events import EntryStatus, HandleStatus
from pwdaemon.serving.range_table import RangeTable, Tier

if TYPE_CHECKING:
    from pwdaemon.demo.run import DemoRun

__all__ = ("SPEED_SIZES", "SUMMARY_ROWS", "latency_figures", "print_summary", "speed_rows")

SPEED_SIZES = 8  # the summary times this many of the hottest specialized sizes
SUMMARY_ROWS = 15  # hot sizes listed in the summary


def time_call(fn: Callable[..., Any], args: Sequence[Any], budget_s: float = 0.1) -> float:
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


def speed_rows(
    table: RangeTable,
    samples: Mapping[int, Sequence[Any]],
    entries: Mapping[int, EntryStatus],
    sizes: Mapping[int, SizeRecord],
) -> list[SpeedRow]:
    """Eager, general and specialized speed of the SPEED_SIZES most called sizes that
    have a specialized runnable and a recorded input, by size."""
    live = [s for s in entries if table.exact.get(s) is not None and s in samples]
    live.sort(key=lambda s: -sizes[s].calls if s in sizes else 0)
    rows = []
    for size in sorted(live[:SPEED_SIZES]):
        entry, sample = table.exact[size], samples[size]
        eager = time_call(table.eager.runnable, sample)
        general = time_call(table.general.runnable, sample) if table.general is not None else None
        rows.append(SpeedRow(size, eager, general, time_call(entry.runnable, sample)))
    return rows


def latency_figures(r: DemoResult, all_calls: Sequence[tuple[float, float, int, str]]) -> None:
    """Fill in the result's median and warm-up figures from every call's
    (at, seconds, size, tier)."""
    calls = all_calls[1:]  # the first call is dynamo's trace, reported apart
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
        for s, rec in r.sizes.items()
        if rec.calls >= 5
    }
    worst, worst_size = 0.0, 0
    for _, dt, size, _ in warm:
        m = own.get(size)
        if m and dt / m > worst:
            worst, worst_size = dt / m, size
    r.warmup_worst_vs_own_median, r.warmup_worst_own_size = worst, worst_size


def print_summary(run: DemoRun, status: HandleStatus | None) -> None:
    """Print the summary of a finished run to its console."""
    r, o, con = run.result, run.options, run.console
    con.print()
    con.rule("[bold]pwdaemon demo: summary", align="left")
    total = sum(r.calls_by_tier.values()) or 1
    pieces = (
        "dynamo traced 1 graph, used for every size (no retrace)"
        if r.graph_pieces == 1
        else f"dynamo traced {r.graph_pieces} graph pieces"
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
    _print_compiles(run)
    if r.median_ms:
        con.print(
            f"Latency: first call {r.first_call_s:.2f} s (dynamo's one-time trace); "
            f"after it, median {r.median_ms:.2f} ms. During warm-up (until the last swap, "
            f"{r.warmup_end_s:.1f} s) the slowest call took {r.warmup_max_ms:.1f} ms "
            f"(size {r.warmup_max_size} on {r.warmup_max_tier}) = "
            f"{r.warmup_max_ms / r.median_ms:.1f}x the median; against its own size's "
            f"median the worst call was {r.warmup_worst_vs_own_median:.1f}x "
            f"(size {r.warmup_worst_own_size}).",
            highlight=False,
        )

    # Per hot size: what happened to it, then how fast each tier runs it.
    entries = run.size_entries(status)
    order = sorted(entries, key=lambda s: (-r.sizes[s].calls if s in r.sizes else 0, s))
    if order:
        con.print(_jobs_table(r, order[:SUMMARY_ROWS], entries, len(order)))
    if r.speed:
        con.print(_speed_table(r))
        vs_eager = [row.eager_s / row.size_s for row in r.speed]
        vs_general = [row.general_s / row.size_s for row in r.speed if row.general_s is not None]
        line = (
            f"Specialized vs eager: median {statistics.median(vs_eager):.2f}x over "
            f"{len(vs_eager)} sizes"
        )
        if vs_general:
            line += f"; vs general (dynamic shapes): median {statistics.median(vs_general):.2f}x"
        con.print(line + ".", highlight=False)
    con.print(
        f"Result: {'OK' if r.exit_code == 0 else 'FAILED'} "
        f"({len(r.specialized_swaps)} specialized swaps, {mism} mismatches).",
        style="bold green" if r.exit_code == 0 else "bold red",
        highlight=False,
    )


def _print_compiles(run: DemoRun) -> None:
    r, con = run.result, run.console
    jobs = [e for e in r.entries if e.target != "eager"]
    states = Counter(str(e.state) for e in jobs)
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
            f"Hot to swap (a size's {ordinal(run.policy.hot_calls)} call to its specialized "
            f"runnable going live): median {statistics.median(h):.1f} s, "
            f"min {min(h):.1f} s, max {max(h):.1f} s over {len(h)} sizes.",
            highlight=False,
        )


def _jobs_table(
    r: DemoResult, order: list[int], entries: Mapping[int, EntryStatus], total: int
) -> Table:
    table = titled_table(
        "Hot sizes: every size that got a compile job",
        [
            ("size", "right"),
            ("calls", "right"),
            ("e/g/s calls", "right"),
            ("served by", "left"),
            ("job", "left"),
            ("compile s", "right"),
            ("hot→swap s", "right"),
        ],
    )
    # After detach the table is gone from the model; the status says what served.
    general = next((e for e in r.entries if e.target == "general"), None)
    tier_end = "general" if general is not None and general.state == "live" else "eager"
    for size in order:
        e = entries[size]
        rec = r.sizes.get(size, SizeRecord())
        by_tier = "/".join(str(rec.tiers.get(t, 0)) for t in ("eager", "general", "size"))
        tier = "size" if e.state == "live" else tier_end
        table.add_row(
            str(size),
            f"{rec.calls:,}",
            by_tier,
            Text(tier, style=TIER_STYLE.get(tier, "")),
            Text(str(e.state), style=STATE_STYLE.get(e.state, "")),
            fmt_s(e.compile_seconds, 2),
            fmt_s(r.hot_to_swap.get(size)),
        )
    table.caption = "e/g/s: calls served on eager / general / the size's own runnable"
    if total > len(order):
        shown = set(order)
        rest = [str(entries[s].state) for s in entries if s not in shown]
        counts = ", ".join(f"{n} {state}" for state, n in sorted(Counter(rest).items()))
        table.caption += f"\n+ {total - len(order)} less called sizes with a job ({counts})"
    table.caption_justify = "left"
    return table


def _speed_table(r: DemoResult) -> Table:
    table = titled_table(
        "Speed per specialized size (same recorded input through each tier)",
        [
            ("size", "right"),
            ("eager", "right"),
            ("general", "right"),
            ("specialized", "right"),
            ("vs eager", "right"),
            ("vs general", "right"),
        ],
    )
    for row in r.speed:
        table.add_row(
            str(row.size),
            fmt_ms(row.eager_s),
            fmt_ms(row.general_s) if row.general_s is not None else "-",
            fmt_ms(row.size_s),
            f"{row.eager_s / row.size_s:.2f}x",
            f"{row.general_s / row.size_s:.2f}x" if row.general_s is not None else "-",
        )
    return table
