"""The real-model matrix in one run: pieces, strategy, retraces, specialization, accuracy.

For each model of `pwdaemon.real_models`, on the device given, under
`torch.inference_mode()`, in a fresh process each:

1. plain `torch.compile(model, dynamic=True, backend="eager")` over sizes 1, 2, 8, 1, 5:
   graphs dynamo made (the peer's piece count);
2. `pwd.attach(model)` with real workers: the same sizes traced (pieces, strategy per
   piece, dynamo's unique graphs, recompiles, graph breaks), then sizes 1, 2, 8 waited
   for (`handle.wait`), the tier each serves, and the largest difference from eager over
   those sizes.

    python bench/matrix.py [--device cuda] [--dtype fp16] [--preset tiny|issue]
                           [--dim batch|sequence]

`--dim sequence` sizes the transformers models on their sequence dim instead (batch 2,
`dynamic={"input_ids": 1, "attention_mask": 1}`, as a server that batches requests by
length calls them; the other models keep dim 0): the sizes are then lengths.

Prints a markdown table (the one the README and the closing notes quote).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

SIZES = (1, 2, 8, 1, 5)
SPECIALIZE = (1, 2, 8)
DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _max_diff(a: Any, b: Any) -> float:
    import torch

    def flat(o: Any) -> list[torch.Tensor]:
        if isinstance(o, torch.Tensor):
            return [o]
        if hasattr(o, "to_tuple"):
            o = o.to_tuple()
        if isinstance(o, tuple | list):
            return [t for x in o for t in flat(x)]
        return []

    return max(
        (float((x.float() - y.float()).abs().max()) for x, y in zip(flat(a), flat(b), strict=True)),
        default=0.0,
    )


def _serves(piece: Any, n: int) -> bool:
    """Whether `piece` serves size `n`: it counted a call of it, or it has no size of its
    own and was captured at `n` (pinned to it: counted under key 0). A piece of size
    arithmetic alone (`tensor_free`) is left out: eager is all it has, by design."""
    if piece.tensor_free:
        return False
    if piece.size_index is None:
        return bool(piece.traced_size == n)
    return n in piece.dispatcher.counts


def _key(piece: Any, n: int) -> int:
    # A piece without a size symbol dispatches every call under size 0.
    return 0 if piece.size_index is None else n


def child(
    name: str, device_name: str, dtype_name: str, preset: str, timeout: float, dim: str
) -> None:
    import torch
    from torch._dynamo.utils import counters

    import pwdaemon as pwd
    from pwdaemon.real_models import SEQUENCE_DIMS, model_spec, sequence_inputs

    device, dtype = torch.device(device_name), getattr(torch, DTYPES[dtype_name])
    if os.environ.get("MHA_FASTPATH") == "off":
        # torch's fused TransformerEncoderLayer/MultiheadAttention kernels have no fake
        # tensor support on CUDA: nothing is captured unless the fast path is off.
        torch.backends.mha.set_fastpath_enabled(False)
    spec = model_spec(name, preset)
    out: dict[str, Any] = {"model": name}
    sequence = dim == "sequence" and spec.needs_transformers
    with torch.inference_mode():
        ref = spec.build(device, dtype)
        if sequence:
            calls = {n: sequence_inputs(ref, n, device) for n in set(SIZES)}
        else:
            calls = {n: spec.inputs(n, device, dtype) for n in set(SIZES)}
        eager = {n: ref(*calls[n][0], **calls[n][1]) for n in calls}
        torch._dynamo.reset()
        peer = torch.compile(spec.build(device, dtype), dynamic=True, backend="eager")
        for n in SIZES:
            peer(*calls[n][0], **calls[n][1])
        out["peer_graphs"] = counters["stats"]["unique_graphs"]
        torch._dynamo.reset()
        counters.clear()
        model = spec.build(device, dtype)
        t0 = time.monotonic()
        dynamic = SEQUENCE_DIMS if sequence else None
        handle = pwd.attach(model, sizes=list(SPECIALIZE), store=False, dynamic=dynamic)
        try:
            first = calls[SIZES[0]]
            model(*first[0], **first[1])  # served eager; starts the background trace
            handle.wait_traced(timeout)
            for n in SIZES:
                model(*calls[n][0], **calls[n][1])
            out["trace_s"] = time.monotonic() - t0
            tracer = handle._tracer
            out["pieces"] = len(handle.pieces)
            out["strategies"] = sorted({p.strategy.value for p in handle.pieces})
            out["fell_back"] = [a.reason[:120] for a in tracer.attempts if a.reason]
            out["unique_graphs"] = counters["stats"]["unique_graphs"]
            out["recompiles"] = len(tracer.recompiles)
            out["graph_breaks"] = sum(b.count for b in tracer.graph_breaks)
            out["misses"] = tracer.miss_calls
            # Tier 2 first: a CUDA graph is captured at the start of a serving call, so
            # waiting for tier 3 with no traffic would wait out the timeout.
            ok = handle.wait(sizes=list(SPECIALIZE), timeout=timeout, tier=pwd.Tier.SIZE)
            out["specialized"] = ok
            # Serve a few calls so a GPU gets its CUDA graphs captured (at call start).
            deadline = time.monotonic() + (60 if device.type == "cuda" else 0)
            while True:
                for n in SPECIALIZE:
                    model(*calls[n][0], **calls[n][1])
                tiers = {  # the pieces that serve n (guards may split sizes between pieces)
                    n: sorted(
                        {
                            p.dispatcher.table.lookup(_key(p, n)).tier.value
                            for p in handle.pieces
                            if _serves(p, n)
                        }
                    )
                    for n in SPECIALIZE
                }
                done = all(t == ["graph"] for t in tiers.values())
                if device.type != "cuda" or done or time.monotonic() > deadline:
                    break
                time.sleep(0.05)  # pacing while the engine captures; the loop re-checks
            out["tiers"] = {str(n): ",".join(t) for n, t in tiers.items()}
            out["pieces"] = len(handle.pieces)  # again: a hot signature may have added one
            if not ok or (device.type == "cuda" and not done):
                out["status"] = str(handle.status())
            out["max_diff"] = max(
                _max_diff(model(*calls[n][0], **calls[n][1]), eager[n]) for n in SPECIALIZE
            )
            on_eager = [
                f"piece {p.index}"
                for p in handle.pieces
                if any(
                    p.dispatcher.table.lookup(_key(p, n)).tier.value == "eager"
                    for n in SPECIALIZE
                    if _serves(p, n)
                )
            ]
            out["on_eager"] = on_eager
            out["tensor_free"] = sum(p.tensor_free for p in handle.pieces)
        finally:
            handle.detach()
    print(json.dumps(out), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES))
    p.add_argument("--preset", default="tiny", choices=("tiny", "issue"))
    p.add_argument("--models", default="sequential,transformer_encoder,bert,gpt2,llama")
    p.add_argument("--timeout", type=float, default=400.0)
    p.add_argument("--jobs", type=int, default=1, help="models run side by side")
    p.add_argument("--dim", default="batch", choices=("batch", "sequence"),
                   help="the transformers models' size: batch or sequence (dim 1)")  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        child(a.child, a.device, a.dtype, a.preset, a.timeout, a.dim)
        return

    def run(name: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="pwdaemon-matrix-") as tmp:
            env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tmp}
            cmd = [sys.executable, __file__, "--child", name, "--device", a.device, "--dtype",
                   a.dtype, "--preset", a.preset, "--timeout", str(a.timeout),
                   "--dim", a.dim]  # fmt: skip
            t0 = time.monotonic()
            try:
                r = subprocess.run(
                    cmd, env=env, capture_output=True, text=True, timeout=a.timeout + 300
                )
            except subprocess.TimeoutExpired:
                r = subprocess.CompletedProcess(cmd, 1, "", "timed out")
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if lines else {"model": name, "error": r.stderr[-300:]}
            row["wall_s"] = time.monotonic() - t0
            print(json.dumps(row), file=sys.stderr, flush=True)
            return row

    # --jobs > 1 runs the models side by side (a GPU host has the cores; device time is
    # scarce); each child is its own process with its own Inductor cache either way.
    with ThreadPoolExecutor(max_workers=max(1, a.jobs)) as pool:
        rows = list(pool.map(run, a.models.split(",")))
    sized = "sequence lengths" if a.dim == "sequence" else "sizes"
    print(
        f"\n{a.device}, {a.dtype}, preset {a.preset}, {sized} {SIZES}, specialized {SPECIALIZE}\n"
    )
    print(
        "| model | pieces (torch.compile dynamic) | strategy | unique graphs | recompiles "
        "| breaks | 1, 2, 8 specialized | tiers 1/2/8 | max diff vs eager | on eager |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | error: {r['error'][-150:]!r} |||||||||")
            continue
        tiers = "/".join(r["tiers"][str(n)] for n in SPECIALIZE)
        print(
            f"| {r['model']} | {r['pieces']} ({r['peer_graphs']}) | {','.join(r['strategies'])} "
            f"| {r['unique_graphs']} | {r['recompiles']} | {r['graph_breaks']} "
            f"| {r['specialized']} | {tiers} | {r['max_diff']:.1e} | {len(r['on_eager'])} |"
        )


if __name__ == "__main__":
    main()
