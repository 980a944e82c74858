"""What each order of shape strategies costs a model's trace, on this torch.

pwdaemon traces a model with the strategies of `pwdaemon.serving.strategy.ORDER` in turn
until one captures it: unbacked, then backed_oblivious, on torch 2.12 and 2.13;
backed_oblivious alone on 2.11, where the unbacked trace of transformers' BERT, GPT-2 and
Llama fails at attention (`Eq(u0, 1)`; so it does on 2.12, which keeps unbacked first for
generate()'s sake: see strategy.py). This bench makes the same calls on a fresh process
per model and order (`trace="inline"`, no compiles, no store): the seconds the calls took, most of
it tracing, the strategies tried and how each ended, the pieces (the sizes each served)
and whether every output equalled eager's (every tensor of it within 1e-4).

    python bench/strategies.py --models bert,gpt2,llama,sequential,demo
    /path/to/torch-2.11/python bench/strategies.py   # another torch, same table
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from typing import Any

from matrix import _max_diff
from models import _build

ORDERS = ("default", "unbacked,backed_oblivious", "backed_oblivious")
CALLS = (1, 4, 16, 1, 7, 4)
TOLERANCE = 1e-4


def child(model_name: str, order_name: str) -> dict[str, Any]:
    import copy

    import torch

    import pwdaemon as pwd
    from pwdaemon.serving import strategy
    from pwdaemon.serving.strategy import ShapeStrategy

    if order_name != "default":
        strategy.ORDER = tuple(ShapeStrategy(s) for s in order_name.split(","))
    cpu = torch.device("cpu")
    model, inputs = _build(model_name, "tiny", cpu, torch.float32)
    reference = copy.deepcopy(model)
    equal = True
    with (
        pwd.attach(model, compile=False, store=False, trace="inline") as handle,
        torch.inference_mode(),
    ):
        start = time.perf_counter()
        outputs = []
        for n in CALLS:
            args, kwargs = inputs(n)
            outputs.append((model(*args, **kwargs), args, kwargs))
        seconds = time.perf_counter() - start
        for got, args, kwargs in outputs:
            equal &= _max_diff(got, reference(*args, **kwargs)) <= TOLERANCE
        status = handle.status()
        return {
            "seconds": seconds,
            "attempts": [f"{a.strategy.value} {a.outcome.value}" for a in status.trace.attempts],
            "pieces": [sorted(p.dispatcher.histogram()) for p in handle.pieces],
            "misses": sum(r.calls for r in handle._tracer.misses.values()),
            "equal": equal,
            "torch": torch.__version__,
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="bert,gpt2,llama,sequential,demo")
    parser.add_argument("--orders", default=";".join(ORDERS), help="';'-separated")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        print(json.dumps(child(*opts.child)))
        return
    print(f"calls of sizes {', '.join(map(str, CALLS))}, trace inline, fp32, tiny configs\n")
    print("| torch | model | order | calls s | attempts | pieces (sizes each) | misses | = eager |")
    print("|---|---|---|---|---|---|---|---|")
    for model_name in opts.models.split(","):
        for order_name in opts.orders.split(";"):
            run = subprocess.run(
                [sys.executable, __file__, "--child", model_name, order_name],
                capture_output=True,
                text=True,
                check=False,
            )
            if run.returncode != 0:
                tail = run.stderr.strip().splitlines()[-1:] or ["?"]
                print(f"| ? | {model_name} | {order_name} | failed: {tail[0][:120]} |||||")
                continue
            row = json.loads(run.stdout.strip().splitlines()[-1])
            print(
                f"| {row['torch']} | {model_name} | {order_name} | {row['seconds']:.2f} |"
                f" {'; '.join(row['attempts'])} | {row['pieces']} | {row['misses']} |"
                f" {'yes' if row['equal'] else 'NO'} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
