"""The serving process's compiles of Inductor's generated modules in a warm start, with the
bytecode kept beside them (`pwdaemon.workers.module_bytecode`) and without.

Inductor loads each compiled graph's module with `compile()` of its whole source, a C
call that keeps the GIL from start to end: the gate cannot park it, and a serving call
waits for all of it. A cold start each way (the workers compile; the serving process
loads), then one fills a store for `--repeat` warm starts with the bytecode on and as
many with it off, alternated, each a fresh process that calls every
size until its plan completes, timing every `compile()` of a file in Inductor's cache
(count, total, longest). Medians over the runs.

    python bench/module_compiles.py [--model bert] [--repeat 3] [--device cuda --dtype fp16
                                     --preset issue]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_CHILD = """
import builtins, json, os, sys, time
store, model_name, device, dtype_name, preset, bytecode = sys.argv[1:7]
import torch
from pwdaemon.workers import module_bytecode
if bytecode == "off":
    module_bytecode.install = lambda: False  # torch's loads as they are
import pwdaemon as pwd
from pwdaemon.real_models import model_spec

root = os.path.realpath(os.path.join(store, "inductor"))
times = []
real = builtins.compile
def timed(source, filename, *args, **kwargs):
    start = time.perf_counter()
    try:
        return real(source, filename, *args, **kwargs)
    finally:
        if isinstance(filename, str) and os.path.realpath(filename).startswith(root):
            times.append(time.perf_counter() - start)
builtins.compile = timed
spec = model_spec(model_name, preset)
dev, dtype = torch.device(device), getattr(torch, dtype_name)
model = spec.build(dev, dtype)
sizes = [1, 4, 16]
calls = {n: spec.inputs(n, dev, dtype) for n in sizes}
handle = pwd.attach(model, sizes=sizes, store=store)
deadline = time.monotonic() + 300
with torch.inference_mode():
    while not handle.wait(timeout=0.01) and time.monotonic() < deadline:
        for n in sizes:
            args, kwargs = calls[n]
            model(*args, **kwargs)
done = handle.wait(timeout=0)
handle.detach()
print(json.dumps({"done": done, "count": len(times), "total_ms": sum(times) * 1e3,
                  "max_ms": max(times, default=0.0) * 1e3}))
"""

_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _start(store: str, opts: argparse.Namespace, bytecode: str) -> dict[str, float]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            _CHILD,
            store,
            opts.model,
            opts.device,
            _DTYPES[opts.dtype],
            opts.preset,
            bytecode,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if out.returncode != 0:
        raise SystemExit(f"a start failed:\n{out.stderr[-3000:]}")
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    parser.add_argument("--preset", default="tiny", choices=("tiny", "issue"))
    opts = parser.parse_args()
    # A cold start each way, in stores of their own: the workers compile, and the serving
    # process loads what they compiled (with the bytecode on, the workers keep it).
    for bytecode in ("off", "on"):
        cold = _start(tempfile.mkdtemp(prefix="pwdaemon-module-compiles-"), opts, bytecode)
        print(
            f"cold start, bytecode {bytecode}: {cold['count']:.0f} module compiles in the "
            f"serving process, {cold['total_ms']:.1f} ms in all, longest {cold['max_ms']:.1f} ms "
            f"(plan done: {bool(cold['done'])})"
        )
    store = tempfile.mkdtemp(prefix="pwdaemon-module-compiles-")
    _start(store, opts, "on")  # the warm starts' store
    runs: dict[str, list[dict[str, float]]] = {"on": [], "off": []}
    for _ in range(opts.repeat):
        for bytecode in ("off", "on"):
            runs[bytecode].append(_start(store, opts, bytecode))
    print(f"\nWarm starts of {opts.model} ({opts.device}), medians of {opts.repeat}:\n")
    print("| bytecode kept | module compiles | their total ms | the longest ms | plans done |")
    print("|---|---|---|---|---|")
    for bytecode, label in (("off", "no (torch as it is)"), ("on", "yes")):
        rows = runs[bytecode]
        print(
            f"| {label} | {statistics.median(r['count'] for r in rows):.0f} "
            f"| {statistics.median(r['total_ms'] for r in rows):.1f} "
            f"| {statistics.median(r['max_ms'] for r in rows):.1f} "
            f"| {sum(bool(r['done']) for r in rows)}/{len(rows)} |"
        )


if __name__ == "__main__":
    main()
