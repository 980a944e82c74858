"""A size's first call after a warm restart loaded it before any call of it came.

A restart loads every size the store holds for the model as soon as the saved trace
serves (`bench/warm_restart.py`), usually before traffic has brought each of them. This
bench measures what such a size's first call costs, per model, in fresh processes:

- cold: one process serves every size three times and waits until each is specialized,
  filling the store (artifacts, the size profile and the saved trace);
- warm: a new process on that store serves the smallest size only, a call every 10 ms,
  until every other size has gone live from the store (0.5 s more for loads to settle);
  then, per other size, its first call, and 30 calls 10 ms apart for its median;
- warm, baseline (with `--baseline DIR`): the same with another checkout's pwdaemon
  (DIR first on the children's PYTHONPATH), alternated with warm on the same store.

Printed per model: seconds from `attach()` until every late size was live (validation
runs before each such swap now: what it adds shows here). Per size: the first call ÷ the
median of the calls after it (median over the runs, and their range), the first call's
ms, and in how many runs the swap was validated (`SwapEvent.validated`). The issue's
target for any warm-up call is 2x the median of its size on its tier.

    python bench/late_sizes.py [--models llama,bert] [--sizes 1,4,16] [--repeat 6]
                               [--threads 1] [--store DIR] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

from _children import run_child

CHILD = r"""
import json, statistics, sys, threading, time
import torch
import pwdaemon as pwd
from pwdaemon.models import demo_model, example_tokens
from pwdaemon.real_models import model_spec

store, name, mode, threads = sys.argv[1:5]
sizes = [int(s) for s in sys.argv[5].split(",")]
if int(threads):
    torch.set_num_threads(int(threads))
if name == "demo":
    model = demo_model()
    inputs = lambda n: ((example_tokens(n),), {})
else:
    spec = model_spec(name, "tiny")
    model = spec.build(torch.device("cpu"), torch.float32)
    inputs = lambda n: spec.inputs(n, torch.device("cpu"), torch.float32)
calls = {n: inputs(n) for n in sizes}
late = sizes[1:]
live, all_live = {}, threading.Event()
t_attach = time.monotonic()
h = pwd.attach(model, store=store,
               policy=pwd.PolicyConfig(hot_calls=2, tick_s=0.02, cold_after_s=3600))

def on_swap(e):
    if e.size is not None and e.tier is pwd.Tier.SIZE:
        live[e.size] = e.validated
        if all(n in live for n in late) and not all_live.is_set():
            out["live_s"] = time.monotonic() - t_attach
            all_live.set()

out = {"mode": mode, "pwdaemon": pwd.__file__}
h.on_swap(on_swap)

def call(n):
    args, kwargs = calls[n]
    t = time.perf_counter()
    model(*args, **kwargs)
    return time.perf_counter() - t

with torch.inference_mode():
    if mode == "cold":  # every size hot, then wait until each is specialized
        for n in sizes:
            for _ in range(3):
                call(n)
        out["ok"] = h.wait(sizes=sizes, timeout=900, tier=pwd.Tier.SIZE)
    else:
        deadline = time.monotonic() + 120
        while not all_live.is_set() and time.monotonic() < deadline:
            call(sizes[0])
            time.sleep(0.01)
        for _ in range(50):  # 0.5 s more: the last load's own work settles
            call(sizes[0])
            time.sleep(0.01)
        out["ok"] = all_live.is_set()
        out["trace"] = h.status().trace.saved_trace.value
        out["sizes"] = {}
        for n in late:
            first = call(n)
            time.sleep(0.01)
            rest = []
            for _ in range(30):
                rest.append(call(n))
                time.sleep(0.01)
            out["sizes"][str(n)] = {
                "first_ms": first * 1e3,
                "median_ms": statistics.median(rest) * 1e3,
                "validated": live.get(n),
                "tier": h.table().lookup(n).tier.value,
            }
h.detach()
print(json.dumps(out))
"""

KINDS = {"warm": "warm", "warm-baseline": "warm, baseline"}


def run(store: str, model: str, mode: str, args: argparse.Namespace) -> dict:
    baseline = args.baseline if mode == "warm-baseline" else None
    child_mode = "warm" if mode == "warm-baseline" else mode
    argv = [store, model, child_mode, str(args.threads), args.sizes]
    result = run_child(CHILD, argv, f"{model} {mode} run", baseline)
    if not result["ok"]:
        print(f"  {model} {mode}: not every size went live (see its run)")
    return result


def report(model: str, runs: dict[str, list[dict]], sizes: list[int]) -> str:
    """The per-size table: first call ÷ median (median over runs and range), first ms,
    runs whose swap was validated."""
    lines = [
        f"| {model} size | system | first ÷ median | range | first ms | median ms | validated |",
        "|---|---|---|---|---|---|---|",
    ]
    for n in sizes[1:]:
        for kind, results in runs.items():
            cells = [r["sizes"][str(n)] for r in results if str(n) in r.get("sizes", {})]
            if not cells:
                continue
            ratios = sorted(c["first_ms"] / c["median_ms"] for c in cells)
            validated = sum(1 for c in cells if c["validated"])
            lines.append(
                f"| {n} | {KINDS[kind]} | {statistics.median(ratios):.2f} | "
                f"{ratios[0]:.2f}-{ratios[-1]:.2f} | "
                f"{statistics.median(c['first_ms'] for c in cells):.2f} | "
                f"{statistics.median(c['median_ms'] for c in cells):.2f} | "
                f"{validated}/{len(cells)} |"
            )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="llama,bert", help="demo, or pwdaemon.real_models names")
    ap.add_argument("--sizes", default="1,4,16", help="the first is the one traffic brings")
    ap.add_argument("--repeat", type=int, default=3, help="warm runs of each kind")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's own)")
    ap.add_argument("--store", default=None, help="store dir (default: a fresh temp dir each)")
    ap.add_argument(
        "--baseline",
        default=None,
        help="a checkout whose pwdaemon also runs warm (put first on PYTHONPATH)",
    )
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) < 2:
        raise SystemExit("--sizes needs a size for traffic and at least one to load late")
    kinds = ["warm", *(["warm-baseline"] if args.baseline else [])]
    print(
        f"`python bench/late_sizes.py --models {args.models} --sizes {args.sizes} "
        f"--repeat {args.repeat} --threads {args.threads}"
        f"{' --baseline ' + args.baseline if args.baseline else ''}`"
    )
    for model in args.models.split(","):
        store = (
            str(Path(args.store).resolve() / model)
            if args.store
            else tempfile.mkdtemp(prefix=f"pwdaemon-late-bench-{model}-")
        )
        cold = run(store, model, "cold", args)
        if not cold["ok"]:
            print(f"{model}: the cold run did not specialize every size; its store is partial")
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        for _ in range(max(1, args.repeat)):  # alternated: a slow spell hits every kind
            for kind in kinds:
                runs[kind].append(run(store, model, kind, args))
        traces = sorted({r.get("trace", "?") for rs in runs.values() for r in rs})
        print(f"\n{model}, store {store}, saved trace in the warm runs: {', '.join(traces)}")
        for kind, results in runs.items():
            every = sorted(r.get("live_s", float("inf")) for r in results)
            print(
                f"{KINDS[kind]}: every late size live {statistics.median(every):.2f} s after "
                f"attach ({every[0]:.2f}-{every[-1]:.2f})"
            )
        print(report(model, runs, sizes))


if __name__ == "__main__":
    main()
