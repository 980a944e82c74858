"""Steady-state speed, paired: every system in one process, their calls interleaved.

`bench/models.py` runs each system in a fresh process, which is what a first request
and a warm-up need, but on a shared machine the steady-state medians of two processes a
minute apart drift by more than the differences measured (BERT eager: 1.13 vs 1.98 ms in
two runs of one session). Here one process per model builds eager, `torch.compile`
dynamic, `torch.compile` static (per size) and pwdaemon (attached to its own copy, every
size waited for at its best tier), warms every system on every size, then times them in
rounds: each round, each system, each size, a block of calls. Drift lands on every
system alike, so the ratios are what the machine can tell apart.

    python bench/paired.py [--models bert,gpt2,...] [--sizes 1,4,16] [--rounds 20]
                           [--block 10] [--device cpu|cuda] [--preset tiny|issue]
                           [--systems eager,static,pwdaemon,...]
                           [--static-mode reduce-overhead|default] [--graphs on|off]

Prints one markdown table (median ms per call, and pwdaemon ÷ static speed). On CUDA,
static is `mode="reduce-overhead"` (`--static-mode default`: no CUDA graphs) and pwdaemon
is waited for at tier 3 (`--graphs off`: tier 2, its CUDA-graph tier disabled). A call
that raises names its system and size on stderr: on an H200, static's cudagraph trees
and pwdaemon's CUDA graphs in one process ended in "unspecified launch failure" (fixed)
(README, "Seen on the GPU").
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from models import DEFAULT_MODELS, DTYPES, _build, _timer, serving_tiers  # noqa: E402

SYSTEMS = ("eager", "dynamic", "static", "pwdaemon_every_call", "pwdaemon")


def child(opts: argparse.Namespace) -> dict[str, Any]:
    import torch

    import pwdaemon as pwd

    device, dtype = torch.device(opts.device), getattr(torch, DTYPES[opts.dtype])
    sizes = [int(s) for s in opts.sizes.split(",")]
    model, inputs = _build(opts.model, opts.preset, device, dtype)
    calls = {n: inputs(n) for n in sizes}
    timed = _timer(device)
    mode = opts.static_mode if device.type == "cuda" else None
    systems = opts.systems.split(",")
    build = {
        "eager": lambda: copy.deepcopy(model),
        "dynamic": lambda: torch.compile(copy.deepcopy(model), dynamic=True),
        "static": lambda: torch.compile(copy.deepcopy(model), dynamic=False, mode=mode),
    }
    fns: dict[str, Any] = {s: build[s]() for s in SYSTEMS if s in systems and s in build}
    # pwdaemon's two guard modes, each attached to a copy of its own
    guards = {"pwdaemon": "rechecked", "pwdaemon_every_call": "every_call"}
    tier = pwd.Tier.GRAPH if device.type == "cuda" and opts.graphs == "on" else pwd.Tier.SIZE
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        handles = {}
        for system in (s for s in SYSTEMS if s in systems and s in guards):
            fns[system] = copy.deepcopy(model)
            handles[system] = stack.enter_context(
                pwd.attach(
                    fns[system],
                    sizes=sizes,
                    store=False,
                    guards=guards[system],
                    graphs=pwd.GraphConfig(enabled=opts.graphs == "on"),
                )
            )
        reached = []
        for system, h in handles.items():
            m = fns[system]
            first = calls[sizes[0]]
            m(*first[0], **first[1])
            h.wait_traced(opts.timeout)
            for _ in range(int(opts.timeout / 0.05)):  # serve until every size is at `tier`
                for n in sizes:
                    m(*calls[n][0], **calls[n][1])
                if h.wait(sizes=sizes, tier=tier, timeout=0.05):
                    break
            reached.append(h.wait(sizes=sizes, tier=tier, timeout=0))
        ok = all(reached)
        for fn in fns.values():  # warm: static compiles each size here, graphs capture
            for _ in range(3):
                for n in sizes:
                    fn(*calls[n][0], **calls[n][1])
        samples: dict[str, dict[int, list[float]]] = {s: {n: [] for n in sizes} for s in fns}
        for _ in range(opts.rounds):
            for system, fn in fns.items():
                for n in sizes:
                    args, kwargs = calls[n]
                    try:
                        samples[system][n] += [
                            timed(lambda: fn(*args, **kwargs))  # noqa: B023 (called at once)
                            for _ in range(opts.block)
                        ]
                    except Exception:
                        # A CUDA fault surfaces at the next synchronize: say whose it was.
                        print(f"paired: {system} at size {n} raised", file=sys.stderr)
                        raise
        shown = handles.get("pwdaemon") or next(iter(handles.values()), None)
        tiers = {str(n): serving_tiers(shown, n) if shown else "-" for n in sizes}
    return {
        "model": opts.model,
        "reached_tier": ok,
        "pwdaemon_tiers": tiers,
        "ms": {
            system: {str(n): statistics.median(v) * 1e3 for n, v in per_size.items()}
            for system, per_size in samples.items()
        },
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS))
    p.add_argument("--sizes", default="1,4,16")
    p.add_argument("--preset", default="tiny", choices=("tiny", "issue"))
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--block", type=int, default=10, help="calls per system and size a round")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--systems", default=",".join(SYSTEMS), help=f"a subset of {','.join(SYSTEMS)}")
    p.add_argument(
        "--static-mode",
        default="reduce-overhead",
        choices=("reduce-overhead", "default"),
        help="torch.compile mode of `static` on CUDA (reduce-overhead: cudagraph trees)",
    )
    p.add_argument(
        "--graphs", default="on", choices=("on", "off"), help="pwdaemon's CUDA-graph tier"
    )
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    opts = p.parse_args()
    unknown = sorted(set(opts.systems.split(",")) - set(SYSTEMS))
    if unknown:
        p.error(f"--systems: unknown {','.join(unknown)} (systems: {','.join(SYSTEMS)})")
    if opts.child:
        print(json.dumps(child(opts)), flush=True)
        return
    rows = []
    for model in opts.models.split(","):
        cmd = [sys.executable, __file__, "--child", "--model", model, "--device", opts.device,
               "--sizes", opts.sizes, "--preset", opts.preset, "--dtype", opts.dtype,
               "--rounds", str(opts.rounds), "--block", str(opts.block),
               "--timeout", str(opts.timeout), "--systems", opts.systems,
               "--static-mode", opts.static_mode, "--graphs", opts.graphs]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=opts.timeout * 3)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if not lines:
            rows.append({"model": model, "error": proc.stderr.strip().splitlines()[-1:]})
        else:
            rows.append(json.loads(lines[-1]))
        print(f"{model}: done", file=sys.stderr, flush=True)
    import torch

    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    cpu = f"CPU, {os.cpu_count()} cores"
    where = torch.cuda.get_device_name() if opts.device == "cuda" else cpu
    print(f"{stamp}, {where}, torch {torch.__version__}, `python bench/paired.py --device "
          f"{opts.device} --models {opts.models} --sizes {opts.sizes} --preset {opts.preset} "
          f"--dtype {opts.dtype} --rounds {opts.rounds} --block {opts.block}`\n")  # fmt: skip
    timed = [s for s in SYSTEMS if s in opts.systems.split(",")]
    print(f"| model | size | {' | '.join(timed)} | pwdaemon tier | pwdaemon ÷ static speed |")
    print("|---|---|" + "---|" * (len(timed) + 2))
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error']} |" + " |" * (len(timed) + 1))
            continue
        for n in opts.sizes.split(","):
            ms = [r["ms"][s][n] for s in timed]
            both = "static" in r["ms"] and "pwdaemon" in r["ms"]
            ratio = f"{r['ms']['static'][n] / r['ms']['pwdaemon'][n]:.2f}" if both else "-"
            cells = " | ".join(f"{v:.3f}" for v in ms)
            tier = r["pwdaemon_tiers"][n] + ("" if r["reached_tier"] else " (not all ready)")
            print(f"| {r['model']} | {n} | {cells} | {tier} | {ratio} |")


if __name__ == "__main__":
    main()
