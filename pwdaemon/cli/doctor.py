"""`pwdaemon doctor MODULE:FACTORY --inputs MODULE:FN`: will this model compile?

Before a model is deployed behind pwdaemon, the doctor builds it, traces it the way
`attach()` does (no engine, no store) at a few sizes under `torch.inference_mode()`,
and prints:

- what dynamo says of plain `torch.compile` on it (`torch._dynamo.explain`: graphs,
  graph breaks and their reasons);
- pwdaemon's view: pieces, the shape strategy each ended on (and any strategy that fell
  back, with dynamo's reason), graph breaks, recompiles, whether each piece can be
  specialized per size, and whether its graph can be shipped to a worker;
- what would be compiled (general per piece, the sizes per specializable piece) and,
  with `--compile` (the default), the measured seconds of a real general and size
  compile in a worker, from which the expected warm-up follows;
- that every traced output equals eager's.

Exit code 0 when every piece can be compiled, 1 when a piece cannot (or nothing was
traced, or an output differs from eager), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from pwdaemon.cli.warm import _int_list, load_object
from pwdaemon.serving.range_table import Target

Call = tuple[tuple[Any, ...], dict[str, Any]]
EXIT_OK, EXIT_PROBLEM, EXIT_USAGE = 0, 1, 2
TOLERANCE = 1e-4  # float32 outputs of a traced graph against eager (atol = rtol)


def add_doctor_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `doctor` on the main parser's subparsers."""
    p = subparsers.add_parser(
        "doctor", help="check before deploying that a model traces and compiles"
    )
    p.add_argument("factory", help="MODULE:FACTORY returning the nn.Module")
    p.add_argument(
        "--inputs",
        help="MODULE:FN with FN(size) -> a tensor, a tuple of inputs, a dict of keyword "
        "inputs, or (args, kwargs) (default: the model's example_inputs(size) method)",
    )
    p.add_argument("--sizes", type=_int_list, default=[1, 2, 8], help="sizes to trace")
    p.add_argument(
        "--no-compile",
        dest="compile",
        action="store_false",
        help="skip the real compiles (no warm-up estimate)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable report")
    p.set_defaults(func=cmd_doctor)


def as_call(out: Any) -> Call:
    """What an inputs function returned -> (args, kwargs) for one model call."""
    if isinstance(out, dict):
        return (), dict(out)
    if (
        isinstance(out, tuple)
        and len(out) == 2
        and isinstance(out[0], tuple)
        and isinstance(out[1], dict)
    ):
        return out[0], dict(out[1])
    if isinstance(out, tuple | list):
        return tuple(out), {}
    return (out,), {}


def _inputs_fn(spec: str | None, model: torch.nn.Module) -> Callable[[int], Call]:
    fn: Callable[[int], Any]
    if spec:
        fn = load_object(spec)
    elif hasattr(model, "example_inputs"):
        fn = model.example_inputs  # type: ignore[assignment]
    else:
        raise ValueError(
            f"{type(model).__name__} has no example_inputs(size) method: pass --inputs MODULE:FN"
        )
    return lambda n: as_call(fn(n))


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict) or hasattr(out, "to_tuple"):
        out = out.to_tuple() if hasattr(out, "to_tuple") else tuple(out.values())
    if isinstance(out, tuple | list):
        return [t for o in out for t in _flat(o)]
    return []


def _differs(got: Any, want: Any) -> str | None:
    g, w = _flat(got), _flat(want)
    if len(g) != len(w):
        return f"{len(g)} output tensors, eager gave {len(w)}"
    for i, (a, b) in enumerate(zip(g, w, strict=True)):
        try:
            torch.testing.assert_close(a, b, atol=TOLERANCE, rtol=TOLERANCE)
        except AssertionError as exc:
            return f"output {i}: {str(exc).splitlines()[0]}"
    return None


def _explain(model: torch.nn.Module, call: Call) -> dict[str, Any]:
    """Dynamo's own view of plain torch.compile on the model (a copy: no side effects)."""
    probe = copy.deepcopy(model)
    torch._dynamo.reset()
    try:
        out = torch._dynamo.explain(probe)(*call[0], **call[1])
    except Exception as exc:  # explain itself failing is a finding, not a crash
        return {"error": f"{type(exc).__name__}: {exc}"}
    finally:
        torch._dynamo.reset()
    return {
        "graphs": out.graph_count,
        "graph_breaks": out.graph_break_count,
        "break_reasons": [str(getattr(r, "reason", r)).splitlines()[0] for r in out.break_reasons],
    }


def _compile_pieces(jobs: list[tuple[Any, Target]], workdir: str) -> list[dict[str, Any]]:
    """Real compiles of (piece, target) in one worker process, one after the other: each
    one's seconds or its error."""
    from pwdaemon.config import CompileConfig
    from pwdaemon.engine.store_link import compile_options
    from pwdaemon.workers.compiler import JobSpec
    from pwdaemon.workers.executor import ProcessExecutor
    from pwdaemon.workers.shipping import graph_for_worker

    # One worker for every compile: a worker's start (torch's and Inductor's imports,
    # ~5 s of CPU here) is paid once, as the engine's pool pays it once.
    executor = ProcessExecutor(CompileConfig(workers=1))
    try:
        try:
            executor.start()
        except Exception as exc:  # no worker: every compile has that error
            return [{"target": t.label, "error": f"{type(exc).__name__}: {exc}"} for _, t in jobs]
        runs: list[dict[str, Any]] = []
        for piece, target in jobs:
            try:
                spec = JobSpec(
                    graph_for_worker(piece, f"piece {piece.index}"),
                    target,
                    str(Path(workdir) / f"g{piece.index}-{target.label.replace(':', '_')}.bin"),
                    compile_options({}, piece),
                )
                t0 = time.monotonic()
                result = executor.run(spec, 1800.0)
                seconds = result.get("seconds", time.monotonic() - t0)
                runs.append({"target": target.label, "seconds": seconds})
            except Exception as exc:
                runs.append({"target": target.label, "error": f"{type(exc).__name__}: {exc}"})
        return runs
    finally:
        executor.close(10.0)


def diagnose(
    model: torch.nn.Module, make: Callable[[int], Call], sizes: list[int], compile_: bool
) -> dict[str, Any]:
    """The doctor's findings as a JSON-able dict (also what `--json` prints)."""
    import pwdaemon as pwd
    from pwdaemon.workers.shipping import dump_graph

    calls = {n: make(n) for n in sizes}
    with torch.inference_mode():
        eager = {n: model(*c[0], **c[1]) for n, c in calls.items()}
    report: dict[str, Any] = {"explain": _explain(model, calls[sizes[0]])}
    t0 = time.monotonic()
    handle = pwd.attach(model, compile=False, store=False, trace="inline")  # no traffic to serve
    mismatches: list[str] = []
    try:
        with torch.inference_mode():
            for n, c in calls.items():
                why = _differs(model(*c[0], **c[1]), eager[n])
                if why is not None:
                    mismatches.append(f"size {n}: {why}")
        report["trace_s"] = time.monotonic() - t0
        tracer = handle._tracer
        pieces: list[dict[str, Any]] = []
        for p in handle.pieces:
            try:
                shipped = len(p.shipped or dump_graph(p.gm, f"piece {p.index}"))
                ship_error = None
            except Exception as exc:
                shipped, ship_error = 0, f"{type(exc).__name__}: {exc}"
            pieces.append(
                {
                    "index": p.index,
                    "strategy": p.strategy.value,
                    "nodes": len(p.gm.graph.nodes),
                    "specializable": p.specializable,
                    "size_symbols": list(p.size_symbols),
                    "graph_bytes": shipped,
                    "ship_error": ship_error,
                }
            )
        report["pieces"] = pieces
        report["attempts"] = [
            {"strategy": a.strategy.value, "outcome": a.outcome.value, "reason": a.reason}
            for a in tracer.attempts
        ]
        report["graph_breaks"] = [
            {"reason": b.reason, "count": b.count, "strategy": b.strategy.value}
            for b in tracer.graph_breaks
        ]
        report["recompiles"] = [
            {"cause": r.cause.value, "detail": r.detail} for r in tracer.recompiles
        ]
        report["mismatches"] = mismatches
        jobs = len(pieces) + sum(
            1 for p in handle.pieces if p.specializable for n in sizes if p.admits(n)
        )
        report["planned_compiles"] = jobs
        if compile_ and handle.pieces:
            with tempfile.TemporaryDirectory(prefix="pwdaemon-doctor-") as tmp:
                first = next(
                    (p for p in handle.pieces if p.specializable and p.admits(sizes[-1])),
                    handle.pieces[0],
                )
                targets = [(first, Target.general())]
                if first.specializable and first.admits(sizes[-1]):
                    targets.append((first, Target.size(sizes[-1])))
                runs = _compile_pieces(targets, tmp)
            report["compiles"] = runs
            ok = [r["seconds"] for r in runs if "seconds" in r]
            if ok:
                report["expected_warmup_s"] = jobs * sum(ok) / len(ok)
    finally:
        handle.detach()
    problems = [
        f"piece {p['index']}: cannot ship: {p['ship_error']}" for p in pieces if p["ship_error"]
    ]
    problems += [
        f"compile {r['target']}: {r['error']}" for r in report.get("compiles", []) if "error" in r
    ]
    problems += mismatches
    if not pieces:
        problems.append("dynamo traced nothing: the model would serve eager forever")
    report["problems"] = problems
    return report


def _print(console: Console, factory: str, r: dict[str, Any]) -> None:
    ex = r["explain"]
    if "error" in ex:
        console.print(f"torch._dynamo.explain failed: {ex['error']}")
    else:
        console.print(
            f"plain torch.compile: {ex['graphs']} graph(s), {ex['graph_breaks']} graph break(s)"
        )
        for reason in ex["break_reasons"]:
            console.print(f"  break: {reason}")
    table = Table(title=f"pwdaemon doctor: {factory} (traced in {r['trace_s']:.1f} s)")
    for col in ("piece", "strategy", "nodes", "per size", "graph shipped"):
        table.add_column(col)
    for p in r["pieces"]:
        shipped = f"{p['graph_bytes'] / 1024:.0f} KB" if not p["ship_error"] else "[red]no"
        table.add_row(
            str(p["index"]),
            p["strategy"],
            str(p["nodes"]),
            "yes" if p["specializable"] else "no (general only)",
            shipped,
        )
    console.print(table)
    for a in r["attempts"]:
        if a["outcome"] != "active":
            console.print(f"strategy {a['strategy']} fell back: {a['reason']}")
    for b in r["graph_breaks"]:
        console.print(f"graph break ({b['strategy']}, x{b['count']}): {b['reason']}")
    for c in r["recompiles"]:
        console.print(f"recompile ({c['cause']}): {c['detail']}")
    console.print(f"planned compiles: {r['planned_compiles']} (general per piece + sizes)")
    for c in r.get("compiles", []):
        what = f"{c['seconds']:.1f} s" if "seconds" in c else f"[red]{c['error']}"
        console.print(f"measured compile {c['target']}: {what}")
    if "expected_warmup_s" in r:
        console.print(
            f"expected warm-up: ~{r['expected_warmup_s']:.0f} s of compile time "
            "(divided among the workers; hot sizes first)"
        )
    if r["problems"]:
        for p in r["problems"]:
            console.print(f"[red]problem:[/] {p}")
    else:
        console.print("[green]every piece can be compiled[/]")


def cmd_doctor(args: argparse.Namespace) -> int:
    """`pwdaemon doctor`: trace, ship and (optionally) compile; print the report."""
    console = Console()
    try:
        model = load_object(args.factory)()
        make = _inputs_fn(args.inputs, model)
    except ValueError as exc:
        console.print(f"[red]pwdaemon doctor:[/] {exc}")
        return EXIT_USAGE
    if not isinstance(model, torch.nn.Module):
        console.print(f"[red]pwdaemon doctor:[/] {args.factory} did not return an nn.Module")
        return EXIT_USAGE
    with contextlib.suppress(AttributeError):
        model.eval()
    report = diagnose(model, make, args.sizes, args.compile)
    if args.json:
        print(json.dumps(report, indent=1, default=str))
    else:
        _print(console, args.factory, report)
    return EXIT_PROBLEM if report["problems"] else EXIT_OK
