"""Tier 3 on a GPU: per-size latency of pwdaemon's CUDA-graph tier against the peers.

The model is the one from the GPU-tier issue: 4 blocks of 2048-wide bf16 linear + GELU
+ LayerNorm. For each size (1, 8, 64, 512, 2048) every system serves the same inputs:

- eager;
- torch.compile with the batch dim marked dynamic (one general graph);
- torch.compile static, mode="reduce-overhead" (per-size compile + CUDA graphs);
- pwdaemon: attach(sizes=...), timed once every size serves at tier 3.

Latency is one call including launch overhead: CUDA events around `model(x)`, median of
many calls after warm-up. Prints a table and the ratio of pwdaemon's speed to
reduce-overhead's (target >= 0.97 per size).

    python bench/cuda_graphs.py [--sizes 1,8,64,512,2048] [--iters 200]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import tempfile
import threading
import time

import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.fc2(torch.nn.functional.gelu(self.fc1(x))))


class BlockModel(nn.Module):
    def __init__(self, width: int = 2048, layers: int = 4) -> None:
        super().__init__()
        self.blocks = nn.Sequential(*(Block(width) for _ in range(layers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def make_model(width: int) -> nn.Module:
    torch.manual_seed(0)
    return BlockModel(width).to("cuda", torch.bfloat16).eval()


def time_calls(fn: object, x: torch.Tensor, iters: int, warmup: int = 20) -> float:
    """Median seconds of one call (events around it, synchronised per call)."""
    call = fn  # type: ignore[assignment]
    for _ in range(warmup):
        call(x)  # type: ignore[operator]
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(iters):
        start.record()
        call(x)  # type: ignore[operator]
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="1,8,64,512,2048")
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    width = args.width
    torch._dynamo.config.cache_size_limit = 64
    torch._dynamo.config.accumulated_cache_size_limit = 512
    inputs = {n: torch.randn(n, width, device="cuda", dtype=torch.bfloat16) for n in sizes}
    results: dict[str, dict[int, float]] = {}
    with torch.no_grad():
        eager = make_model(width)
        results["eager"] = {n: time_calls(eager, inputs[n], args.iters) for n in sizes}

        dyn = torch.compile(make_model(width), dynamic=False)

        def dyn_call(x: torch.Tensor) -> torch.Tensor:
            torch._dynamo.mark_dynamic(x, 0)
            return dyn(x)

        results["compile dynamic"] = {n: time_calls(dyn_call, inputs[n], args.iters) for n in sizes}

        torch._dynamo.reset()
        ro = torch.compile(make_model(width), mode="reduce-overhead", dynamic=False)
        results["reduce-overhead"] = {n: time_calls(ro, inputs[n], args.iters) for n in sizes}

        torch._dynamo.reset()
        import pwdaemon as pwd

        model = make_model(width)
        ready = {n: threading.Event() for n in sizes}
        h = pwd.attach(
            model,
            sizes=sizes,
            store=tempfile.mkdtemp(prefix="pwd-bench-"),
            policy=pwd.PolicyConfig(hot_calls=10**9, budget=len(sizes)),
            compiler=pwd.CompileConfig(workers=2),
        )
        h.on_swap(
            lambda e: ready[e.size].set() if e.tier is pwd.Tier.GRAPH and e.size in ready else None
        )
        # Serve until every size is at tier 3: captures run at the start of serving calls.
        deadline = time.monotonic() + 600
        while not all(ev.is_set() for ev in ready.values()):
            if time.monotonic() > deadline:
                raise SystemExit(f"not every size reached tier 3:\n{h.status()}")
            for n in sizes:
                model(inputs[n])
            torch.cuda.synchronize()
        tiers = {n: h.table().lookup(n).tier.value for n in sizes}
        pauses = list(h.engine.capture_pauses)
        results["pwdaemon tier 3"] = {n: time_calls(model, inputs[n], args.iters) for n in sizes}
        # Correctness of what was timed, against eager (bf16 tolerance).
        for n in sizes:
            torch.testing.assert_close(model(inputs[n]), eager(inputs[n]), atol=5e-2, rtol=5e-2)
        h.detach()

    name = torch.cuda.get_device_name()
    print(
        f"\n{name}, torch {torch.__version__}, {datetime.date.today()}, "
        f"width {width}, bf16, median of {args.iters} calls (us)"
    )
    header = "| system | " + " | ".join(f"n={n}" for n in sizes) + " |"
    print(header)
    print("|" + "---|" * (len(sizes) + 1))
    for system, row in results.items():
        print(f"| {system} | " + " | ".join(f"{row[n] * 1e6:.0f}" for n in sizes) + " |")
    ratio = [results["reduce-overhead"][n] / results["pwdaemon tier 3"][n] for n in sizes]
    print("| pwdaemon speed / reduce-overhead | " + " | ".join(f"{r:.2f}" for r in ratio) + " |")
    print("tiers:", tiers)
    print("capture pause on the serving thread per size (ms):", [f"{p * 1e3:.1f}" for p in pauses])


if __name__ == "__main__":
    main()
