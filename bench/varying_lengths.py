"""A transformer sized on its batch whose lengths vary too: pieces, and calls left eager.

A server that attaches BERT, GPT-2 or Llama with the default size (dim 0, the batch)
sends batches of every length. For each model (tiny config, CPU, random weights, in a
fresh process each, under `torch.inference_mode()`): one stream of calls, batch drawn
from 1, 2, 3, 4, 6, 8 and length from 5, 7, 9, 12, 16, 23, 31 (seeded), replayed in
rounds. Between rounds the run waits for the hot inputs' background traces to end.

- pwdaemon (`pwd.attach(model, compile=False)`: capture only, no compiles): pieces at
  the end, calls that no piece served (eager) in the first round and in the last, and
  the seconds until a round ran with none.
- torch.compile (`dynamic=None`, the default, `backend="eager"`) over the same stream:
  graphs dynamo made (automatic dynamic makes the length dynamic at the second one).
- `--compile`: pwdaemon with real workers instead, waited for until its plan completes
  (10 minutes at most) after the rounds: pieces whose every compile failed, so that they
  serve eager for good ("on eager after plan").

    python bench/varying_lengths.py [--models bert,gpt2,llama] [--calls 200] [--rounds 4]
                                    [--compile]

Prints a markdown table (the README quotes it).
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from typing import Any

BATCHES = (1, 2, 3, 4, 6, 8)
LENGTHS = (5, 7, 9, 12, 16, 23, 31)


def _stream(calls: int) -> list[tuple[int, int]]:
    rng = random.Random(0)
    return [(rng.choice(BATCHES), rng.choice(LENGTHS)) for _ in range(calls)]


def child(name: str, calls: int, rounds: int, compile: bool) -> dict[str, Any]:
    import torch

    import pwdaemon as pwd
    from pwdaemon.real_models import model_spec, sequence_inputs

    torch.manual_seed(0)
    model = model_spec(name, "tiny").build(torch.device("cpu"), torch.float32)
    stream = _stream(calls)

    def call(batch: int, length: int) -> dict[str, torch.Tensor]:
        return sequence_inputs(model, length, torch.device("cpu"), batch=batch)[1]

    graphs = 0

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        nonlocal graphs
        graphs += 1
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    with torch.inference_mode():
        for batch, length in stream:
            compiled(**call(batch, length))
    torch._dynamo.reset()

    workers = pwd.CompileConfig(workers=1, start_timeout_s=300)
    h = pwd.attach(model, compile=compile, compiler=workers, store=False)
    tracer = h._tracer
    eager_per_round: list[int] = []
    settled_s: float | None = None
    start = time.monotonic()
    with torch.inference_mode():
        model(**call(*stream[0]))
        h.wait_traced(300)
        for _ in range(rounds):
            before = tracer.miss_calls
            for batch, length in stream:
                model(**call(batch, length))
            eager_per_round.append(tracer.miss_calls - before)
            if eager_per_round[-1] == 0 and settled_s is None:
                settled_s = time.monotonic() - start
            # The hot inputs' traces run in the background: wait for each to end (a
            # call of a hot input starts the next one).
            deadline = time.monotonic() + 600
            while any(r.state.value == "hot" for r in tracer.misses.values()):
                tracer.miss.traced.wait(60)
                if time.monotonic() > deadline:
                    break
                for batch, length in stream:
                    model(**call(batch, length))
    pieces = list(h.pieces)
    plan_complete = h.wait(timeout=600) if compile else None
    on_eager = sum(p.on_eager_reason is not None for p in h.status().pieces) if compile else None
    h.detach()
    return {
        "model": name,
        "pieces": len(pieces),
        "length_dynamic": sum(bool(p.facts.extra_symbols) for p in pieces),
        "strategy": sorted({p.strategy.value for p in pieces}),
        "eager_first": eager_per_round[0],
        "eager_last": eager_per_round[-1],
        "settled_s": settled_s,
        "torch_compile_graphs": graphs,
        "plan_complete": plan_complete,
        "on_eager": on_eager,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="bert,gpt2,llama")
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--compile", action="store_true", help="real workers; pieces left on eager")
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.calls, a.rounds, a.compile)))
        return
    rows = []
    for name in a.models.split(","):
        cmd = [sys.executable, __file__, "--child", name, "--calls", str(a.calls),
               "--rounds", str(a.rounds)] + (["--compile"] if a.compile else [])  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            print(f"{name}: failed\n{done.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    mode = "real workers" if a.compile else "capture only"
    print(f"{a.calls} calls per round, {a.rounds} rounds, {mode}\n")
    head = (
        "| model | pieces (length dynamic) | torch.compile graphs | eager calls, round 1 "
        "| eager calls, last round | seconds to a round with none |"
    )
    print(head + (" on eager after plan |" if a.compile else ""))
    print("|---" * (7 if a.compile else 6) + "|")
    for r in rows:
        settled = "never" if r["settled_s"] is None else f"{r['settled_s']:.1f}"
        line = (
            f"| {r['model']} | {r['pieces']} ({r['length_dynamic']}) "
            f"| {r['torch_compile_graphs']} | {r['eager_first']} | {r['eager_last']} "
            f"| {settled} |"
        )
        if a.compile:
            complete = "" if r["plan_complete"] else " (plan not complete)"
            line += f" {r['on_eager']}{complete} |"
        print(line)


if __name__ == "__main__":
    main()
