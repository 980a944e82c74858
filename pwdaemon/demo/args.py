"""`pwdaemon demo`: watch pwdaemon serve a small transformer while it compiles behind it.

Attaches the bundled `TinyTransformer` with the defaults (embedded worker pool, no
service), drives it with seeded synthetic traffic (`pwdaemon.demo.traffic`) for a
bounded time, and shows, live: every size the traffic brought, the tier serving it now,
its compile, the table version, the job queue, recent swaps and the latency of the last
few seconds.

Every sampled call (every `--check-every`th, plus the first call of each size on each
tier) is compared with an eager reference copy of the model (float32, atol 1e-4, rtol
1e-4). The summary at the end reports mismatches (the exit code is 1 if there are any),
compiles, time from a size turning hot to its swap, the worst call during warm-up
against the median, and eager / general / specialized speed per hot size measured on
the same recorded inputs.

With no terminal (or `--plain`) it prints progress lines instead of the live view.
"""

from __future__ import annotations

import argparse
import math
import sys

from rich.console import Console

from pwdaemon.demo.options import (
    DEFAULT_DURATION_S,
    QUICK_SWAPS,
    SHORT_RUN_S,
    STOP_GRACE_S,
    DemoOptions,
    default_threads,
)
from pwdaemon.demo.run import run_demo

__all__ = ("add_demo_parser", "cmd_demo", "options_from_args")


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or math.isinf(value):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1 (the CLI's counts)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text!r}")
    return value


def add_demo_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `demo` on the main parser's subparsers."""
    parser = subparsers.add_parser(
        "demo",
        help="serve a bundled small transformer under synthetic traffic, live",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--duration",
        type=_positive_float,
        default=None,
        metavar="SECONDS",
        help=f"how long to run the traffic (default {DEFAULT_DURATION_S:g}; "
        "the limit with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"a short run: ends {STOP_GRACE_S:g} s after the first {QUICK_SWAPS} sizes "
        "went live (seconds on a warm store; within --duration)",
    )
    parser.add_argument("--seed", type=int, default=0, help="traffic and weights seed (default 0)")
    parser.add_argument(
        "--plain",
        action="store_true",
        help="print progress lines instead of the live view (the default with no terminal)",
    )
    parser.add_argument(
        "--rate",
        type=_positive_float,
        default=DemoOptions.rate,
        metavar="CALLS_PER_S",
        help=f"mean calls per second the traffic asks for (default {DemoOptions.rate:g})",
    )
    parser.add_argument(
        "--max-size",
        type=positive_int,
        default=DemoOptions.prefill_max,
        metavar="N",
        help=f"largest (prefill) batch (default {DemoOptions.prefill_max}; decode sizes "
        f"stay within 1..{DemoOptions.decode_max})",
    )
    parser.add_argument(
        "--check-every",
        type=positive_int,
        default=DemoOptions.check_every,
        metavar="N",
        help=f"compare every Nth call with an eager reference (default {DemoOptions.check_every})",
    )
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="compile worker processes (default: pwdaemon's, a quarter of the CPUs)",
    )
    parser.add_argument(
        "--no-general",
        dest="general",
        action="store_false",
        help="skip the general (dynamic-shape) compile: the first hot size compiles sooner",
    )
    parser.add_argument(
        "--stop-after-swaps",
        type=positive_int,
        default=0,
        metavar="N",
        help=f"end early, {STOP_GRACE_S:g} s after N specialized sizes went live "
        "(for CI: --duration becomes a limit)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        metavar="N",
        help=f"serving's intra-op threads (default {default_threads()}: half the CPUs, "
        "the rest is left to the compile workers)",
    )
    store = parser.add_mutually_exclusive_group()
    store.add_argument(
        "--store",
        default=None,
        metavar="DIR",
        help="artifact store directory (default: pwdaemon's; a second run loads from it)",
    )
    store.add_argument(
        "--fresh",
        action="store_true",
        help="start from an empty store and Inductor cache (every compile for real)",
    )
    parser.set_defaults(func=cmd_demo)


def options_from_args(args: argparse.Namespace) -> DemoOptions:
    """The run's options from the parsed `demo` flags (--quick ends the run after a few
    swaps and shortens its phases; decode sizes stay below --max-size)."""
    duration = DEFAULT_DURATION_S if args.duration is None else args.duration
    stop_after_swaps = args.stop_after_swaps or (QUICK_SWAPS if args.quick else 0)
    decode_max = min(DemoOptions.decode_max, max(1, args.max_size - 1))
    return DemoOptions(
        duration=duration,
        seed=args.seed,
        plain=args.plain,
        rate=args.rate,
        decode_max=decode_max,
        prefill_max=max(args.max_size, decode_max + 1),
        phases=3 if args.quick or duration <= SHORT_RUN_S else 4,
        check_every=args.check_every,
        workers=args.workers,
        store=args.store,
        fresh=args.fresh,
        general=args.general,
        stop_after_swaps=stop_after_swaps,
        threads=args.threads,
    )


def cmd_demo(args: argparse.Namespace) -> int:
    """`pwdaemon demo`: returns 0 when every checked call matched the eager reference."""
    console = Console(file=sys.stdout)
    result = run_demo(options_from_args(args), console)
    return result.exit_code
