"""The time between paced calls that no call timer sees: a start's hidden waits.

bench/models.py and bench/stalls.py time each call from its start. A serving thread that
cannot get the GIL (or a CPU) between two calls, while a saved trace loads, say, starts
its next call late, and no call shows it; a request arriving then waits all the same.
bench/stalls.py saw 0.7-1.4 s between the first calls of warm BERT starts on an H100
(2026-12-05), but it reads `/proc` for every thread between calls. This bench does
nothing between calls but `time.sleep(--pace-ms)`: each gap is the time from one call's
end to the next one's start, less the pacing, and the largest are printed with when
they came and the call after them.

    python bench/call_gaps.py --store DIR [--model bert] [--seconds 8] [--cold]
    python bench/call_gaps.py --device cuda --dtype fp16 --preset issue --store DIR

`--cold` waits for the plan after the paced calls, so that the next run on the same
store is a warm start. On CUDA every call ends waiting for its stream.
`--profile-load N` runs the saved traces' load (a warm start's) under cProfile in
whichever thread loads them and prints its N costliest functions (cumulative and own
time) after the calls: what a warm start does while its calls wait.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import time
from typing import Any

from models import DTYPES, _build

SIZES = (1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True, help="artifact store; run twice for warm")
    parser.add_argument("--model", default="bert")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--preset", default="tiny", choices=("tiny", "issue"))
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--pace-ms", type=float, default=10.0)
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="wait for the plan at the end")
    parser.add_argument("--profile-load", type=int, default=0, metavar="N")
    opts = parser.parse_args()

    import torch

    import pwdaemon as pwd

    profiles = _profile_loads() if opts.profile_load else []
    device = torch.device(opts.device)
    # The call's stream, as bench/models.py waits for it.
    sync = (
        torch.cuda.current_stream(device).synchronize if device.type == "cuda" else (lambda: None)
    )
    model, inputs = _build(opts.model, opts.preset, device, getattr(torch, DTYPES[opts.dtype]))
    calls = {n: inputs(n) for n in SIZES}
    handle = pwd.attach(model, sizes=list(SIZES), store=opts.store)
    rows: list[tuple[float, float, float, int]] = []  # (at s, gap ms, call ms, size)
    t0 = time.perf_counter()
    end = t0
    with torch.inference_mode():
        while time.perf_counter() - t0 < opts.seconds:
            size = SIZES[len(rows) % len(SIZES)]
            args, kwargs = calls[size]
            start = time.perf_counter()
            model(*args, **kwargs)
            sync()
            done = time.perf_counter()
            gap = (start - end) * 1e3 - (opts.pace_ms if rows else 0.0)
            rows.append((start - t0, gap, (done - start) * 1e3, size))
            end = done
            time.sleep(opts.pace_ms / 1e3)
    if opts.cold:
        handle.wait(timeout=600)
    handle.detach()
    print(f"{len(rows)} calls in {opts.seconds:g} s, paced {opts.pace_ms:g} ms")
    print("| at s | gap beyond the pacing ms | the call after it ms |")
    print("|---|---|---|")
    for at, gap, took, _ in sorted(rows, key=lambda r: -r[1])[: opts.top]:
        print(f"| {at:.2f} | {gap:.1f} | {took:.1f} |")
    for size in SIZES:
        calls_ms = [took for _, _, took, n in rows if n == size]
        median, worst = statistics.median(calls_ms), max(calls_ms)
        print(f"size {size}: median {median:.2f} ms, worst {worst:.1f} ms")
    for profile in profiles:
        stats = pstats.Stats(profile)
        for order in ("cumulative", "tottime"):
            print(f"saved-trace load, by {order} time:")
            stats.sort_stats(order).print_stats(opts.profile_load)


def _profile_loads() -> list[cProfile.Profile]:
    """Runs every saved-trace load under its own profiler (in the loading thread)."""
    from pwdaemon.serving.saved_slot import SavedTraceSlot

    profiles: list[cProfile.Profile] = []
    load = SavedTraceSlot.load

    def profiled(self: SavedTraceSlot, *args: Any, **kwargs: Any) -> Any:
        profile = cProfile.Profile()
        profiles.append(profile)
        return profile.runcall(load, self, *args, **kwargs)

    SavedTraceSlot.load = profiled  # type: ignore[method-assign]
    return profiles


if __name__ == "__main__":
    main()
