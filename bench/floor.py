"""The machine's floor for the worst warm-up call: paced calls with no pwdaemon at all.

The issue's target (worst warm-up call ≤ 2x the median of its size) is judged on calls
10 ms apart. This bench times, in a fresh process per row, calls paced that way of

- `python`: pure-Python loops of about `--python-ms` each (no torch op: what the CPU and
  the VM give a single thread; the shorter the call, the more a fixed hiccup weighs);
- `eager`: the plain model (`--model`, sizes 1, 4, 16 in turn), on `--threads` torch
  threads (each count in its own process), on `--device` (on a GPU each call ends with a
  device sync, as a served call's output is read);

and for every call more than 2x its size's median, what the serving thread met during
it, read around the call: an involuntary context switch (`getrusage(RUSAGE_THREAD)`:
another thread or process took its CPU), a voluntary one (it slept: an OpenMP barrier
waiting for a worker thread), a page fault, a garbage collection (`gc.callbacks`), or
none of these.

    python bench/floor.py [--model llama] [--threads 1,2] [--python-ms 0.2,1]
                          [--calls 1500] [--repeat 1]
                          [--device cpu|cuda] [--preset tiny|issue] [--dtype fp32|fp16]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from typing import Any

from models import DTYPES, PACE_S, _build, p99

SIZES = (1, 4, 16)


def child(
    workload: str,
    model_name: str,
    threads: int,
    calls: int,
    device_name: str,
    preset: str,
    dtype_name: str,
) -> dict[str, Any]:
    import gc
    import resource
    import time

    import torch

    torch.set_num_threads(threads)
    if workload == "eager":
        device = torch.device(device_name)
        model, make = _build(model_name, preset, device, getattr(torch, DTYPES[dtype_name]))
        inputs = {n: make(n) for n in SIZES}
        sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None

        def work(n: int) -> None:
            args, kwargs = inputs[n]
            model(*args, **kwargs)
            sync()

        sizes: tuple[int, ...] = SIZES
    else:
        target_s = float(workload.partition(":")[2] or 1.0) * 1e-3
        loops = 20_000

        def work(n: int) -> None:
            s = 0
            for i in range(loops):
                s += i

        t = time.perf_counter()
        work(0)
        loops = max(1, int(loops * target_s / (time.perf_counter() - t)))

        sizes = (0,)
    collections: list[tuple[float, float]] = []
    began = [0.0]

    def on_gc(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[0] = time.perf_counter()
        else:
            collections.append((began[0], time.perf_counter()))

    gc.callbacks.append(on_gc)
    rows: list[tuple[int, float, float, int, int, int]] = []
    with torch.inference_mode():
        for n in sizes:
            work(n)  # first calls are not warm-up's subject here
        for i in range(calls):
            n = sizes[i % len(sizes)]
            r0 = resource.getrusage(resource.RUSAGE_THREAD)
            t0 = time.perf_counter()
            work(n)
            t1 = time.perf_counter()
            r1 = resource.getrusage(resource.RUSAGE_THREAD)
            rows.append(
                (
                    n,
                    t0,
                    t1,
                    r1.ru_nivcsw - r0.ru_nivcsw,
                    r1.ru_nvcsw - r0.ru_nvcsw,
                    r1.ru_minflt - r0.ru_minflt + r1.ru_majflt - r0.ru_majflt,
                )
            )
            time.sleep(PACE_S)
    gc.callbacks.remove(on_gc)
    median = {n: statistics.median(t1 - t0 for m, t0, t1, *_ in rows if m == n) for n in sizes}
    ratios = sorted((t1 - t0) / median[n] for n, t0, t1, *_ in rows)
    slow = [r for r in rows if (r[2] - r[1]) / median[r[0]] > 2.0]

    def collected(t0: float, t1: float) -> bool:
        return any(s < t1 and e > t0 for s, e in collections)

    causes = {"involuntary switch": 0, "voluntary switch": 0, "page fault": 0, "collection": 0}
    unexplained = 0
    for _, t0, t1, invol, vol, faults in slow:
        hit = False
        for name, met in (
            ("involuntary switch", invol > 0),
            ("voluntary switch", vol > 0),
            ("page fault", faults > 0),
            ("collection", collected(t0, t1)),
        ):
            if met:
                causes[name] += 1
                hit = True
        unexplained += not hit
    return {
        "workload": workload,
        "threads": threads,
        "median_ms": {str(n): m * 1e3 for n, m in median.items()},
        "worst": ratios[-1],
        "p99": p99(ratios),
        "calls": len(rows),
        "over_2x": len(slow),
        "causes": causes,
        "none_of_these": unexplained,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="llama", help="demo or a pwdaemon.real_models name")
    ap.add_argument("--threads", default="1,2", help="torch thread counts, one process each")
    ap.add_argument("--python-ms", default="0.2,1", help="pure-Python call lengths, ms")
    ap.add_argument("--calls", type=int, default=1500)
    ap.add_argument("--repeat", type=int, default=1, help="processes per row, alternated")
    ap.add_argument("--device", default="cpu", help="the eager rows' device: cpu, cuda")
    ap.add_argument("--preset", default="tiny", choices=("tiny", "issue"))
    ap.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    ap.add_argument("--child", nargs=4, metavar=("WORKLOAD", "MODEL", "THREADS", "CALLS"))
    args = ap.parse_args()
    if args.child:
        workload, model, threads, calls = args.child
        found = child(
            workload, model, int(threads), int(calls), args.device, args.preset, args.dtype
        )
        print(json.dumps(found))
        return
    rows = [(f"python:{ms}", 1) for ms in args.python_ms.split(",")]
    rows += [("eager", int(t)) for t in args.threads.split(",")]
    results: list[dict[str, Any]] = []
    for _ in range(max(1, args.repeat)):
        for workload, threads in rows:
            command = [sys.executable, __file__, "--child", workload, args.model]
            command += [str(threads), str(args.calls), "--device", args.device]
            out = subprocess.run(
                [*command, "--preset", args.preset, "--dtype", args.dtype],
                capture_output=True,
                text=True,
                check=False,
            )
            if out.returncode != 0:
                raise SystemExit(f"{workload} {threads} failed:\n{out.stderr[-3000:]}")
            results.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(
        f"`python bench/floor.py --model {args.model} --threads {args.threads} "
        f"--python-ms {args.python_ms} --calls {args.calls} --repeat {args.repeat} "
        f"--device {args.device} --preset {args.preset} --dtype {args.dtype}` "
        f"(calls {PACE_S * 1e3:.0f} ms apart)"
    )
    print(
        "| workload | torch threads | median ms | worst ÷ median | p99 ÷ median | calls > 2x "
        "| with an involuntary switch | voluntary | page fault | collection | none of these |"
    )
    print("|---" * 11 + "|")
    for r in results:
        c = r["causes"]
        medians = "/".join(f"{m:.2f}" for m in r["median_ms"].values())
        kind, _, ms = r["workload"].partition(":")
        name = f"pure Python, {ms} ms" if kind == "python" else f"eager {args.model}, {args.device}"
        print(
            f"| {name} | {r['threads']} | {medians} | {r['worst']:.2f} | {r['p99']:.2f} | "
            f"{r['over_2x']} of {r['calls']} | {c['involuntary switch']} | "
            f"{c['voluntary switch']} | {c['page fault']} | {c['collection']} | "
            f"{r['none_of_these']} |"
        )


if __name__ == "__main__":
    main()
