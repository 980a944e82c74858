"""How long dynamo's trace of a model takes in pwdaemon, with and without traffic.

Each mode runs in a fresh process (imports included, as after a restart) and prints when
each size first ran on each tier, and pwdaemon's own log lines (strategy fallbacks,
pieces captured) with milliseconds since the process started:

- `inline`: `attach(trace="inline")`; the first call traces and waits for it.
- `idle`: the default background trace after three calls, then no traffic.
- `paced`: the default background trace under calls 10 ms apart (sizes round-robin): the
  trace parks while calls run (see `pwdaemon.serving.gate`).

Nothing is compiled (`compile=False`): the time is dynamo's, every strategy it tried
included. Pass `--store DIR` twice (a run, then another) to see a restart that skips a
strategy the first run saw fail.

    python bench/trace_phases.py --model bert --device cuda --modes inline,idle,paced
    python bench/trace_phases.py --model bert            # the tiny preset on this CPU
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
PACE_S = 0.01  # as bench/models.py's warm-up
SIZES = (1, 4, 16)


def child(opts: argparse.Namespace) -> None:
    import torch

    sys.path.insert(0, str(HERE))
    from models import DTYPES, _build, _timer, serving_tiers

    import pwdaemon as pwd

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(relativeCreated)8.0f ms %(threadName)-17s %(message).160s",
    )
    logging.getLogger("torch").setLevel(logging.ERROR)
    device = torch.device(opts.device)
    model, inputs = _build(opts.model, opts.preset, device, getattr(torch, DTYPES[opts.dtype]))
    calls = {n: inputs(n) for n in SIZES}
    timed = _timer(device)

    def call(n: int) -> float:
        return timed(lambda: model(*calls[n][0], **calls[n][1]))

    store: Any = opts.store or False
    with torch.inference_mode():
        for n in SIZES:  # the plain module once per size, as a server would have
            call(n)
        t0 = time.perf_counter()
        if opts.mode == "inline":
            handle = pwd.attach(model, compile=False, store=store, trace="inline")
            for n in SIZES:
                print(f"inline: a call of size {n} took {call(n):.2f} s", flush=True)
        else:
            handle = pwd.attach(model, compile=False, store=store)
            seen: dict[int, str] = {}
            traced = False
            i = 0
            while time.perf_counter() - t0 < opts.limit_s:
                if not traced and handle.wait_traced(0):
                    traced = True
                    print(f"{opts.mode}: {time.perf_counter() - t0:7.2f} s traced", flush=True)
                    if opts.mode == "idle":  # the other sizes' pieces wait for their calls
                        break
                n = SIZES[i % len(SIZES)]
                i += 1
                took = call(n) if opts.mode == "paced" or i <= len(SIZES) else 0.0
                tier = serving_tiers(handle, n) or "untraced"
                if seen.get(n) != tier:
                    seen[n] = tier
                    at = time.perf_counter() - t0
                    print(f"{opts.mode}: {at:7.2f} s size {n} on {tier} ({took * 1e3:.1f} ms)")
                if all(seen.get(m, "untraced") != "untraced" for m in SIZES):
                    break
                time.sleep(PACE_S)  # traffic pacing (not a sync)
        print(f"{opts.mode}: done {time.perf_counter() - t0:.2f} s after attach", flush=True)
        print(handle.status(), flush=True)
        handle.detach()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="bert")
    p.add_argument("--preset", default=None, help="default: issue on cuda, tiny on cpu")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: fp16 on cuda, fp32 on cpu")
    p.add_argument("--modes", default="inline,idle,paced")
    p.add_argument("--store", default=None, help="an artifact store (default: none)")
    p.add_argument("--limit-s", type=float, default=120.0, help="per mode")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", default="", help=argparse.SUPPRESS)
    opts = p.parse_args()
    cuda = opts.device.startswith("cuda")
    opts.dtype = opts.dtype or ("fp16" if cuda else "fp32")
    opts.preset = opts.preset or ("issue" if cuda else "tiny")
    if opts.child:
        child(opts)
        return
    for mode in opts.modes.split(","):
        cmd = [
            sys.executable, __file__, "--child", "--mode", mode, "--model", opts.model,
            "--preset", opts.preset, "--device", opts.device, "--dtype", opts.dtype,
            "--limit-s", str(opts.limit_s),
        ]  # fmt: skip
        if opts.store:
            cmd += ["--store", opts.store]
        print(f"=== {mode}", flush=True)
        subprocess.run(cmd, timeout=opts.limit_s + 300, check=False)


if __name__ == "__main__":
    main()
