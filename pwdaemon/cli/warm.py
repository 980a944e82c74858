"""`pwdaemon warm MODULE:FACTORY --sizes ...`: compile into the store ahead of time.

The model is built by FACTORY, captured once on an example input, and every requested
size (plus the general runnable and any `--ranges`) is compiled by the usual worker
processes into the artifact store, with a progress bar. A serving process attached to
the same store later loads them instead of compiling (a warm start).
"""

from __future__ import annotations

import argparse
import importlib
import threading
import time
from collections.abc import Callable
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pwdaemon.demo.args import positive_int
from pwdaemon.workers.sdpa import SDPA_BACKENDS, set_sdpa_flags


def load_object(spec: str) -> Any:
    """ "package.module:name" -> the object; ValueError with a readable reason."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"expected MODULE:NAME, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise ValueError(f"{module_name!r} has no attribute {attr!r}") from exc


def _int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated sizes, got {text!r}") from exc


def _range_list(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        a, sep, b = part.partition("-")
        if not sep:
            raise argparse.ArgumentTypeError(f"a range is START-END, got {part!r}")
        out.append((int(a), int(b)))
    return out


def _attention_list(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SDPA_BACKENDS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"expected attention backends among {','.join(SDPA_BACKENDS)}, got {text!r}"
        )
    return names


def add_warm_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `warm` on the main parser's subparsers."""
    p = subparsers.add_parser(
        "warm", help="compile a model's sizes into the artifact store ahead of time"
    )
    p.add_argument("factory", help="MODULE:FACTORY returning the nn.Module")
    p.add_argument("--sizes", type=_int_list, required=True, help="e.g. 1,8,32")
    p.add_argument("--ranges", type=_range_list, default=[], help="e.g. 1-16,17-512")
    p.add_argument(
        "--inputs",
        help="MODULE:FN with FN(size) -> input tensor or tuple of inputs "
        "(default: the model's example_inputs(size) method)",
    )
    p.add_argument("--dir", help="artifact store (default: PWDAEMON_CACHE_DIR or ~/.cache)")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="the torch thread count the servers set (torch.set_num_threads): CPU "
        "artifacts are compiled for it and keyed by it (default: torch's own)",
    )
    p.add_argument(
        "--attention-off",
        type=_attention_list,
        default=[],
        metavar="NAMES",
        help="the attention backends the servers turn off (torch.backends.cuda."
        "enable_<name>_sdp(False)), e.g. cudnn: artifacts are compiled without them and "
        "keyed by them",
    )
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole warm")
    p.set_defaults(func=cmd_warm)


def _inputs_fn(
    args: argparse.Namespace, model: torch.nn.Module
) -> Callable[[int], tuple[Any, ...]]:
    fn: Callable[[int], Any]
    if args.inputs:
        fn = load_object(args.inputs)
    elif hasattr(model, "example_inputs"):
        fn = model.example_inputs  # type: ignore[assignment]
    else:
        raise ValueError(
            f"{type(model).__name__} has no example_inputs(size) method: pass --inputs MODULE:FN"
        )

    def make(size: int) -> tuple[Any, ...]:
        out = fn(size)
        return out if isinstance(out, tuple) else (out,)

    return make


def cmd_warm(args: argparse.Namespace) -> int:
    """`pwdaemon warm`: compile a model's sizes and ranges into the store, then exit."""
    import pwdaemon as pwd

    console = Console()
    try:
        model = load_object(args.factory)()
        make_inputs = _inputs_fn(args, model)
    except ValueError as exc:
        console.print(f"[red]pwdaemon warm:[/] {exc}")
        return 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    # Global flags, read into each job's options.
    set_sdpa_flags(dict.fromkeys(args.attention_off, False))
    compiler = pwd.CompileConfig(**({"workers": args.workers} if args.workers else {}))
    policy = pwd.PolicyConfig(hot_calls=1 << 30, budget=max(len(args.sizes), 1))
    handle = pwd.attach(
        model,
        sizes=args.sizes,
        ranges=args.ranges,
        policy=policy,
        compiler=compiler,
        store=args.dir if args.dir else None,
        watch_store=False,
        trace="inline",  # nothing to serve meanwhile: trace on the first call, ungated
    )
    rows: list[tuple[str, str, float]] = []
    done = threading.Event()
    handle.on_swap(
        lambda e: rows.append((str(e.range) if e.range else "general", e.source, e.compile_seconds))
    )
    handle.on_plan_complete(lambda e: done.set())
    planned = 1 + len(args.sizes) + len(args.ranges)
    started = time.monotonic()
    try:
        with torch.no_grad():
            model(*make_inputs(args.sizes[0] if args.sizes else 1))
        columns = (
            TextColumn("[bold]warming"),
            BarColumn(),
            TextColumn("{task.completed}/{task.total}"),
            TimeElapsedColumn(),
        )
        with Progress(*columns, console=console, transient=False) as progress:
            task = progress.add_task("warm", total=planned)
            while not done.wait(0.2):
                progress.update(task, completed=len(rows))
                if time.monotonic() - started > args.timeout:
                    break
            progress.update(task, completed=len(rows))
        status = handle.status()
    finally:
        handle.detach()
    table = Table(title=f"pwdaemon warm: {args.factory}")
    for col in ("target", "from", "compile s"):
        table.add_column(col)
    for target, source, seconds in rows:
        table.add_row(target, source, f"{seconds:.1f}")
    console.print(table)
    failed = [e for p in status.pieces for e in p.entries if e.state == "failed"]
    for e in failed:
        console.print(f"[red]failed[/] {e.target}: {e.reason}")
    return 0 if done.is_set() and not failed else 1
