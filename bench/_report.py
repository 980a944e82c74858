"""Figures of `bench/peers.py`: per-system metrics from the runs' JSON, the markdown table,
the verdict on the targets, and the latency plots (skipped when matplotlib is missing).

Definitions (also printed under the table):

- *time to first response* (TTFR): from `t0` (the system's serving code starts, after
  `import torch` and the model is built) to the end of the first request; includes
  `upfront`'s compiles and pwdaemon's `attach`.
- *warm-up*: the first `warmup_calls` requests of the trace (default: the first third).
  `warm-up max / p99` are over those requests' latencies. `worst ÷ general` is the worst
  over warm-up requests of latency / the general tier's steady-state median for that size
  (the `dynamic` run's baseline, i.e. torch.compile with a dynamic size; a run's own
  baseline when `dynamic` was not run); `after 1st` leaves out the first request (for
  pwdaemon, the one on which dynamo traces the model).
- *baseline*: a system's steady-state median latency for a size, measured after the trace
  and after settling (3 calls per size; for pwdaemon, sizes the trace left cold get only
  as many calls as keep them under the policy's `hot_calls`, often one).
- *compile wait*: the sum over all requests of max(0, latency - baseline[size]): time
  requests spent beyond steady state (waiting on a compile, or on a slower tier). Eager's
  figure is the noise floor.
- *specialized at*: pwdaemon: seconds from t0 until every hot size was served by its own
  (size) runnable (swap events); static: end of the first call of the last hot size;
  upfront: end of set-up.
- *throughput x static*: steady-state calls/s of each hot size (median of rounds of
  back-to-back calls), divided by the `static` run's. Rounds alternate with rounds of an
  eager copy of the model in the same process; `norm` divides each run's calls/s by its
  own eager calls/s first, which cancels load that differed between the two processes.
  `A/B` (pwdaemon runs, not with --quick): in the pwdaemon process, after everything else,
  `torch.compile(dynamic=False)` of the same weights, timed in alternating rounds with the
  attached model on each hot size: the median over adjacent pairs of rounds of static's
  seconds per call / pwdaemon's. On this shared 2-core machine it still moved by about
  +-5 % between runs.
- *dynamo graphs*: frames dynamo compiled in the process; 0 for pwdaemon-warm when it
  loaded the trace pwdaemon-cold saved (`pwdaemon.serving.saved_trace`).
- *compile CPU*: the process's own CPU during calls where dynamo compiled a frame (and
  upfront's set-up), plus all descendant processes' CPU (compile workers and the C++
  compiler), taken once the system settled.
- *busy ÷ idle*: calls/s of the probe size in probe windows while descendant processes
  burnt >= 0.3 CPU (a compile running), over calls/s in the idle windows after settling.
  pwdaemon also reports the same ratio restricted to windows served by the tier the idle
  windows used, and `vs warm run`: its busy windows on a specialized tier over the warm
  run's windows on a specialized tier with no compile running (same trace, same tier,
  taken during the trace rather than minutes later). Systems that compile on the serving
  thread serve nothing while they compile: 0 by construction.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BUSY_CPU = 0.3
"""Descendant CPU (cores) above which a probe window counts as 'compiles running'."""

SPECIALIZED_TIERS = ("size", "range", "graph")
IN_PROCESS = ("dynamic", "static", "upfront")


def _median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


@dataclass
class Metrics:
    """What the table shows for one (model, system) run."""

    model: str
    system: str
    error: str | None = None
    ttfr_s: float = math.nan
    setup_s: float = math.nan
    warmup_max_ms: float = math.nan
    warmup_p99_ms: float = math.nan
    warmup_worst_ratio: float = math.nan
    warmup_worst_size: int | None = None
    warmup_worst_ratio_rest: float = math.nan  # the same without the first request
    compile_wait_s: float = math.nan
    compile_requests: int = 0
    specialized_s: float = math.nan
    first_specialized_s: float = math.nan
    throughput: dict[int, float] = field(default_factory=dict)  # calls/s per hot size
    throughput_ratio: dict[int, float] = field(default_factory=dict)
    eager_throughput: dict[int, float] = field(default_factory=dict)
    throughput_ratio_norm: dict[int, float] = field(default_factory=dict)
    ab_ratio: dict[int, float] = field(default_factory=dict)  # in-process A/B vs static
    throughput_tier: dict[int, str] = field(default_factory=dict)
    compile_cpu_s: float = math.nan
    busy_idle: float = math.nan
    busy_idle_same_tier: float = math.nan
    busy_note: str = ""
    busy_vs_warm: float = math.nan  # cold's busy windows / the warm run's quiet ones
    trace_wall_s: float = math.nan
    graphs: int = 0
    tiers: dict[str, int] = field(default_factory=dict)
    check_max_abs: float = math.nan
    settle_complete: bool = True
    notes: list[str] = field(default_factory=list)


def compute(
    results: dict[str, dict[str, Any]], hot: Sequence[int], warmup_calls: int
) -> dict[str, Metrics]:
    """Metrics for every system of one model; `results` maps system -> its JSON."""
    # Imported here, like `_trace`'s traffic: importing pwdaemon loads torch, which
    # `peers.py --help` and the argument checks should not wait for.
    from pwdaemon.metrics.stats import percentile

    general_ref = results.get("dynamic", {}).get("baseline") if "dynamic" in results else None
    out: dict[str, Metrics] = {}
    for system, r in results.items():
        m = Metrics(model=r.get("model", "?"), system=system, error=r.get("error"))
        out[system] = m
        if not r.get("requests"):
            continue
        reqs = r["requests"]
        base = {int(k): v for k, v in r.get("baseline", {}).items()}
        ref = {int(k): v for k, v in (general_ref or r.get("baseline", {})).items()}
        m.ttfr_s = r.get("ttfr_s", math.nan)
        m.setup_s = r.get("setup_s", math.nan)
        warm = reqs[:warmup_calls]
        lat = [q["lat"] for q in warm]
        m.warmup_max_ms = max(lat) * 1e3
        m.warmup_p99_ms = percentile(lat, 99, empty=math.nan) * 1e3
        ratios = [(q["lat"] / ref[q["size"]], q["size"]) for q in warm if ref.get(q["size"])]
        if ratios:
            m.warmup_worst_ratio, m.warmup_worst_size = max(ratios)
        rest = [q["lat"] / ref[q["size"]] for q in warm[1:] if ref.get(q["size"])]
        if rest:
            m.warmup_worst_ratio_rest = max(rest)
        m.compile_wait_s = sum(max(0.0, q["lat"] - base.get(q["size"], q["lat"])) for q in reqs)
        m.compile_requests = sum(q["tier"] in ("compile", "trace") for q in reqs)
        m.tiers = dict(Counter(q["tier"] for q in reqs))
        m.trace_wall_s = r.get("trace_wall_s", math.nan)
        m.graphs = int(r.get("dynamo_frames", 0))
        cpu = r.get("compile_cpu_settled") or {}
        m.compile_cpu_s = float(cpu.get("self_s", 0.0)) + float(cpu.get("descendants_s", 0.0))
        m.settle_complete = bool(r.get("settle", {}).get("complete", True))
        checks = r.get("check_max_abs") or {}
        if checks:
            m.check_max_abs = max(checks.values())
        m.notes = list(r.get("notes", []))
        for size in hot:
            t = (r.get("throughput") or {}).get(str(size))
            if t is not None:
                m.throughput[size] = t["calls_per_s"]
                if t.get("eager_calls_per_s"):
                    m.eager_throughput[size] = t["eager_calls_per_s"]
                m.throughput_tier[size] = t["tier"]
        for size, ab in (r.get("ab_static") or {}).items():
            m.ab_ratio[int(size)] = ab["ratio"]
        _specialized(m, r, reqs, hot)
        _busy(m, r)
    cold, warm = results.get("pwdaemon-cold"), results.get("pwdaemon-warm")
    if cold and warm and cold.get("probes") and warm.get("probes"):
        # The warm run serves the same trace on the same tier with no compile running: its
        # windows are an idle reference taken at the same point of the trace, which the
        # cold run's own idle windows (after settling, minutes later) are not.
        busy = [
            p["calls_per_s"]
            for p in cold["probes"]
            if p["phase"] == "trace" and p["busy"] >= BUSY_CPU and p["tier"] in SPECIALIZED_TIERS
        ]
        quiet = [
            p["calls_per_s"]
            for p in warm["probes"]
            if p["busy"] < BUSY_CPU and p["tier"] in SPECIALIZED_TIERS
        ]
        if busy and quiet:
            out["pwdaemon-cold"].busy_vs_warm = _median(busy) / _median(quiet)
    static = out.get("static")
    if static is not None:
        for m in out.values():
            for size, cps in m.throughput.items():
                ref_cps = static.throughput.get(size)
                if ref_cps:
                    m.throughput_ratio[size] = cps / ref_cps
                mine, theirs = m.eager_throughput.get(size), static.eager_throughput.get(size)
                if ref_cps and mine and theirs:
                    m.throughput_ratio_norm[size] = (cps / mine) / (ref_cps / theirs)
    return out


def _specialized(
    m: Metrics, r: dict[str, Any], reqs: list[dict[str, Any]], hot: Sequence[int]
) -> None:
    if m.system.startswith("pwdaemon"):
        first: dict[int, float] = {}
        for s in r.get("swaps", []):
            if s["tier"] in SPECIALIZED_TIERS and s["size"] is not None:
                first.setdefault(int(s["size"]), s["at"])
        if first:
            m.first_specialized_s = min(first.values())
        if all(h in first for h in hot):
            m.specialized_s = max(first[h] for h in hot)
    elif m.system == "static":
        ends = {}
        for q in reqs:
            if q["size"] in hot and q["size"] not in ends:
                ends[q["size"]] = q["at"] + q["lat"]
        if all(h in ends for h in hot):
            m.specialized_s = max(ends.values())
    elif m.system == "upfront":
        m.specialized_s = m.setup_s


def _busy(m: Metrics, r: dict[str, Any]) -> None:
    probes = r.get("probes", [])
    idle = [p for p in probes if p["phase"] == "idle"]
    busy = [p for p in probes if p["phase"] == "trace" and p["busy"] >= BUSY_CPU]
    if m.system in IN_PROCESS:
        m.busy_idle = 0.0
        m.busy_note = "compiles block serving"
        return
    if m.system == "eager" or not idle:
        return
    idle_cps = _median([p["calls_per_s"] for p in idle])
    if not busy:
        m.busy_note = "no probe window saw a compile"
        return
    m.busy_idle = _median([p["calls_per_s"] for p in busy]) / idle_cps
    tier = Counter(p["tier"] for p in idle).most_common(1)[0][0]
    same = [p["calls_per_s"] for p in busy if p["tier"] == tier]
    if same:
        m.busy_idle_same_tier = _median(same) / idle_cps
    m.busy_note = f"{len(busy)} busy windows; same tier ({tier}): {len(same)}"


# ---- the table -------------------------------------------------------------------------


def _f(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def table_columns(hot: Sequence[int]) -> list[str]:
    return [
        "model",
        "system",
        "TTFR s",
        "warm-up max ms",
        "warm-up p99 ms",
        "worst ÷ general",
        "worst ÷ general after 1st",
        "compile wait s",
        "specialized at s",
        *[f"thr {h} x static" for h in hot],
        "compile CPU s",
        "busy ÷ idle",
        "trace wall s",
        "dynamo graphs",
        "calls by tier",
    ]


def table_rows(metrics: Sequence[Metrics], hot: Sequence[int]) -> list[list[str]]:
    rows = []
    for m in metrics:
        if m.error and math.isnan(m.ttfr_s):
            rows.append(
                [
                    m.model,
                    m.system,
                    *(["-"] * (len(table_columns(hot)) - 3)),
                    f"ERROR: {m.error[:80]}",
                ]
            )
            continue
        busy = _f(m.busy_idle)
        if not math.isnan(m.busy_idle_same_tier):
            busy += f" ({_f(m.busy_idle_same_tier)} same tier)"
        if not math.isnan(m.busy_vs_warm):
            busy += f"; {_f(m.busy_vs_warm)} vs warm run"
        tiers = ", ".join(f"{k} {v}" for k, v in sorted(m.tiers.items(), key=lambda kv: -kv[1]))
        rows.append(
            [
                m.model,
                m.system,
                _f(m.ttfr_s, 3),
                _f(m.warmup_max_ms, 1),
                _f(m.warmup_p99_ms, 1),
                _f(m.warmup_worst_ratio, 1),
                _f(m.warmup_worst_ratio_rest, 1),
                _f(m.compile_wait_s, 2),
                _f(m.specialized_s, 1),
                *[_f(m.throughput_ratio.get(h, math.nan), 2) for h in hot],
                _f(m.compile_cpu_s, 1),
                busy,
                _f(m.trace_wall_s, 1),
                str(m.graphs),
                tiers + ("" if m.settle_complete else "; settle timed out"),
            ]
        )
    return rows


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_table(metrics: Sequence[Metrics], hot: Sequence[int]) -> str:
    columns = ["model", "system"]
    for h in hot:
        columns += [
            f"size {h} calls/s (tier)",
            f"size {h} eager calls/s",
            f"size {h} x static",
            f"size {h} x static norm",
            f"size {h} A/B x static",
        ]
    rows = []
    for m in metrics:
        if not m.throughput:
            continue
        row = [m.model, m.system]
        for h in hot:
            if h not in m.throughput:
                row += ["-"] * 5
                continue
            row += [
                f"{m.throughput[h]:.0f} ({m.throughput_tier.get(h, '?')})",
                _f(m.eager_throughput.get(h, math.nan), 0),
                _f(m.throughput_ratio.get(h, math.nan), 2),
                _f(m.throughput_ratio_norm.get(h, math.nan), 2),
                _f(m.ab_ratio.get(h, math.nan), 3),
            ]
        rows.append(row)
    return markdown_table(columns, rows)


def specialize_table(results: dict[str, dict[str, Any]], model: str) -> str | None:
    """pwdaemon: per size, when it was first requested and when it went specialized."""
    runs = [s for s in ("pwdaemon-cold", "pwdaemon-warm") if results.get(s, {}).get("requests")]
    if not runs:
        return None
    calls: Counter[int] = Counter()
    first_seen: dict[str, dict[int, float]] = {}
    swapped: dict[str, dict[int, tuple[float, str]]] = {}
    for system in runs:
        r = results[system]
        seen: dict[int, float] = {}
        for q in r["requests"]:
            seen.setdefault(q["size"], q["at"])
            if system == runs[0]:
                calls[q["size"]] += 1
        first_seen[system] = seen
        swapped[system] = {}
        for sw in r.get("swaps", []):
            if sw["tier"] in SPECIALIZED_TIERS and sw["size"] is not None:
                swapped[system].setdefault(int(sw["size"]), (sw["at"], sw["source"]))
    columns = ["model", "size", "trace calls"]
    for system in runs:
        columns += [f"{system}: first request s", f"{system}: specialized at s (source)"]
    rows = []
    for size in sorted(calls, key=lambda n: (-calls[n], n)):
        row = [model, str(size), str(calls[size])]
        for system in runs:
            row.append(_f(first_seen[system].get(size, math.nan), 2))
            sw = swapped[system].get(size)
            row.append("-" if sw is None else f"{sw[0]:.2f} ({sw[1]})")
        rows.append(row)
    general = []
    for system in runs:
        gen = next((sw for sw in results[system].get("swaps", []) if sw["tier"] == "general"), None)
        if gen is not None:
            general.append(f"{system}: general live at {gen['at']:.2f} s ({gen['source']})")
    text = markdown_table(columns, rows)
    return text + ("\n\n" + "; ".join(general) if general else "")


# ---- targets ---------------------------------------------------------------------------


def verdicts(by_system: dict[str, Metrics], hot: Sequence[int]) -> list[str]:
    """The issue's targets, each met or missed, with the numbers it rests on."""
    lines: list[str] = []

    def say(ok: bool | None, text: str) -> None:
        mark = "n/a" if ok is None else ("met" if ok else "MISSED")
        lines.append(f"- {mark}: {text}")

    cold, warm, eager = (by_system.get(k) for k in ("pwdaemon-cold", "pwdaemon-warm", "eager"))
    if cold is not None and eager is not None and not math.isnan(cold.ttfr_s):
        ratio = cold.ttfr_s / eager.ttfr_s if eager.ttfr_s > 0 else math.inf
        say(
            ratio <= 1.5,
            f"pwdaemon-cold time to first response {cold.ttfr_s:.3f} s = "
            f"{ratio:.1f}x eager's {eager.ttfr_s:.3f} s (target <= 1.5x)",
        )
    else:
        say(None, "TTFR vs eager: needs pwdaemon-cold and eager")
    for m in (cold, warm):
        if m is None or math.isnan(m.warmup_worst_ratio):
            continue
        say(
            m.warmup_worst_ratio <= 2.0,
            f"{m.system}: no request waits on a compiler: worst warm-up latency "
            f"{m.warmup_worst_ratio:.1f}x the general tier's median for its size "
            f"(size {m.warmup_worst_size}; max {m.warmup_max_ms:.1f} ms; without the first "
            f"request, which dynamo traces: {m.warmup_worst_ratio_rest:.1f}x) "
            f"(target <= 2x)",
        )
    for m in (cold, warm):
        if m is None or not m.throughput_ratio:
            if m is not None:
                say(None, f"{m.system}: throughput vs static needs the static run")
            continue
        worst = min(m.throughput_ratio.values())
        norm = m.throughput_ratio_norm
        worst_norm = min(norm.values()) if norm else worst
        per = ", ".join(
            f"{h}: {m.throughput_ratio[h]:.2f}x" + (f" (norm {norm[h]:.2f}x)" if h in norm else "")
            for h in hot
            if h in m.throughput_ratio
        )
        if m.ab_ratio:
            ab = ", ".join(f"{h}: {m.ab_ratio[h]:.3f}x" for h in hot if h in m.ab_ratio)
            say(
                min(m.ab_ratio.values()) >= 0.97,
                f"{m.system}: steady-state throughput vs static per hot size, A/B in one "
                f"process ({ab}); across processes, raw (eager-normalized): {per} "
                "(target >= 0.97x; judged on the A/B)",
            )
            continue
        say(
            min(worst, worst_norm) >= 0.97,
            f"{m.system}: steady-state throughput vs static "
            f"per hot size, raw and eager-normalized ({per}) (target >= 0.97x; met only if "
            "both are)",
        )
    if warm is not None:
        ok = None if math.isnan(warm.specialized_s) else warm.specialized_s <= 2.0
        say(
            ok,
            f"pwdaemon-warm: every hot size specialized {_f(warm.specialized_s, 2)} s "
            f"after start (first at {_f(warm.first_specialized_s, 2)} s) (target <= 2 s)",
        )
    return lines


# ---- plots -----------------------------------------------------------------------------

COLORS = {
    "eager": "#7f7f7f",
    "dynamic": "#1f77b4",
    "static": "#d62728",
    "async": "#9467bd",
    "upfront": "#8c564b",
    "pwdaemon-cold": "#2ca02c",
    "pwdaemon-warm": "#17becf",
}


def plot_latency(results: dict[str, dict[str, Any]], model: str, path: Path) -> str | None:
    """Latency of every request, one line per system; None if saved, else why not."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plots skipped (pip install matplotlib)"
    fig, (ax_i, ax_t) = plt.subplots(1, 2, figsize=(15, 5.5))
    for system, r in results.items():
        reqs = r.get("requests") or []
        if not reqs:
            continue
        color = COLORS.get(system)
        idx = [q["i"] for q in reqs]
        lat = [max(q["lat"], 1e-6) * 1e3 for q in reqs]
        at = [q["at"] + q["lat"] for q in reqs]
        pw = system.startswith("pwdaemon")
        ax_i.plot(
            idx,
            lat,
            lw=1.1 if pw else 0.6,
            alpha=0.95 if pw else 0.6,
            color=color,
            label=system,
            zorder=3 if pw else 2,
        )
        # Against wall time, points only: a line across a long compile would read as data.
        ax_t.plot(at, lat, ls="", marker=".", ms=2.5, alpha=0.7, color=color, label=system)
        if system.startswith("pwdaemon"):
            for s in r.get("swaps", []):
                if s["tier"] in SPECIALIZED_TIERS:
                    ax_t.axvline(s["at"], color=color, lw=0.4, alpha=0.35, ls=":")
    for ax in (ax_i, ax_t):
        ax.set_yscale("log")
        ax.set_ylabel("request latency (ms, log)")
        ax.grid(True, which="both", alpha=0.25)
    ax_i.set_xlabel("request index (same trace for every system)")
    ax_t.set_xlabel("seconds since the system's serving code started (t0)")
    ax_t.set_title("dotted: pwdaemon specialized swaps", fontsize=9)
    ax_i.legend(loc="upper right", fontsize=8)
    fig.suptitle(f"pwdaemon vs peers: latency of every request ({model})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None


TIER_COLORS = {
    "eager": "#7f7f7f",
    "trace": "#000000",
    "compile": "#d62728",
    "fallback": "#ff7f0e",
    "general": "#bcbd22",
    "compiled": "#1f77b4",
    "range": "#17becf",
    "size": "#2ca02c",
    "graph": "#9467bd",
}


def plot_panels(results: dict[str, dict[str, Any]], model: str, path: Path) -> str | None:
    """One panel per system: latency against time since t0, coloured by serving tier."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plots skipped"
    systems = [s for s, r in results.items() if r.get("requests")]
    if not systems:
        return "no requests to plot"
    fig, axes = plt.subplots(
        len(systems),
        1,
        figsize=(12, 1.9 * len(systems) + 0.6),
        sharex=True,
        sharey=True,
        squeeze=False,
    )
    for ax, system in zip(axes[:, 0], systems, strict=True):
        reqs = results[system]["requests"]
        for tier in sorted({q["tier"] for q in reqs}):
            pts = [
                (q["at"] + q["lat"], max(q["lat"], 1e-6) * 1e3) for q in reqs if q["tier"] == tier
            ]
            ax.plot(
                [a for a, _ in pts],
                [b for _, b in pts],
                ls="",
                marker=".",
                ms=3,
                color=TIER_COLORS.get(tier, "#333333"),
                label=f"{tier} ({len(pts)})",
            )
        for sw in results[system].get("swaps", []):
            ax.axvline(
                sw["at"], color=TIER_COLORS.get(sw["tier"], "#333333"), lw=0.5, alpha=0.5, ls=":"
            )
        ax.set_yscale("log")
        ax.set_ylabel("ms")
        ax.grid(True, which="major", alpha=0.25)
        ax.set_title(system, fontsize=9, loc="left")
        ax.legend(fontsize=7, loc="upper right", ncol=4, markerscale=2)
    axes[-1, 0].set_xlabel("seconds since t0 (dotted: pwdaemon swaps, coloured by tier)")
    fig.suptitle(f"request latency by serving tier ({model})", fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def plot_probes(results: dict[str, dict[str, Any]], model: str, path: Path) -> str | None:
    """Probe-window throughput over time (serving while compiles run vs idle)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: plots skipped"
    fig, ax = plt.subplots(figsize=(10, 4.5))
    for system, r in results.items():
        probes = r.get("probes") or []
        if not probes:
            continue
        color = COLORS.get(system)
        xs = [p["at"] for p in probes]
        ys = [p["calls_per_s"] for p in probes]
        ax.plot(xs, ys, lw=0.8, color=color, label=system, marker=".", ms=3)
        bx = [p["at"] for p in probes if p["busy"] >= BUSY_CPU]
        by = [p["calls_per_s"] for p in probes if p["busy"] >= BUSY_CPU]
        ax.scatter(bx, by, s=22, facecolors="none", edgecolors=color)
    ax.set_yscale("log")
    ax.set_xlabel("seconds since t0")
    ax.set_ylabel("calls/s of the probe size (log)")
    ax.set_title(f"probe windows ({model}); circled: compile processes busy", fontsize=10)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return None
