"""transformers' `generate()` on a causal LM: how soon each system serves it compiled.

A server calls `model.generate()` request after request; each generation calls the model
once for the prompt and once per new token, with a `DynamicCache` it fills in place. For
each model (tiny config, CPU, random weights, greedy, batch 2, prompt 6, in a fresh
process per system, under `torch.inference_mode()`), generations back to back, nothing
waited for, until the system is steady, then `--steady` more:

- eager: the model as it is (the baseline for ms per token).
- torch.compile: `model.forward = torch.compile(model.forward)` (Inductor, `dynamic=None`,
  the default): compiles on the calls that need it; steady once a generation compiled
  nothing (dynamo's `unique_graphs` unchanged).
- pwdaemon: `pwd.attach(model)` (background trace, one compile worker, no store): steady
  once its plan completed and a generation had no call that no piece served.

Columns: the first generation's seconds (what the first request waits), generations and
seconds until steady, the slowest generation on the way, steady ms per new token (median
over the steady generations) and its ratio to eager's. The machine is noisy: medians.

    python bench/generate.py [--models gpt2,llama] [--new-tokens 16] [--steady 8]
                             [--max-seconds 300]

Prints a markdown table (the README quotes it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from typing import Any

SYSTEMS = ("eager", "torch.compile", "pwdaemon")
BATCH, PROMPT, VOCAB = 2, 6, 100


def _build(name: str) -> Any:
    from pwdaemon.real_models import causal_lm

    return causal_lm(name, VOCAB)


def child(name: str, system: str, new_tokens: int, steady: int, max_s: float) -> dict[str, Any]:
    import torch
    from torch._dynamo.utils import counters

    import pwdaemon as pwd
    from pwdaemon.serving.gate import GATE

    model = _build(name)
    prompt = torch.randint(1, VOCAB, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0))
    handle = None
    if system == "torch.compile":
        model.forward = torch.compile(model.forward)
    elif system == "pwdaemon":
        handle = pwd.attach(model, compiler=pwd.CompileConfig(workers=1), store=False)

    def generate() -> float:
        start = time.perf_counter()
        model.generate(prompt, max_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
        return time.perf_counter() - start

    def is_steady(graphs_before: int, misses_before: int) -> bool:
        if system == "eager":
            return True
        if system == "torch.compile":
            return counters["stats"]["unique_graphs"] == graphs_before
        assert handle is not None
        tracer = handle._tracer
        status = handle.status()
        return (
            tracer.settled
            and tracer.miss_calls == misses_before
            and status.plan_complete
            # Pieces traced after the plan have compiles of their own: none left.
            and status.queue_depth == 0
            and status.in_flight == 0
            and not any(r.state.value == "hot" for r in tracer.misses.values())
            # Nor any Python work of pwdaemon's in this process (a hot input's trace
            # thread ending, a load): serving calls still make way for it.
            and GATE.working == 0
        )

    seconds: list[float] = []
    steady_at: int | None = None
    start = time.monotonic()
    with torch.inference_mode():
        while time.monotonic() - start < max_s:
            graphs = counters["stats"]["unique_graphs"]
            misses = handle._tracer.miss_calls if handle is not None else 0
            seconds.append(generate())
            if is_steady(graphs, misses) and (system == "eager" or len(seconds) > 1):
                steady_at = len(seconds)
                break
        until_s = time.monotonic() - start
        timed = [generate() for _ in range(steady)] if steady_at is not None else []
    pieces = len(handle.pieces) if handle is not None else None
    if handle is not None:
        handle.detach()
    return {
        "model": name,
        "system": system,
        "first_s": seconds[0],
        "steady_at": steady_at,
        "until_s": until_s if steady_at is not None else None,
        "worst_s": max(seconds),
        "ms_per_token": statistics.median(timed) * 1e3 / new_tokens if timed else None,
        "graphs": counters["stats"]["unique_graphs"] if system == "torch.compile" else pieces,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="gpt2,llama")
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--steady", type=int, default=8, help="generations timed once steady")
    p.add_argument("--max-seconds", type=float, default=300.0, help="per system, to steady")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        name, system = a.child.split(":", 1)
        print(json.dumps(child(name, system, a.new_tokens, a.steady, a.max_seconds)))
        return
    rows = []
    for name in a.models.split(","):
        for system in a.systems.split(","):
            cmd = [sys.executable, __file__, "--child", f"{name}:{system}",
                   "--new-tokens", str(a.new_tokens), "--steady", str(a.steady),
                   "--max-seconds", str(a.max_seconds)]  # fmt: skip
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=a.max_seconds + 600)
            if done.returncode != 0:
                print(f"{name} {system}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
                continue
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(
        f"batch {BATCH}, prompt {PROMPT}, {a.new_tokens} new tokens, greedy; "
        f"{a.steady} generations timed once steady\n"
    )
    print(
        "| model | system | first generation s | generations (s) until steady "
        "| slowest generation s | steady ms/token | ÷ eager | graphs or pieces |"
    )
    print("|---" * 8 + "|")
    eager = {r["model"]: r["ms_per_token"] for r in rows if r["system"] == "eager"}
    for r in rows:
        until = "never" if r["steady_at"] is None else f"{r['steady_at']} ({r['until_s']:.1f})"
        ms = r["ms_per_token"]
        base = eager.get(r["model"])
        ratio = f"{ms / base:.2f}" if ms and base else "-"
        print(
            f"| {r['model']} | {r['system']} | {r['first_s']:.2f} | {until} "
            f"| {r['worst_s']:.2f} | {'-' if ms is None else f'{ms:.2f}'} | {ratio} "
            f"| {'-' if r['graphs'] is None else r['graphs']} |"
        )


if __name__ == "__main__":
    main()
