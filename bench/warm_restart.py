"""Warm restart against cold start, in one run, per model.

Fresh processes serve the same sizes from the same (initially empty) artifact store:

- cold: the store is empty, so the general runnable and every size are compiled, and the
  background trace is saved in the store (`pwdaemon.serving.saved_trace`);
- warm: a new process attaches to the store the cold one left and loads that trace
  instead of tracing; only one call of one size is made, the rest are prepared from the
  store (artifacts + the size profile);
- warm, traced: the same with `attach(saved_trace=False)`: dynamo traces the model again
  before any stored artifact can serve (what every warm restart did before the trace was
  saved), the peer of the row above;
- warm + prewarm: as warm, with `pwdaemon.prewarm()` run to its end before attach (a
  server that loads weights meanwhile);
- warm, baseline (with `--baseline DIR`): as warm, with the pwdaemon of another checkout
  (DIR put first on the children's PYTHONPATH), so a change is measured against the code
  before it in the same run, on the same store.

For each size: seconds from `attach()` until it serves specialized, per run, and the
ratio. Target: every size specialized in the previous run serves specialized within
2 s of attach.

`--repeat R` runs the warm children R times each, alternated, and judges the target on
the median over the runs (this box's speed varies about 2x between hours; one run
decides nothing); the per-size table shows the first run of each.

    python bench/warm_restart.py [--models demo,bert,llama] [--sizes 1,2,4,8,16]
                                 [--device cpu|cuda] [--dtype fp32|fp16] [--repeat R]
                                 [--store DIR] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _children import run_child

CHILD = r"""
import json, sys, time
import torch
import pwdaemon as pwd
from pwdaemon.models import demo_model, example_tokens
from pwdaemon.real_models import model_spec

store, name, device, dtype, mode = sys.argv[1:6]
sizes = [int(s) for s in sys.argv[6].split(",")]
device, dtype = torch.device(device), {"fp32": torch.float32, "fp16": torch.float16}[dtype]
if mode == "warm-prewarmed":  # a server that calls prewarm() first and then loads weights
    pwd.prewarm().join()
if name == "demo":
    model = demo_model().to(device)
    inputs = lambda n: ((example_tokens(n).to(device),), {})
else:
    spec = model_spec(name, "tiny")
    model = spec.build(device, dtype)
    inputs = lambda n: spec.inputs(n, device, dtype)
swapped = {}
t0 = time.monotonic()
# cold_after_s: the cold run calls each size 3 times, then waits; on a loaded machine
# its sizes stayed queued behind the general compile past the default 60 s, went cold
# and were dropped, and the warm run had nothing to load.
h = pwd.attach(model, store=store, saved_trace=mode != "warm-traced",
               policy=pwd.PolicyConfig(hot_calls=2, tick_s=0.02, cold_after_s=3600))
h.on_swap(lambda e: swapped.setdefault(e.size, (time.monotonic() - t0, e.source))
          if e.size is not None else None)
with torch.inference_mode():
    args, kwargs = inputs(sizes[0])
    first = time.monotonic()
    model(*args, **kwargs)
    first_call = time.monotonic() - first
    if mode == "cold":  # traffic makes every size hot
        for n in sizes:
            args, kwargs = inputs(n)
            for _ in range(3):
                model(*args, **kwargs)
    # Tier.SIZE: on a GPU the default tier is the CUDA graph, captured on a serving call
    # of the size; this run makes no call after its traffic, so that wait never ended.
    ok = h.wait(sizes=sizes, timeout=900, tier=pwd.Tier.SIZE)
trace = h.status().trace
h.detach()
print(json.dumps({"ok": ok, "first_call_s": first_call, "mode": mode,
                  "saved_trace": trace.saved_trace.value, "detail": trace.saved_trace_detail,
                  "pwdaemon": pwd.__file__, "error_calls": trace.error_calls,
                  "swapped": {str(k): v for k, v in swapped.items()}}))
"""

WARM_MODES = {"warm": "warm", "warm-traced": "warm, traced", "warm-prewarmed": "warm + prewarm"}
# The child runs it as "warm"; only the pwdaemon it imports differs (`run`).
BASELINE_MODE = {"warm-baseline": "warm, baseline"}


def run(store: str, model: str, mode: str, args: argparse.Namespace) -> dict:
    baseline = args.baseline if mode == "warm-baseline" else None
    argv = [store, model, args.device, args.dtype, mode, args.sizes]
    result = run_child(CHILD, argv, f"{model} {mode} run", baseline)
    if result["error_calls"]:  # answered right by the plain module, but a broken path
        print(f"  {model} {mode}: {result['error_calls']} call(s) raised on pwdaemon's path")
    if args.verbose:  # one line per run, as it ends (a long run shows where it is)
        print(
            f"  {model} {mode}: every size {all_specialized_s(result, size_list(args)):.2f} s, "
            f"trace {result['saved_trace']}",
            flush=True,
        )
    return result


def size_list(args: argparse.Namespace) -> list[int]:
    return [int(s) for s in args.sizes.split(",")]


def all_specialized_s(result: dict, sizes: list[int]) -> float:
    """Seconds from attach until the last of `sizes` served specialized in one run.

    A size that never did misses the target (its run timed out or gave it up): infinite,
    never reported as met.
    """
    got = [result["swapped"].get(str(n)) for n in sizes]
    return float("inf") if any(g is None for g in got) else max(g[0] for g in got)


def bench_model(model: str, store: str, args: argparse.Namespace) -> None:
    started = time.monotonic()
    cold = run(store, model, "cold", args)
    modes = {**WARM_MODES, **(BASELINE_MODE if args.baseline else {})}
    runs: dict[str, list[dict]] = {mode: [] for mode in modes}
    for _ in range(max(1, args.repeat)):  # alternated: a slow spell hits every kind
        for mode in modes:
            runs[mode].append(run(store, model, mode, args))
    firsts = {mode: results[0] for mode, results in runs.items()}
    print(
        f"\n{model} on {args.device} ({args.dtype}), store {store}, sizes {size_list(args)} "
        f"(total {time.monotonic() - started:.0f} s)"
    )
    print(
        f"saved trace: cold {cold['saved_trace']} ({cold['detail']}); "
        f"warm {firsts['warm']['saved_trace']} ({firsts['warm']['detail']})"
    )
    print(
        "seconds from attach() to serving specialized; warm + prewarm: pwdaemon.prewarm()"
        " called at process start, finished before attach (as while weights load)"
    )
    print(f"| size | cold | {' | '.join(modes.values())} | cold/warm |")
    print("|---" * (len(modes) + 3) + "|")
    for n in size_list(args):
        c = cold["swapped"].get(str(n))
        cells = [firsts[mode]["swapped"].get(str(n)) for mode in modes]
        shown = " | ".join(f"{w[0]:.2f} ({w[1]})" if w else "-" for w in cells)
        ratio = f"{c[0] / cells[0][0]:.1f}x" if c and cells[0] else "-"
        print(f"| {n} | {f'{c[0]:.2f}' if c else '-'} | {shown} | {ratio} |")
    if not cold["ok"]:
        print("cold: wait() returned False (a size was given up or timed out)")
    medians = {}
    for mode, results in runs.items():
        label = modes[mode]
        if not all(r["ok"] for r in results):
            print(f"{label}: wait() returned False in a run (a size was given up or timed out)")
        every = sorted(all_specialized_s(r, size_list(args)) for r in results)
        medians[mode] = statistics.median(every)
        verdict = "met" if medians[mode] <= 2.0 else "missed"
        spread = (
            f" over {len(every)} runs ({every[0]:.2f}-{every[-1]:.2f})" if len(every) > 1 else ""
        )
        print(
            f"{label}: every size specialized {medians[mode]:.2f} s after attach{spread} "
            f"(target 2 s: {verdict})"
        )
    if medians["warm"] > 0:
        print(f"warm, traced ÷ warm: {medians['warm-traced'] / medians['warm']:.2f}x")
        if "warm-baseline" in medians:
            print(f"warm, baseline ÷ warm: {medians['warm-baseline'] / medians['warm']:.2f}x")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo", help="demo, or names from pwdaemon.real_models")
    ap.add_argument("--sizes", default="1,2,4,8,16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", choices=("fp32", "fp16"), default="fp32")
    ap.add_argument("--store", default=None, help="store dir (default: a fresh temp dir each)")
    ap.add_argument("--repeat", type=int, default=1, help="warm runs of each kind")
    ap.add_argument("--verbose", action="store_true", help="a line per run as it ends")
    ap.add_argument(
        "--baseline",
        default=None,
        help="a checkout whose pwdaemon also runs warm (put first on PYTHONPATH)",
    )
    args = ap.parse_args()
    for model in args.models.split(","):
        store = (
            str(Path(args.store).resolve() / model)
            if args.store
            else tempfile.mkdtemp(prefix=f"pwdaemon-warm-bench-{model}-")
        )
        bench_model(model, store, args)


if __name__ == "__main__":
    main()
