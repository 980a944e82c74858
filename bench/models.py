"""Real architectures, every system, one run: median latency per size once settled.

For each model of `pwdaemon.real_models` (and the demo model) and each system, a fresh
process (its own dynamo state, Inductor cache and pwdaemon store, so every system starts
cold) builds the model, serves calls under `torch.inference_mode()` as servers do, and
reports:

- first call: seconds of the first request after set-up (TTFR), and ÷ eager's first call;
- warm-up: calls keep coming, round-robin over the sizes, `PACE_S` apart (traffic with
  gaps, as a server sees it), until the system has settled (compiled what it will
  compile) and for at least `--min-warmup` seconds; the worst call ÷ the median of the
  same size on the tier it ran on, that median taken from calls paced alike (the
  issue's "worst warm-up ÷ median"). Pacing matters on a VM: with 2 OpenMP threads,
  eager BERT calls 10 ms apart had a median 2.7x and a worst 70x the back-to-back median
  (an idle vCPU is woken for the parallel region), so the eager row's ratio is this
  machine's floor for paced traffic with no compiler anywhere;
- steady state: median ms per size over `--iters` calls after settling.

Systems:
- eager: the plain module;
- dynamic: `torch.compile(model, dynamic=True)`;
- static: `torch.compile(model, dynamic=False)`, one compile per size on the request that
  brings it (on CUDA: `mode="reduce-overhead"`, per-size CUDA graphs);
- async: `static` with `TORCHINDUCTOR_FX_COMPILE_MODE=async+SUBPROCESS` (and the FX graph
  cache off, which that mode needs): Inductor compiles in a subprocess and serves a
  fallback meanwhile;
- specialize_on: torch's own per-size peer, `mark_dynamic(x, 0, specialize_on=[n == s])`;
- whole_graph (CUDA only): one CUDA graph across the whole call per size, captured by
  hand around `torch.compile(model, dynamic=False)` (Inductor, no cudagraphs of its own),
  the caller's inputs copied into the graph's static inputs each call: the "one graph
  across the call" that pwdaemon's per-piece graphs are measured against;
- pwdaemon: `pwd.attach(model, sizes=...)` with a fresh store; settled when every size
  serves specialized (on CUDA: from its CUDA graph);
- pwdaemon_warm: the same after a first pwdaemon run filled the store (a restart).

    python bench/models.py [--device cpu|cuda] [--models ...] [--sizes 1,4,16,64]
                           [--preset tiny|issue] [--dtype fp32|fp16|bf16] [--iters 50]
                           [--repeat R] [--threads N] [--no-cudnn-sdp]

`--threads N` sets torch's intra-op threads in every system's process (a server's
`torch.set_num_threads`); the default leaves torch's own (one per CPU here).
`--no-cudnn-sdp` turns cuDNN attention off in every system's process before it builds
anything (cuDNN builds its attention plans per thread, on each new shape's first call).

`--repeat R` runs each (model, system) R times, the systems in alternating order per
round, and reports medians over the runs: on a shared machine one run of a 0.3 ms model
swung by ±50 % between processes (TransformerEncoder: pwdaemon ÷ static 0.59 in one run,
1.01-1.78 in the next two).

Prints markdown tables; JSON per run lands in bench/results/models/, and each result is
appended to `--jsonl FILE` as it finishes (a run cut short keeps what it measured).
`--merge FILE [FILE ...]` prints the tables of results from earlier runs, in one.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import faulthandler
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYSTEMS = (
    "eager",
    "dynamic",
    "static",
    "async",
    "specialize_on",
    "whole_graph",
    "pwdaemon",
    "pwdaemon_warm",
)
DEFAULT_MODELS = ("demo", "sequential", "transformer_encoder", "bert", "gpt2", "llama")
RESULTS = Path(__file__).resolve().parent / "results" / "models"
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
# Seconds between warm-up calls, and between the calls whose median a warm-up call is
# compared with: one pacing for both, so the ratio measures the system, not the pacing.
PACE_S = 0.01
# Paced calls per size for those medians.
PACED_CALLS = 20


# --------------------------------------------------------------------------- child


def _build(name: str, preset: str, device: Any, dtype: Any) -> tuple[Any, Callable[[int], Any]]:
    import torch

    if name == "demo":
        from pwdaemon.models import demo_model, example_tokens

        model = demo_model().to(device)

        def demo_inputs(n: int) -> Any:
            return (example_tokens(n, generator=torch.Generator().manual_seed(n)).to(device),), {}

        return model, demo_inputs
    from pwdaemon.real_models import model_spec

    spec = model_spec(name, preset)
    return spec.build(device, dtype), lambda n: spec.inputs(n, device, dtype)


def _timer(device: Any) -> Callable[[Callable[[], Any]], float]:
    import torch

    # On CUDA a call ends when its stream is done, as a server's that reads its output
    # (`.cpu()`, `.item()`) does: not `torch.cuda.synchronize()`, which also waits for
    # other streams' work, pwdaemon's validation on the engine's stream among it. And
    # nothing waits before the call: work queued ahead of it on its stream (the previous
    # call's is done) delays it, as it would a server's call. Figures taken before
    # commit 5e06bb1 (2026-12-06) synchronized the whole device before and after.
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        sync: Callable[[], None] = stream.synchronize
    else:
        sync = lambda: None  # noqa: E731

    def timed(fn: Callable[[], Any]) -> float:
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    return timed


def serving_tiers(handle: Any, n: int) -> str:
    """The tiers size `n` is served from, over the pieces that serve it (pieces told
    apart by guards see only their sizes); "" while no piece has served it."""
    tiers = {
        p.dispatcher.table.lookup(n).tier.value for p in handle.pieces if n in p.dispatcher.counts
    }
    return ",".join(sorted(tiers))


def _mark(args: Any, kwargs: Any, sizes: list[int]) -> None:
    import torch

    preds = [lambda s, n=n: s == n for n in sizes]
    for t in (*args, *kwargs.values()):
        if isinstance(t, torch.Tensor):
            torch._dynamo.mark_dynamic(t, 0, specialize_on=preds)


def _whole_graph(compiled: Callable[..., Any]) -> Callable[..., Any]:
    """One CUDA graph per input shape across the whole call of `compiled`."""
    import torch

    pool = torch.cuda.graph_pool_handle()
    graphs: dict[tuple[Any, ...], tuple[Any, list[Any], Any]] = {}

    def call(*args: Any, **kwargs: Any) -> Any:
        flat = [*args, *kwargs.values()]
        key = tuple(tuple(t.shape) if isinstance(t, torch.Tensor) else t for t in flat)
        if key not in graphs:
            static = [t.clone() if isinstance(t, torch.Tensor) else t for t in flat]
            s_args, s_kwargs = (
                static[: len(args)],
                dict(zip(kwargs, static[len(args) :], strict=True)),
            )
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                for _ in range(3):  # warm-up outside capture, as torch's docs ask
                    compiled(*s_args, **s_kwargs)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = compiled(*s_args, **s_kwargs)
            graphs[key] = (graph, static, out)
        graph, static, out = graphs[key]
        for dst, src in zip(static, flat, strict=True):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        return out  # graph-owned, as reduce-overhead's outputs are

    return call


def run_child(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    device = torch.device(opts.device)
    dtype = getattr(torch, DTYPES[opts.dtype])
    if opts.threads:
        torch.set_num_threads(opts.threads)
    if opts.no_cudnn_sdp:
        # cuDNN keeps its attention plans per thread (aten's MHA plan cache is
        # thread_local): every new shape, mask and thread builds one on the calling
        # thread. Set before attach, as a server would: the workers compile with it too.
        torch.backends.cuda.enable_cudnn_sdp(False)
    sizes = [int(s) for s in opts.sizes.split(",")]
    model, inputs = _build(opts.model, opts.preset, device, dtype)
    timed = _timer(device)
    calls = {n: inputs(n) for n in sizes}
    system, handle = opts.system, None
    fn: Callable[..., Any] = model
    plain = model  # the module eager's medians are measured on
    t_setup = time.perf_counter()
    if system == "dynamic":
        fn = torch.compile(model, dynamic=True)
    elif system in ("static", "async"):  # async: the environment selects the mode
        mode = "reduce-overhead" if device.type == "cuda" else None
        fn = torch.compile(model, dynamic=False, mode=mode)
    elif system == "specialize_on":
        fn = torch.compile(model)
    elif system == "whole_graph":
        fn = _whole_graph(torch.compile(model, dynamic=False))
    elif system in ("pwdaemon", "pwdaemon_warm"):
        import pwdaemon as pwd

        # Eager's medians below need the plain module: the attached one serves through
        # pwdaemon (a copy made before attach shares nothing with it).
        plain = copy.deepcopy(model)
        handle = pwd.attach(model, sizes=sizes, store=opts.store, trace=opts.trace)
    setup_s = time.perf_counter() - t_setup

    def call(n: int) -> Any:
        args, kwargs = calls[n]
        if system == "specialize_on":
            _mark(args, kwargs, sizes)
        return fn(*args, **kwargs)

    def tier(n: int) -> str:
        if handle is None:
            return system
        return serving_tiers(handle, n) or "untraced"

    def settled() -> bool:
        if handle is None:
            return True
        # The plan done and nothing compiling: a busy worker would share the CPU with
        # the calls being timed. (Queued jobs may wait for traffic that never comes: a
        # graph job of a piece that never sees its size.)
        status = handle.status()
        if not status.plan_complete or status.in_flight:
            return False
        want = "graph" if device.type == "cuda" else None
        for n in sizes:
            # Pieces told apart by guards each see only their sizes; a size no piece has
            # served yet runs the plain module (a trace of its signature is pending).
            serving = [p for p in handle.pieces if n in p.dispatcher.counts]
            if not serving:
                return False
            for p in serving:
                if not p.specializable:
                    continue
                t = p.dispatcher.table.lookup(n).tier.value
                if t in ("eager", "general") or (want is not None and t != want):
                    return False
        return True

    warmup: list[tuple[int, str, float]] = []
    warmup_at: list[float] = []  # seconds after set-up each warm-up call began
    # When each size first ran on each tier (seconds after attach): where a warm-up's
    # time went (a store load, a compile, a capture) without the engine's logs.
    timeline: list[tuple[float, int, str]] = []

    def note_tier(n: int, t: str) -> None:
        if not any(m == n and u == t for _, m, u in timeline):
            timeline.append((time.perf_counter() - t_setup, n, t))

    with torch.inference_mode():
        warmup_at.append(time.perf_counter() - t_setup)
        first_s = timed(lambda: call(sizes[0]))
        warmup.append((sizes[0], tier(sizes[0]), first_s))
        note_tier(sizes[0], warmup[0][1])
        # Warm-up: round-robin until settled. Every system sees every size at least
        # twice here, so static/specialize_on compile each size on the request path
        # (that is what they do) and pwdaemon compiles in the background.
        deadline = time.perf_counter() + opts.settle_timeout
        min_end = time.perf_counter() + opts.min_warmup
        i = 1
        while True:
            n = sizes[i % len(sizes)]
            before = tier(n)
            note_tier(n, before)
            warmup_at.append(time.perf_counter() - t_setup)
            warmup.append((n, before, timed(lambda n=n: call(n))))  # type: ignore[misc]
            i += 1
            if i >= 2 * len(sizes) and settled() and time.perf_counter() >= min_end:
                break
            if time.perf_counter() > deadline:
                break
            time.sleep(PACE_S)  # traffic pacing, every system alike (not a sync)
        settle_s = time.perf_counter() - t_setup
        # Steady state: the sizes interleaved in blocks of 10 calls, so that a burst of
        # noise on this shared machine lands on every size alike, not on one.
        samples: dict[int, list[float]] = {n: [] for n in sizes}
        for n in sizes:
            for _ in range(3):
                call(n)
        for _ in range(max(1, opts.iters // 10)):
            for n in sizes:
                samples[n] += [timed(lambda n=n: call(n)) for _ in range(10)]  # type: ignore[misc]
        steady = {n: statistics.median(v) for n, v in samples.items()}
        tiers = {n: tier(n) for n in sizes}
        eager_median = {
            n: statistics.median(
                timed(lambda n=n: plain(*calls[n][0], **calls[n][1]))  # type: ignore[misc]
                for _ in range(max(5, opts.iters // 5))
            )
            for n in sizes
        }

        def paced_median(fn: Callable[[], Any]) -> float:
            times = []
            for _ in range(PACED_CALLS):
                time.sleep(PACE_S)
                times.append(timed(fn))
            return statistics.median(times)

        # Worst warm-up call ÷ the paced median of the same size on the same tier; calls
        # on a tier that did not survive to steady state are compared with eager's
        # paced median of that size.
        paced = {n: paced_median(lambda n=n: call(n)) for n in sizes}  # type: ignore[misc]
        eager_paced = {
            n: paced_median(lambda n=n: plain(*calls[n][0], **calls[n][1]))  # type: ignore[misc]
            for n in sizes
        }
    ratios = []
    # The same without each size's first call: the plain module pays a first call per
    # size too (allocator growth, per-shape library set-up), so a system's slow first
    # calls are told apart from slow calls its background work causes later.
    repeat_ratios = []
    seen_sizes = {sizes[0]}
    back_to_back = []  # the same against the back-to-back medians (before 2026-12-01)
    worst: dict[str, Any] = {}
    worst_by_tier: dict[str, float] = {}
    for i, (n, t, s) in enumerate(warmup[1:], start=1):
        base = paced[n] if t == tiers[n] else eager_paced[n]
        back_to_back.append(s / (steady[n] if t == tiers[n] else eager_median[n]))
        ratios.append(s / base)
        if n in seen_sizes:
            repeat_ratios.append(ratios[-1])
        seen_sizes.add(n)
        worst_by_tier[t] = max(worst_by_tier.get(t, 0.0), ratios[-1])
        if ratios[-1] == max(ratios):
            worst = {"call": i, "size": n, "tier": t, "ms": s * 1e3, "median_ms": base * 1e3}
    out: dict[str, Any] = {
        "model": opts.model,
        "system": system,
        "device": str(device),
        "dtype": opts.dtype,
        "setup_s": setup_s,
        "first_call_s": first_s,
        "settle_s": settle_s,
        "settled": settled(),
        "warmup_calls": len(warmup),
        "warmup_worst_ratio": max(ratios) if ratios else None,
        "warmup_worst_ratio_back_to_back": max(back_to_back) if back_to_back else None,
        "warmup_worst_ratio_repeat": max(repeat_ratios) if repeat_ratios else None,
        "warmup_p99_ratio": p99(ratios),
        "threads": torch.get_num_threads(),
        # Every warm-up call: seconds after set-up, size, tier, ms, ÷ its median.
        "warmup_log": [
            [round(at, 3), n, t, round(s * 1e3, 3), round(r, 2)]
            for at, (n, t, s), r in zip(warmup_at[1:], warmup[1:], ratios, strict=True)
        ],
        "paced_ms": {str(n): v * 1e3 for n, v in paced.items()},
        "eager_paced_ms": {str(n): v * 1e3 for n, v in eager_paced.items()},
        "warmup_worst": worst,
        "warmup_worst_by_tier": worst_by_tier,
        "steady_ms": {str(n): v * 1e3 for n, v in steady.items()},
        "eager_ms": {str(n): v * 1e3 for n, v in eager_median.items()},
        "tiers": {str(n): t for n, t in tiers.items()},
        "tier_timeline": [[round(at, 3), n, t] for at, n, t in timeline],
        "torch": torch.__version__,
    }
    if handle is not None:
        out["pieces"] = len(handle.pieces)
        out["piece_sizes"] = {
            str(p.index): {
                "strategy": p.strategy.value,
                "tiers": {
                    str(n): p.dispatcher.table.lookup(n).tier.value for n in p.dispatcher.counts
                },
            }
            for p in handle.pieces
        }
        status = handle.status()
        out["graph_mib"] = {
            e.target: e.graph_bytes / 2**20
            for p in status.pieces
            for e in p.entries
            if e.graph_bytes is not None
        }
        out["capture_pause_ms"] = [s * 1e3 for s in handle.engine.capture_pauses]
        out["status"] = str(status)  # every entry's source, attempts and compile time
        if not out["settled"]:
            # Where every thread is (a capture or a validation that never ends shows here).
            with tempfile.TemporaryFile("w+") as f:
                faulthandler.dump_traceback(file=f, all_threads=True)
                f.seek(0)
                out["stacks"] = f.read()
        handle.detach()
    return out


# --------------------------------------------------------------------------- parent


def _run_one(opts: argparse.Namespace, model: str, system: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="pwdaemon-bench-") as tmp:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": f"{tmp}/inductor"}
        if system == "async":
            env.update(TORCHINDUCTOR_FX_COMPILE_MODE="async+SUBPROCESS",
                       TORCHINDUCTOR_FX_GRAPH_CACHE="0")  # fmt: skip
        if system == "pwdaemon_warm":  # a first run fills the store the measured one uses
            first = _child(opts, model, "pwdaemon", tmp, env)
            if "error" in first:
                return {"model": model, "system": system, "error": "first run: " + first["error"]}
        result = _child(opts, model, system, tmp, env)
    return {**result, "system": system} if "error" not in result else result


def _child(
    opts: argparse.Namespace, model: str, system: str, tmp: str, env: dict[str, str]
) -> dict[str, Any]:
    cmd = [
        sys.executable, __file__, "--child", "--model", model, "--system", system,
        "--device", opts.device, "--dtype", opts.dtype, "--sizes", opts.sizes,
        "--preset", opts.preset, "--iters", str(opts.iters),
        "--settle-timeout", str(opts.settle_timeout), "--store", f"{tmp}/store",
        "--min-warmup", str(opts.min_warmup),
        "--trace", opts.trace, "--threads", str(opts.threads),
    ] + (["--no-cudnn-sdp"] if opts.no_cudnn_sdp else [])  # fmt: skip
    try:
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=opts.run_timeout
        )
    except subprocess.TimeoutExpired:
        return {"model": model, "system": system, "error": "timed out"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-40:]
        # The exit status first: a process killed by a signal leaves only what it had
        # logged, which reads like the cause when it may not be. The table quotes the
        # last line (an exception's message); the tail is kept whole beside it.
        last = tail[-1] if tail else "no output"
        return {
            "model": model,
            "system": system,
            "error": f"exit status {proc.returncode}: {last}",
            "stderr_tail": " | ".join(tail),
        }
    result: dict[str, Any] = json.loads(lines[-1])
    return result


def combine(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One result per (model, system): with several runs, the median of each figure
    (steady ms per size, first call, worst warm-up ratio, settle time), and `runs`."""
    by: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        by.setdefault((r["model"], r["system"]), []).append(r)
    out = []
    for group in by.values():
        ok = [r for r in group if "error" not in r]
        if len(group) == 1 or not ok:
            out.append(ok[0] if ok else group[-1])  # one run, or only errors
            continue
        first = dict(ok[0])
        first["runs"] = len(ok)
        first["steady_ms"] = {
            n: statistics.median(r["steady_ms"][n] for r in ok) for n in ok[0]["steady_ms"]
        }
        first["steady_ms_runs"] = {n: [r["steady_ms"][n] for r in ok] for n in ok[0]["steady_ms"]}
        for key in (
            "first_call_s",
            "settle_s",
            "warmup_worst_ratio",
            "warmup_worst_ratio_back_to_back",
            "warmup_worst_ratio_repeat",
            "warmup_p99_ratio",
        ):
            values = [r[key] for r in ok if r.get(key) is not None]
            first[key] = statistics.median(values) if values else None
        first["settled"] = all(r.get("settled") for r in ok)
        out.append(first)
    return out


def p99(ratios: list[float]) -> float | None:
    """The 99th percentile: what one call in a hundred exceeds, where the worst of
    ~1,500 warm-up calls is one event (eager's own worst here is 2-40x its median)."""
    if len(ratios) < 2:
        return None
    return statistics.quantiles(ratios, n=100, method="inclusive")[98]


def _fmt(v: float | None, digits: int = 2) -> str:
    return "—" if v is None else f"{v:.{digits}f}"


def report(results: list[dict[str, Any]], sizes: list[str], header: str) -> str:
    by = {(r["model"], r["system"]): r for r in results}
    models = list(dict.fromkeys(r["model"] for r in results))
    systems = [s for s in SYSTEMS if any(r["system"] == s for r in results)]
    peer = "static"
    out = [header, "", "Median ms per call once settled (lower is better):", ""]
    out.append("| model | size | " + " | ".join(systems) + f" | pwdaemon ÷ {peer} speed |")
    out.append("|---|---|" + "---|" * (len(systems) + 1))
    for m in models:
        for n in sizes:
            row = []
            for s in systems:
                r = by.get((m, s), {})
                row.append(_fmt(r.get("steady_ms", {}).get(n)) if "error" not in r else "error")
            pw = by.get((m, "pwdaemon"), {}).get("steady_ms", {}).get(n)
            st = by.get((m, peer), {}).get("steady_ms", {}).get(n)
            ratio = _fmt(st / pw) if pw and st else "—"
            out.append(f"| {m} | {n} | " + " | ".join(row) + f" | {ratio} |")
    out += [
        "",
        f"First request and warm-up (calls {PACE_S * 1e3:.0f} ms apart; worst ÷ the median of"
        " calls paced alike, same size and tier; eager's row is the machine's floor):",
        "",
    ]
    out.append(
        "| model | system | TTFR s | TTFR ÷ eager | worst warm-up ÷ median "
        "| the same after each size's first call | p99 warm-up ÷ median | settled s |"
    )
    out.append("|---|---|---|---|---|---|---|---|")
    for m in models:
        eager_first = by.get((m, "eager"), {}).get("first_call_s")
        for s in systems:
            r = by.get((m, s), {})
            if "error" in r or not r:
                out.append(f"| {m} | {s} | error: {r.get('error', 'missing')[:160]} | | | | | |")
                continue
            ttfr = r["first_call_s"]
            ttfr_ratio = ttfr / eager_first if eager_first else None
            note = "" if r.get("settled") else " (not settled)"
            pieces = f", {r['pieces']} pieces" if "pieces" in r else ""
            out.append(
                f"| {m} | {s}{pieces} | {_fmt(ttfr, 3)} | {_fmt(ttfr_ratio, 1)} | "
                f"{_fmt(r.get('warmup_worst_ratio'), 1)} | "
                f"{_fmt(r.get('warmup_worst_ratio_repeat'), 1)} | "
                f"{_fmt(r.get('warmup_p99_ratio'), 1)} | {_fmt(r['settle_s'], 1)}{note} |"
            )
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--sizes", default="1,4,16,64")
    p.add_argument("--preset", default="tiny", choices=("tiny", "issue"))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--iters", type=int, default=50)
    p.add_argument("--repeat", type=int, default=1,
                   help="runs per (model, system), alternating order; their medians")  # fmt: skip
    p.add_argument("--settle-timeout", type=float, default=300.0)
    p.add_argument("--min-warmup", type=float, default=20.0,
                   help="seconds of paced warm-up calls at least, for every system")  # fmt: skip
    p.add_argument("--run-timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--jsonl", type=Path, help="append each result here as it finishes")
    p.add_argument("--merge", type=Path, nargs="+", help="print tables of earlier --jsonl files")
    p.add_argument("--trace", default="background", choices=("background", "inline"),
                   help="pwdaemon's attach(trace=...)")  # fmt: skip
    p.add_argument("--threads", type=int, default=0,
                   help="torch.set_num_threads in every system (0: torch's default)")  # fmt: skip
    p.add_argument("--no-cudnn-sdp", action="store_true",
                   help="cuDNN attention off in every system (enable_cudnn_sdp)")  # fmt: skip
    # One (model, system) in this process; used by the parent, not by people.
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--system", help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    opts = p.parse_args()
    if opts.child:
        print(json.dumps(run_child(opts)), flush=True)
        return
    if opts.merge:
        merged = combine(
            [json.loads(ln) for f in opts.merge for ln in f.read_text().splitlines() if ln]
        )
        header = f"Merged from {', '.join(f.name for f in opts.merge)}"
        print(report(merged, opts.sizes.split(","), header))
        return
    runs: list[dict[str, Any]] = []
    systems = opts.systems.split(",")
    for round_ in range(opts.repeat):
        # Alternate the order each round: drift on a shared machine (another job
        # starting, thermal state) then favours no system.
        order = systems if round_ % 2 == 0 else systems[::-1]
        for model in opts.models.split(","):
            for system in order:
                t0 = time.perf_counter()
                r = _run_one(opts, model, system)
                print(f"{model:>20} {system:>14} (round {round_ + 1}): "
                      f"{time.perf_counter() - t0:6.1f} s {r.get('error', '')}",
                      file=sys.stderr, flush=True)  # fmt: skip
                runs.append(r)
                if opts.jsonl:
                    with opts.jsonl.open("a") as f:
                        f.write(json.dumps(r) + "\n")
    results = combine(runs)
    import torch

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    device = (
        torch.cuda.get_device_name() if opts.device == "cuda" else f"CPU, {os.cpu_count()} cores"
    )
    header = (
        f"{stamp}, {device}, torch {torch.__version__}, preset {opts.preset}, {opts.dtype}, "
        f"`python bench/models.py --device {opts.device} --models {opts.models} "
        f"--systems {opts.systems} --sizes {opts.sizes} --preset {opts.preset} "
        f"--dtype {opts.dtype} --repeat {opts.repeat}"
        + (f" --threads {opts.threads}" if opts.threads else "")
        + (" --no-cudnn-sdp`" if opts.no_cudnn_sdp else "`")
    )
    if opts.repeat > 1:
        header += f" (medians of {opts.repeat} runs each, in alternating order)"
    text = report(results, opts.sizes.split(","), header)
    print(text)
    opts.out.mkdir(parents=True, exist_ok=True)
    name = f"{opts.device}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    (opts.out / f"{name}.json").write_text(json.dumps(results, indent=1))
    (opts.out / f"{name}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
