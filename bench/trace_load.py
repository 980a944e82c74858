"""Dynamo's trace against loading a saved one (torch's precompile), per model.

A warm restart used to run dynamo's trace of the model in the serving process before a
stored artifact could serve (pwdaemon's store key covers the traced graph): on the demo
model here ~0.9 s of the ~2 s until every size was specialized, and on an H200 BERT's
trace took 15 s under paced traffic (it parks while calls run). torch can save a whole
trace, guards included (`torch.compile(fn, fullgraph=True).aot_compile(...)`,
`save_compiled_function`, `torch.compiler.load_compiled_function`; experimental in
torch). This measures what loading one would cost instead, and whether it works on the
real models (pwdaemon's saved traces, `pwdaemon.serving.saved_trace`, grew from it).

`--guards portable` traces with torch's `keep_portable_guards_unsafe` filter (tensor
metadata, shape and global-state guards only): it drops the guards on object identity
(ID_MATCH) that torch 2.13 cannot save for BERT or Llama, and the guards on the module's
Python state (unsafe: a changed attribute or config is not noticed). `--entry call`
traces a module-level `call_module(model, args, kwargs)` instead of `model.forward`:
transformers decorates `forward`, and the saved trace names the function it traced by
qualified name, which then resolves to the decorator's wrapper ("not the same object").
Loading then supplies the modules the trace's bytecode names by object id
(`___module_collections_<id>_c0`), imported again in the loading process.
`--strategy` marks sizes as one of pwdaemon's strategies does; by default (`first`) as
this torch's first (`strategy.ORDER`: unbacked on torch 2.12 and 2.13, backed under
`backed_size_oblivious` on 2.11, where the unbacked trace of BERT, GPT-2 and Llama
fails).

Each model runs in two fresh processes (imports done before the clock starts, as after
`import pwdaemon`): the first traces with every input's batch dimension marked as
pwdaemon's tracer marks it (`mark_size`: one shape id for all of them) and a backend that
keeps the FX graph (no Inductor compile: the time is dynamo's), and saves the result; the
second builds the model again from the same seed, loads the saved trace and calls it at
each size with unmarked inputs, checking every output against eager (the guards are
checked on every call by the loaded function).

    python bench/trace_load.py [--models demo,bert,gpt2,llama,sequential] [--sizes 1,4,16]
                               [--guards all|portable] [--entry forward|call]
                               [--strategy first|unbacked|backed_oblivious]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
TOLERANCE = 1e-4  # float32 on CPU: the same graph run eagerly, so differences are tiny

CHILD = r"""
import importlib, io, json, re, sys, time
import torch
import pwdaemon  # noqa: F401  (imports dynamo, as a serving process has)
from pwdaemon.models import demo_model, example_tokens
from pwdaemon.real_models import model_spec
from pwdaemon.serving.strategy import ORDER, ShapeStrategy, mark_size, tracing

mode, name, path = sys.argv[1:4]
sizes = [int(s) for s in sys.argv[4].split(",")]
guards, entry = sys.argv[5:7]
strategy = ORDER[0] if sys.argv[7] == "first" else ShapeStrategy(sys.argv[7])

def call_module(model, args, kwargs):
    return model(*args, **kwargs)

cpu = torch.device("cpu")

def build():
    torch.manual_seed(0)
    if name == "demo":
        return demo_model().eval(), lambda n: ((example_tokens(n),), {})
    spec = model_spec(name, "tiny")
    return spec.build(cpu, torch.float32).eval(), lambda n: spec.inputs(n, cpu, torch.float32)

def flat_tensors(out):
    leaves, _ = torch.utils._pytree.tree_flatten(out)
    return [x for x in leaves if isinstance(x, torch.Tensor)]

model, inputs = build()
out = {"model": name, "mode": mode}
try:
    from torch._dynamo.aot_compile_types import GraphModuleSerializableCallable
except ImportError as exc:
    print(json.dumps({**out, "error": f"this torch has no precompile: {exc}"}))
    raise SystemExit(0)
with torch.inference_mode():
    if mode == "save":
        args, kwargs = inputs(sizes[-1])
        for t in [*args, *kwargs.values()]:
            if isinstance(t, torch.Tensor):
                mark_size(t, 0, strategy, "batch")  # as pwdaemon's tracer marks a call
        options = {}
        if guards == "portable":
            options["guard_filter_fn"] = torch.compiler.keep_portable_guards_unsafe
        if hasattr(torch._dynamo.config, "enable_aot_compile"):  # off by default before 2.13
            torch._dynamo.config.enable_aot_compile = True
        start = time.monotonic()
        fn = call_module if entry == "call" else model.forward
        compiled = torch.compile(fn, fullgraph=True, options=options,
                                 backend=lambda gm, ex: GraphModuleSerializableCallable(gm))
        example = ((model, args, kwargs), {}) if entry == "call" else (args, kwargs)
        with tracing(strategy):
            result = compiled.aot_compile(example)
        out["trace_s"] = time.monotonic() - start
        result.save_compiled_function(path)
        out["bytes"] = len(open(path, "rb").read())
    else:
        start = time.monotonic()
        scope = dict(globals() if entry == "call" else model.forward.__globals__)
        with open(path, "rb") as f:
            data = f.read()
        for _ in range(3):
            try:
                fn = torch.compiler.load_compiled_function(io.BytesIO(data), f_globals=scope)
                break
            except RuntimeError as err:
                # "Missing required external references: ['___module_collections_<id>_c0']":
                # modules the bytecode names by their id in the saving process.
                refs = re.findall(r"'(___module_([\w.]+?)_\d+_c\d+)'", str(err))
                if not refs:
                    raise
                scope.update({ref: importlib.import_module(name) for ref, name in refs})
        else:
            raise RuntimeError("external references still missing after three loads")
        out["load_s"] = time.monotonic() - start
        diffs = {}
        start = time.monotonic()
        for n in sizes:
            args, kwargs = inputs(n)
            # Unmarked: the saved guards fail a marked tensor ("_has_dynamo_dim_marking is
            # present on runtime tensor but was absent at compile time").
            got = flat_tensors(
                fn(model, args, kwargs) if entry == "call" else fn(model, *args, **kwargs)
            )
            want = flat_tensors(model(*args, **kwargs))
            assert len(got) == len(want), (len(got), len(want))
            diffs[n] = max(float((g - w).abs().max()) for g, w in zip(got, want))
        out["calls_s"] = time.monotonic() - start
        out["max_diff"] = diffs
print(json.dumps(out))
"""


def run(mode: str, model: str, path: str, args: argparse.Namespace) -> dict[str, object]:
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            CHILD,
            mode,
            model,
            path,
            args.sizes,
            args.guards,
            args.entry,
            args.strategy,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        # The exception's own line, not dynamo's hints printed after it.
        lines = proc.stderr.strip().splitlines() or ["(no output)"]
        errors = [line for line in lines if re.match(r"^[\w.]+(Error|Exception)\b", line)]
        return {"model": model, "mode": mode, "error": (errors or lines)[-1][:300]}
    result: dict[str, object] = json.loads(lines[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="demo,bert,gpt2,llama,sequential")
    ap.add_argument("--sizes", default="1,4,16")
    ap.add_argument(
        "--guards",
        choices=("all", "portable"),
        default="all",
        help="portable: keep only the guards torch calls portable (unsafe; see above)",
    )
    ap.add_argument(
        "--entry",
        choices=("forward", "call"),
        default="forward",
        help="call: trace a module-level function that calls the model (see above)",
    )
    ap.add_argument(
        "--strategy",
        choices=("first", "unbacked", "backed_oblivious"),
        default="first",
        help="how the inputs' sizes are marked (pwdaemon's shape strategies)",
    )
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pwdaemon-trace-load-") as tmp:
        for model in args.models.split(","):
            path = str(Path(tmp) / f"{model}.trace")
            saved = run("save", model, path, args)
            loaded = run("load", model, path, args) if "error" not in saved else {}
            rows.append((model, saved, loaded))
    print(
        f"dynamo's trace in a fresh process against loading it (sizes {args.sizes}, "
        f"guards {args.guards}, entry {args.entry}, strategy {args.strategy}):\n"
    )
    print("| model | trace s | load s | trace ÷ load | outputs vs eager (max abs diff) |")
    print("|---|---|---|---|---|")
    for model, saved, loaded in rows:
        error = saved.get("error") or loaded.get("error")
        if error:
            print(f"| {model} | — | — | — | failed: {error} |")
            continue
        trace_s, load_s = float(saved["trace_s"]), float(loaded["load_s"])  # type: ignore[arg-type]
        diffs = loaded["max_diff"]
        assert isinstance(diffs, dict)
        worst = max(diffs.values())
        verdict = "ok" if worst <= TOLERANCE else f"OVER {TOLERANCE}"
        print(
            f"| {model} | {trace_s:.3f} | {load_s:.3f} | {trace_s / load_s:.0f}x | "
            f"{worst:.1e} ({verdict}) |"
        )


if __name__ == "__main__":
    main()
