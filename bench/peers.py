"""pwdaemon against its peers on one seeded trace: one command, a table and plots.

    .venv/bin/python bench/peers.py                 # full CPU run (~15 min on 2 cores)
    .venv/bin/python bench/peers.py --quick         # CI smoke run (< 2 min): proves it runs
    .venv/bin/python bench/peers.py --device cuda --dtype bfloat16 --models demo,larger

Systems (each in its own fresh process, `bench/_systems.py`, on the same trace):
eager; torch.compile with the size marked dynamic; torch.compile static, compiling each
new size on the request that brings it; the same with Inductor's
`TORCHINDUCTOR_FX_COMPILE_MODE=async+SUBPROCESS`; static with every size of the trace
compiled before serving; pwdaemon with a fresh store; pwdaemon again on the store the
cold run left. The trace (`bench/_trace.py`) is decode-like sizes 1-256 (heavy tail),
prefill bursts up to 2048 and popular sizes that shift, at Poisson arrival times.

Writes `OUT/peers.md` (the table, the targets, definitions), `OUT/latency_<model>.png`
(every request's latency, one line per system, log y), `OUT/latency_panels_<model>.png`
(one panel per system, coloured by serving tier), `OUT/probes_<model>.png`
(throughput while compiles run), `OUT/peers-<model>.json` (every run's raw results) and
per-run specs and logs under `OUT/runs/`. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
if str(REPO) not in sys.path:
    sys.path.append(str(REPO))  # pwdaemon from this checkout when it is not installed

import _report  # noqa: E402
from _system_kinds import IN_PROCESS_COMPILERS, SYSTEMS  # noqa: E402
from _trace import FULL, QUICK, TraceCall, TraceSpec, build_trace, hot_sizes  # noqa: E402

QUICK_SYSTEMS = ("eager", "dynamic", "pwdaemon-cold", "pwdaemon-warm")
MODELS = ("demo", "larger")


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="systems: " + "; ".join(f"{k}: {v}" for k, v in SYSTEMS.items()),
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="small trace, demo model, systems "
        + ",".join(QUICK_SYSTEMS)
        + " (pass --systems all for every one); shared Inductor cache",
    )
    p.add_argument("--out", default=str(HERE / "results"), help="results directory")
    p.add_argument(
        "--systems",
        default=None,
        help="comma list or 'all' (default: all; --quick: " + ",".join(QUICK_SYSTEMS) + ")",
    )
    p.add_argument("--models", default="demo", help="comma list of demo,larger (or 'all')")
    p.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--seed", type=int, default=0, help="trace and weights seed")
    p.add_argument("--calls", type=int, default=None, help="requests in the trace")
    p.add_argument("--rate", type=float, default=None, help="mean arrivals per second")
    p.add_argument(
        "--tail-alpha",
        type=float,
        default=None,
        help="decode tail exponent (smaller: more distinct sizes)",
    )
    p.add_argument(
        "--hot-sizes",
        default=None,
        help="sizes for the steady-state throughput (default: the trace's 3 most frequent)",
    )
    p.add_argument(
        "--warmup-calls",
        type=int,
        default=None,
        help="requests that make up warm-up (default: the first third)",
    )
    p.add_argument(
        "--settle-timeout",
        type=float,
        default=None,
        help="seconds to wait after the trace for background compiles (default 240; --quick 5)",
    )
    p.add_argument(
        "--run-timeout",
        type=float,
        default=None,
        help="seconds before one system's process is killed (default 1500; --quick 150)",
    )
    p.add_argument(
        "--dynamic-mark",
        choices=("backed", "unbacked"),
        default="backed",
        help="how the dynamic peer marks the size: torch._dynamo.mark_dynamic "
        "(backed, default) or mark_unbacked",
    )
    p.add_argument(
        "--inductor-cache",
        choices=("fresh", "shared"),
        default=None,
        help="fresh: every torch.compile peer gets an empty Inductor cache "
        "(default); shared: the user's default cache (--quick's default)",
    )
    p.add_argument(
        "--async-fx-graph-cache",
        action="store_true",
        help="leave the FX graph cache on for the async peer (on torch 2.13 "
        "that makes its first compile raise; off by default)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in every system's process (default on CPU: "
        "the CPUs less pwdaemon's default worker count, at least 1; on CUDA: "
        "torch's default); see bench/README.md",
    )
    p.add_argument(
        "--omp-wait-policy",
        default="keep",
        help="OMP_WAIT_POLICY (ACTIVE or PASSIVE) for every system's process "
        "(default: keep the environment's)",
    )
    p.add_argument(
        "--trace",
        choices=("inline", "background"),
        default=None,
        help="pwdaemon attach(trace=...): dynamo traces the model on the first request "
        "(inline) or on another thread while the plain module serves (background); "
        "default: attach's own",
    )
    p.add_argument("--workers", type=int, default=None, help="pwdaemon compile workers")
    p.add_argument("--hot-calls", type=int, default=None, help="pwdaemon PolicyConfig.hot_calls")
    p.add_argument(
        "--ab",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="in each pwdaemon process, also time torch.compile(dynamic=False) of "
        "the same weights against it in alternating rounds (default: on; off "
        "with --quick)",
    )
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument(
        "--report-only",
        action="store_true",
        help="run nothing: rebuild peers.md and the plots from OUT's JSON",
    )
    args = p.parse_args(argv)
    systems = _csv(args.systems) if args.systems else list(QUICK_SYSTEMS if args.quick else SYSTEMS)
    if systems == ["all"]:
        systems = list(SYSTEMS)
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        p.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    args.systems = [s for s in SYSTEMS if s in systems]  # run order: cold before warm
    models = _csv(args.models)
    if models == ["all"]:
        models = list(MODELS)
    bad = [m for m in models if m not in MODELS]
    if bad:
        p.error(f"unknown models {bad}; choose from {', '.join(MODELS)}")
    args.models = models
    if args.inductor_cache is None:
        args.inductor_cache = "shared" if args.quick else "fresh"
    if args.ab is None:
        args.ab = not args.quick
    if args.threads is None and args.device == "cpu":
        # Serving threads + compile workers <= CPUs. Inductor's CPU kernels open an
        # OpenMP region per kernel; when a compile process holds one of the threads'
        # cores, every region waits for a descheduled thread: on 2 vCPUs, compiled calls
        # of the demo model went from ~1 ms to 100-300 ms with 2 threads, not with 1.
        cpus = os.cpu_count() or 2
        args.threads = max(1, cpus - max(1, cpus // 4))
    return args


def _child_env(args: argparse.Namespace, system: str, cache: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("TORCHINDUCTOR_FX_COMPILE_MODE", None)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(REPO), *([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])]
    )
    if args.inductor_cache == "fresh":
        # Each peer compiles from scratch (no FX graph / kernel cache left by another).
        env["TORCHINDUCTOR_CACHE_DIR"] = str(cache / "inductor")
        env.pop("TRITON_CACHE_DIR", None)  # Inductor then keeps Triton's under its own
    if args.omp_wait_policy != "keep":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if system.startswith("pwdaemon"):
        # pwdaemon points the Inductor cache into its store itself; nothing of ours.
        env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    if system == "async":
        env["TORCHINDUCTOR_FX_COMPILE_MODE"] = "async+SUBPROCESS"
        if not args.async_fx_graph_cache:
            env["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"
    return env


def run_system(args: argparse.Namespace, spec: dict[str, Any], out: Path) -> dict[str, Any]:
    """One system in a fresh process; its JSON result (with `error` set on failure)."""
    name = f"{spec['model']}-{spec['system']}"
    runs = out / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    spec_path, result_path, log_path = (
        runs / f"{name}{ext}" for ext in (".spec.json", ".json", ".log")
    )
    result_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec))
    cache = out / "tmp" / name
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(parents=True)
    cmd = [
        sys.executable,
        str(HERE / "_systems.py"),
        "--spec",
        str(spec_path),
        "--result",
        str(result_path),
    ]
    timeout = spec["run_timeout_s"]
    started = time.monotonic()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env=_child_env(args, spec["system"], cache),
            start_new_session=True,
        )
        try:
            code = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # its session: our child and its workers
            proc.wait()
            code = None
    shutil.rmtree(cache, ignore_errors=True)
    wall = time.monotonic() - started
    result: dict[str, Any]
    if result_path.exists():
        result = json.loads(result_path.read_text())
    else:
        why = f"killed after {timeout:.0f} s" if code is None else f"exit code {code}"
        tail = log_path.read_text(errors="replace")[-600:] if log_path.exists() else ""
        result = {
            "system": spec["system"],
            "model": spec["model"],
            "error": f"no result ({why}); log tail: {tail}",
        }
    result["process_wall_s"] = wall
    return result


def _command() -> str:
    return " ".join(["python", "bench/peers.py", *sys.argv[1:]])


def _summary_line(r: dict[str, Any]) -> str:
    if r.get("error"):
        return f"ERROR {r['error'].splitlines()[0][:160]}"
    tiers = Counter(q["tier"] for q in r.get("requests", []))
    return (
        f"TTFR {r.get('ttfr_s', float('nan')):.3f} s, trace {r.get('trace_wall_s', 0):.1f} s,"
        f" graphs {r.get('dynamo_frames')}, tiers {dict(tiers)}, "
        f"process {r.get('process_wall_s', 0):.0f} s"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"--device {args.device}: torch {torch.__version__} sees no CUDA device",
            file=sys.stderr,
        )
        return 2
    if args.report_only:
        return report_only(args, out, torch.__version__)
    preset = QUICK if args.quick else FULL
    tspec = preset.with_(
        seed=args.seed, calls=args.calls, rate=args.rate, tail_alpha=args.tail_alpha
    )
    trace = build_trace(tspec)
    hot = [int(s) for s in _csv(args.hot_sizes)] if args.hot_sizes else hot_sizes(trace, 3)
    counts = Counter(c.size for c in trace)
    probe_size = max(counts, key=lambda s: (counts[s], -s))
    warmup_calls = args.warmup_calls or max(1, len(trace) // 3)
    settle = (
        args.settle_timeout if args.settle_timeout is not None else (5.0 if args.quick else 240.0)
    )
    run_timeout = args.run_timeout or (150.0 if args.quick else 1500.0)
    measure = (
        {
            "probe_every_s": 1.0,
            "probe_window_s": 0.1,
            "throughput_rounds": 3,
            "throughput_round_s": 0.05,
            "idle_probes": 3,
            "baseline_calls": 3,
        }
        if args.quick
        else {
            "probe_every_s": 3.0,
            "probe_window_s": 0.3,
            "throughput_rounds": 5,
            "throughput_round_s": 0.25,
            "idle_probes": 5,
            "baseline_calls": 3,
        }
    )
    (out / "trace.json").write_text(
        json.dumps({"spec": tspec.to_json(), "calls": [c.__dict__ for c in trace]})
    )
    prefill = sorted({c.size for c in trace if c.kind == "prefill"})
    print(
        f"trace: {len(trace)} calls over {trace[-1].at:.0f} s, {len(counts)} distinct sizes "
        f"({', '.join(map(str, sorted(counts)))}); prefill {prefill}; hot {hot}; "
        f"probe size {probe_size}; warm-up = first {warmup_calls} requests",
        flush=True,
    )

    all_metrics: list[_report.Metrics] = []
    per_model: dict[str, dict[str, dict[str, Any]]] = {}
    plot_notes: list[str] = []
    plots: list[str] = []
    for model in args.models:
        store = out / "stores" / f"{model}-{args.device.replace(':', '')}-{args.dtype}"
        results: dict[str, dict[str, Any]] = {}
        for i, system in enumerate(args.systems, 1):
            if system == "pwdaemon-cold":
                shutil.rmtree(store, ignore_errors=True)
            spec = {
                "system": system,
                "model": model,
                "device": args.device,
                "dtype": args.dtype,
                "seed": args.seed,
                "trace": [[c.size, c.at] for c in trace],
                "hot_sizes": hot,
                "probe_size": probe_size,
                "settle_timeout_s": settle,
                "run_timeout_s": run_timeout,
                "store": str(store),
                "dynamic_mark": args.dynamic_mark,
                "threads": args.threads,
                "pwdaemon": {
                    "hot_calls": args.hot_calls,
                    "workers": args.workers,
                    "trace": args.trace,
                },
                "ab_static": args.ab,
                **measure,
            }
            if system == "pwdaemon-warm" and not store.exists():
                results[system] = {
                    "system": system,
                    "model": model,
                    "error": f"no store at {store}: run pwdaemon-cold first",
                }
            else:
                print(
                    f"[{model} {i}/{len(args.systems)}] {system}: {SYSTEMS[system]} ...", flush=True
                )
                results[system] = run_system(args, spec, out)
            print(f"    {_summary_line(results[system])}", flush=True)
        per_model[model] = results
        (out / f"peers-{model}.json").write_text(
            json.dumps(
                {
                    "hot_sizes": hot,
                    "warmup_calls": warmup_calls,
                    "command": _command(),
                    "results": results,
                }
            )
        )
        metrics = _report.compute(results, hot, warmup_calls)
        all_metrics += [metrics[s] for s in args.systems if s in metrics]
        if not args.no_plots:
            _plots(results, model, out, plots, plot_notes)

    md = render(
        args,
        tspec,
        trace,
        hot,
        probe_size,
        warmup_calls,
        all_metrics,
        per_model,
        plots,
        plot_notes,
        torch.__version__,
    )
    (out / "peers.md").write_text(md)
    print()
    print(md)
    for note in plot_notes:
        print(note, file=sys.stderr)
    print(f"written: {out / 'peers.md'}" + "".join(f", {out / p}" for p in plots))
    errors = [m for m in all_metrics if m.error]
    return 1 if errors else 0


def _plots(
    results: dict[str, dict[str, Any]], model: str, out: Path, plots: list[str], notes: list[str]
) -> None:
    for kind, fn in (
        ("latency", _report.plot_latency),
        ("latency_panels", _report.plot_panels),
        ("probes", _report.plot_probes),
    ):
        path = out / f"{kind}_{model}.png"
        why = fn(results, model, path)
        if why is None:
            plots.append(path.name)
        elif why not in notes:
            notes.append(why)


def report_only(args: argparse.Namespace, out: Path, torch_version: str) -> int:
    """Rebuild peers.md and the plots from the JSON a previous run left in `out`."""
    saved = json.loads((out / "trace.json").read_text())
    spec = dict(saved["spec"])
    spec["burst_calls"] = tuple(spec["burst_calls"])
    tspec = TraceSpec(**spec)
    trace = [TraceCall(**c) for c in saved["calls"]]
    counts = Counter(c.size for c in trace)
    probe_size = max(counts, key=lambda s: (counts[s], -s))
    metrics: list[_report.Metrics] = []
    per_model: dict[str, dict[str, dict[str, Any]]] = {}
    plots: list[str] = []
    notes: list[str] = []
    hot: list[int] = []
    warmup_calls = 0
    systems: list[str] = []
    for model in args.models:
        data = json.loads((out / f"peers-{model}.json").read_text())
        hot, warmup_calls, results = data["hot_sizes"], data["warmup_calls"], data["results"]
        args.command = data.get("command")
        per_model[model] = results
        by_system = _report.compute(results, hot, warmup_calls)
        systems = [s for s in SYSTEMS if s in results]
        metrics += [by_system[s] for s in systems]
        if not args.no_plots:
            _plots(results, model, out, plots, notes)
    args.systems = systems
    md = render(
        args,
        tspec,
        trace,
        hot,
        probe_size,
        warmup_calls,
        metrics,
        per_model,
        plots,
        notes,
        torch_version,
    )
    (out / "peers.md").write_text(md)
    print(md)
    return 0


def render(
    args: argparse.Namespace,
    tspec: Any,
    trace: list[Any],
    hot: list[int],
    probe_size: int,
    warmup_calls: int,
    metrics: list[_report.Metrics],
    per_model: dict[str, dict[str, dict[str, Any]]],
    plots: list[str],
    plot_notes: list[str],
    torch_version: str,
) -> str:
    counts = Counter(c.size for c in trace)
    prefill = sorted({c.size for c in trace if c.kind == "prefill"})
    lines = [
        "# pwdaemon vs peers",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M')}; torch {torch_version}; device {args.device} "
        f"({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs); dtype "
        f"{args.dtype}; models {', '.join(args.models)}; Inductor cache per peer: "
        f"{args.inductor_cache}; OMP_WAIT_POLICY {args.omp_wait_policy}; torch threads "
        f"{args.threads or 'default'}.",
        "",
        f"Trace (seed {tspec.seed}): {len(trace)} requests, Poisson arrivals at "
        f"{tspec.rate:g}/s ({trace[-1].at:.0f} s), {len(counts)} distinct sizes "
        f"({', '.join(map(str, sorted(counts)))}); decode 1..{tspec.decode_max} (tail "
        f"alpha {tspec.tail_alpha:g}), prefill {prefill}; popular sizes shift every "
        f"{len(trace) // max(1, tspec.phases)} requests. Hot sizes (throughput): {hot}. "
        f"Probe size: {probe_size}. Warm-up: the first {warmup_calls} requests.",
        "",
        f"Command: `{getattr(args, 'command', None) or _command()}`",
        "",
        "Systems: " + "; ".join(f"`{s}`: {SYSTEMS[s]}" for s in args.systems) + ".",
        "",
        _report.markdown_table(_report.table_columns(hot), _report.table_rows(metrics, hot)),
        "",
        "Steady-state calls/s per hot size (tier that served it):",
        "",
        _report.throughput_table(metrics, hot),
        "",
    ]
    for model, results in per_model.items():
        table = _report.specialize_table(results, model)
        if table is not None:
            lines += [
                "pwdaemon: when each size went specialized (seconds since t0; swap events):",
                "",
                table,
                "",
            ]
    lines += ["## Targets", ""]
    for model in per_model:
        by_system = {m.system: m for m in metrics if m.model == model}
        lines.append(f"{model}:")
        lines += _report.verdicts(by_system, hot)
        lines.append("")
    lines += ["## Notes", ""]
    for m in metrics:
        bits = list(m.notes)
        if m.busy_note:
            bits.append(f"busy/idle: {m.busy_note}")
        if not m.settle_complete:
            bits.append("settle timed out: steady state measured with compiles still running")
        if m.check_max_abs == m.check_max_abs:
            bits.append(f"max |out - eager| on hot sizes and the largest: {m.check_max_abs:.2e}")
        if m.error:
            bits.append(f"ERROR: {m.error.splitlines()[0][:300]}")
        if m.system.startswith("pwdaemon"):
            r = per_model[m.model][m.system]
            sources = Counter(s["source"] for s in r.get("swaps", []))
            if sources:
                bits.append(f"swaps by source {dict(sources)}")
            if m.first_specialized_s == m.first_specialized_s:
                bits.append(f"first size specialized at {m.first_specialized_s:.2f} s")
            gen = next((s for s in r.get("swaps", []) if s["tier"] == "general"), None)
            if gen is not None:
                bits.append(f"general live at {gen['at']:.2f} s")
        if m.system.startswith("pwdaemon") or m.system == "upfront":
            bits.append(
                f"set-up (attach or compile-all) {m.setup_s:.2f} s of the "
                f"{m.ttfr_s:.2f} s to first response"
            )
        if m.system in IN_PROCESS_COMPILERS:
            bits.append(f"{m.compile_requests} requests compiled on the serving thread")
        if bits:
            lines.append(f"- {m.model} `{m.system}`: " + "; ".join(bits))
    lines += [""]
    if plots:
        lines += ["Plots: " + ", ".join(f"`{p}`" for p in plots), ""]
    lines += [f"{n}" for n in plot_notes]
    doc = (_report.__doc__ or "").split("Definitions (also printed under the table):", 1)
    if len(doc) == 2:
        lines += ["## Definitions", doc[1].rstrip()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
