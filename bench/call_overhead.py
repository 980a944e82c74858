"""Where a pwdaemon call's time goes once its size is at its best tier.

One process per model: pwdaemon attached to the model, every size waited for at its
best tier (CUDA graphs on a GPU, the size's compile on a CPU), then each part of the
serving path timed on its own, in the same process, beside the whole call:

- `call`: `model(...)` through pwdaemon (what a server pays);
- `eager`: the same call on a plain copy of the model;
- `guard check`: dynamo's guard check of the cache entry that serves the call (host
  time, no sync), and `marks`: pwdaemon's size marks on the call's inputs;
- `direct`: the cache entry's compiled code called as a plain function (no guard
  check, no size marks: what a call costs without dynamo in front);
- `call, saved trace` and `saved guard check`: the call and its guard check in a second
  attach of a copy of the model that loaded the trace the first one saved
  (`pwdaemon.serving.saved_trace`), at the same tier;
- on CUDA, the graph runnable's parts: `replay` alone, `runnable` (input copies, replay,
  output copies), and the output copies per method (`clone` each, `_foreach_clone`).

    python bench/call_overhead.py [--models bert,llama] [--sizes 1,4,16] [--device cuda]
                                  [--preset issue] [--dtype fp16] [--iters 200]

Prints one markdown table, median microseconds per item (synchronised per call where a
GPU does the work).
"""

from __future__ import annotations

import argparse
import copy
import shutil
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from models import DTYPES, _build, _timer  # noqa: E402


def _host_us(fn: Callable[[], Any], iters: int) -> float:
    """Median host time of `fn` in microseconds, in blocks of 10 calls."""
    for _ in range(10):
        fn()
    blocks = []
    for _ in range(max(1, iters // 10)):
        t0 = time.perf_counter()
        for _ in range(10):
            fn()
        blocks.append((time.perf_counter() - t0) / 10)
    return statistics.median(blocks) * 1e6


def measure(model_name: str, opts: argparse.Namespace) -> list[tuple[str, int, str, float]]:
    import torch

    import pwdaemon as pwd
    from pwdaemon.serving.direct import piece_entry

    device, dtype = torch.device(opts.device), getattr(torch, DTYPES[opts.dtype])
    sizes = [int(s) for s in opts.sizes.split(",")]
    model, inputs = _build(model_name, opts.preset, device, dtype)
    eager = copy.deepcopy(model)
    calls = {n: inputs(n) for n in sizes}
    timed = _timer(device)
    tier = pwd.Tier.GRAPH if device.type == "cuda" else pwd.Tier.SIZE
    rows: list[tuple[str, int, str, float]] = []

    def add(n: int, item: str, us: float) -> None:
        rows.append((model_name, n, item, us))

    def gpu_us(fn: Callable[[], Any]) -> float:
        for _ in range(10):
            timed(fn)
        return statistics.median(timed(fn) for _ in range(opts.iters)) * 1e6

    def settle(handle: pwd.Handle, model: Any) -> None:
        handle.wait_traced(opts.timeout)
        deadline = time.monotonic() + opts.timeout
        while time.monotonic() < deadline:
            for n in sizes:
                model(*calls[n][0], **calls[n][1])
            if handle.wait(sizes=sizes, tier=tier, timeout=0.05):
                break

    store = tempfile.mkdtemp(prefix="pwdaemon-call-overhead-")
    loaded_model = copy.deepcopy(model)
    with torch.inference_mode(), pwd.attach(model, sizes=sizes, store=store) as handle:
        settle(handle, model)
        tracer = handle._tracer
        attempt = tracer._attempt
        for n in sizes:
            args, kwargs = calls[n]
            add(n, "call", gpu_us(lambda: model(*args, **kwargs)))  # noqa: B023
            add(n, "eager", gpu_us(lambda: eager(*args, **kwargs)))  # noqa: B023
            tracer.marks.mark(args, kwargs, attempt.strategy)
            f_locals = {"args": args, "kwargs": kwargs}
            pieces = [p for p in handle.pieces if n in p.dispatcher.counts]
            entry = piece_entry(attempt.entry, pieces[-1].dispatcher, f_locals) if pieces else None
            if entry is None:
                add(n, "no cache entry serves it", float("nan"))
                continue
            check = entry.guard_manager.check
            add(n, "guard check", _host_us(lambda: check(f_locals), opts.iters))  # noqa: B023
            marks = tracer.marks.mark
            add(n, "marks", _host_us(lambda: marks(args, kwargs, attempt.strategy), opts.iters))  # noqa: B023
            direct = types.FunctionType(entry.code, attempt.entry.__globals__)
            add(n, "direct", gpu_us(lambda: direct(*args, **kwargs)))  # noqa: B023
            runnable: Any = pieces[-1].dispatcher.table.lookup(n).runnable if pieces else None
            if device.type != "cuda" or not hasattr(runnable, "graph"):
                continue
            sample = pieces[-1].dispatcher.samples[n]
            outs = [o for o in runnable.static_out if isinstance(o, torch.Tensor)]
            add(n, f"output tensors: {len(outs)}", float(len(outs)))
            add(n, "replay", gpu_us(runnable.graph.replay))
            add(n, "runnable", gpu_us(lambda: runnable(*sample)))  # noqa: B023
            add(n, "clone each", gpu_us(lambda: [o.clone() for o in outs]))  # noqa: B023
            if hasattr(torch, "_foreach_clone"):
                add(n, "_foreach_clone", gpu_us(lambda: torch._foreach_clone(outs)))  # noqa: B023
    torch._dynamo.reset()
    # Fresh inputs: the marks put on `calls` above would fail the saved guards (a loaded
    # trace is called with unmarked tensors), and every call would be a miss.
    calls = {n: inputs(n) for n in sizes}
    with torch.inference_mode(), pwd.attach(loaded_model, sizes=sizes, store=store) as handle:
        settle(handle, loaded_model)
        traces = handle._tracer.saved.loaded
        loaded = traces[0] if traces else None
        for n in sizes:
            args, kwargs = calls[n]
            if loaded is None:
                add(n, f"saved trace {handle._tracer.saved_trace.value}", float("nan"))
                continue
            add(n, "call, saved trace", gpu_us(lambda: loaded_model(*args, **kwargs)))  # noqa: B023
            check = loaded.guard_check
            add(n, "saved guard check", _host_us(lambda: check(*args, **kwargs), opts.iters))  # noqa: B023
    shutil.rmtree(store, ignore_errors=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default="bert,llama")
    p.add_argument("--sizes", default="1,4,16")
    p.add_argument("--preset", default="tiny", choices=("tiny", "issue"))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--timeout", type=float, default=240.0)
    opts = p.parse_args()
    import torch

    print(f"{time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, "
          f"`python bench/call_overhead.py {' '.join(sys.argv[1:])}`\n")  # fmt: skip
    print("| model | size | item | µs |\n|---|---|---|---|")
    for name in opts.models.split(","):
        for model_name, n, item, us in measure(name, opts):
            print(f"| {model_name} | {n} | {item} | {us:.1f} |", flush=True)


if __name__ == "__main__":
    main()
