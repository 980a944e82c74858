"""`pwdaemon cache ls | verify | gc | clear`: inspect and maintain the artifact store.

Each command prints a readable table (rich) or, with `--json`, one JSON document on
stdout for scripts. Exit codes: 0 success, 1 `verify` found bad artifacts, 2 usage or
store errors (including a store refused as unsafe).

`add_cache_parser` registers the commands on the main `pwdaemon` parser; each sets
`func`, which takes the parsed namespace and returns the exit code.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from pwdaemon.store import (
    ArtifactStore,
    Manifest,
    UnsafeStoreError,
    VerifyResult,
    default_store_dir,
)

__all__ = [
    "add_cache_parser",
    "cmd_clear",
    "cmd_gc",
    "cmd_ls",
    "cmd_verify",
    "format_size",
    "parse_duration",
    "parse_size",
]

EXIT_OK = 0
EXIT_BAD = 1
EXIT_ERROR = 2

# Binary multiples, as du and most cache tools use: "1G" is 1 GiB. The optional "i" and
# "B" are accepted so "1GiB" and "1GB" mean the same.
_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(?:i?b)?\s*$", re.IGNORECASE)
_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_PART_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", re.IGNORECASE)


def parse_size(text: str) -> int:
    """ "1G", "500M", "1.5GiB", "10kb", "4096" -> bytes (binary multiples)."""
    match = _SIZE_RE.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 500M, 1.5G, 2GiB)")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_duration(text: str) -> float:
    """ "7d", "12h", "30m", "45s", "1w", "1d12h", "90" (seconds) -> seconds."""
    compact = text.strip()
    pos = 0
    total = 0.0
    while pos < len(compact):
        match = _DURATION_PART_RE.match(compact, pos)
        if match is None:
            break
        total += float(match.group(1)) * _DURATION_UNITS[(match.group(2) or "s").lower()]
        pos = match.end()
        while pos < len(compact) and compact[pos].isspace():
            pos += 1
    if not compact or pos != len(compact):
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (examples: 90, 45s, 30m, 12h, 7d, 1w, 1d12h)"
        )
    return total


def format_size(n: int) -> str:
    """Bytes in binary units: "512 B", "1.5 KiB", ..., "2.0 TiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def _format_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _console() -> Console:
    # Created per call so output goes to whatever sys.stdout is now (tests capture it);
    # wider than rich's 80-column default when piped, so rows do not wrap.
    return Console(file=sys.stdout, highlight=False, width=None if sys.stdout.isatty() else 120)


def _error(message: str) -> None:
    print(f"pwdaemon cache: {message}", file=sys.stderr)


def _print_json(doc: object) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


def _open_store(args: argparse.Namespace) -> ArtifactStore | None:
    """The store named by --dir (or the default); None (after an error message) if unsafe."""
    try:
        # create=False: listing a store that does not exist should not create one.
        return ArtifactStore(args.dir, create=False)
    except UnsafeStoreError as exc:
        _error(str(exc))
        return None


def _manifest_json(m: Manifest) -> dict[str, Any]:
    return {
        "digest": m.digest,
        **m.key.fields(),
        "sha256": m.sha256,
        "size": m.size,
        "compile_seconds": m.compile_seconds,
        "created": m.created,
        "last_used": m.last_used,
        "path": str(m.artifact),
        "extra": dict(m.extra),
    }


# --------------------------------------------------------------------------- commands


def cmd_ls(args: argparse.Namespace) -> int:
    """`pwdaemon cache ls`: every artifact with its target, device, size and times."""
    store = _open_store(args)
    if store is None:
        return EXIT_ERROR
    entries = store.entries()
    total_bytes, count = store.stats()
    if args.json:
        _print_json(
            {
                "root": str(store.root),
                "total_bytes": total_bytes,
                "count": count,
                "artifacts": [_manifest_json(m) for m in entries],
            }
        )
        return EXIT_OK
    table = Table(title=f"artifacts in {escape(str(store.root))}")
    table.add_column("digest", no_wrap=True)
    table.add_column("target")
    table.add_column("device")
    table.add_column("size", justify="right")
    table.add_column("compile s", justify="right")
    table.add_column("created", no_wrap=True)
    table.add_column("last used", no_wrap=True)
    for m in entries:
        table.add_row(
            m.digest[:12],
            escape(m.key.target),
            escape(m.key.device),
            format_size(m.size),
            f"{m.compile_seconds:.1f}",
            _format_time(m.created),
            _format_time(m.last_used),
        )
    console = _console()
    console.print(table)
    console.print(f"{count} artifacts, {format_size(total_bytes)} on disk")
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    """`pwdaemon cache verify`: check every checksum, quarantine bad entries (exit 1)."""
    store = _open_store(args)
    if store is None:
        return EXIT_ERROR
    try:
        results = store.verify()
    except UnsafeStoreError as exc:
        _error(str(exc))
        return EXIT_ERROR
    bad = [r for r in results if not r.ok]
    if args.json:
        _print_json(
            {
                "root": str(store.root),
                "ok": len(results) - len(bad),
                "bad": len(bad),
                "results": [_verify_json(r) for r in results],
            }
        )
    else:
        table = Table(title=f"verify {escape(str(store.root))}")
        table.add_column("digest", no_wrap=True)
        table.add_column("target")
        table.add_column("status")
        table.add_column("reason")
        for r in results:
            table.add_row(
                r.digest[:12],
                escape(r.manifest.key.target) if r.manifest else "?",
                "[green]ok[/green]" if r.ok else "[red]quarantined[/red]",
                "" if r.ok else escape(r.reason),
            )
        console = _console()
        console.print(table)
        console.print(f"{len(results) - len(bad)} ok, {len(bad)} quarantined")
    return EXIT_BAD if bad else EXIT_OK


def _verify_json(r: VerifyResult) -> dict[str, Any]:
    return {
        "digest": r.digest,
        "ok": r.ok,
        "reason": r.reason,
        "target": r.manifest.key.target if r.manifest else None,
    }


def cmd_gc(args: argparse.Namespace) -> int:
    """`pwdaemon cache gc`: remove old or least recently used artifacts."""
    store = _open_store(args)
    if store is None:
        return EXIT_ERROR
    before, _ = store.stats()
    removed = store.gc(max_bytes=args.max_bytes, max_age_s=args.max_age)
    after, count = store.stats()
    freed = max(0, before - after)
    if args.json:
        _print_json(
            {
                "root": str(store.root),
                "removed": [_manifest_json(m) for m in removed],
                "freed_bytes": freed,
                "total_bytes": after,
                "count": count,
            }
        )
    else:
        _console().print(
            f"removed {len(removed)} artifacts ({format_size(freed)}); "
            f"{count} artifacts, {format_size(after)} left in {escape(str(store.root))}"
        )
    return EXIT_OK


def cmd_clear(args: argparse.Namespace) -> int:
    """`pwdaemon cache clear`: remove every artifact (asks first on a terminal)."""
    store = _open_store(args)
    if store is None:
        return EXIT_ERROR
    total_bytes, count = store.stats()
    if not args.yes:
        # Only ask a person; a script must say --yes.
        if args.json or not sys.stdin.isatty():
            _error("refusing to clear the store without --yes")
            return EXIT_ERROR
        answer = input(
            f"delete {count} artifacts ({format_size(total_bytes)}) from {store.root}? [y/N] "
        )
        if answer.strip().lower() not in ("y", "yes"):
            _error("not cleared")
            return EXIT_ERROR
    removed = store.clear(include_inductor=not args.keep_inductor)
    if args.json:
        _print_json({"root": str(store.root), "removed": removed, "freed_bytes": total_bytes})
    else:
        _console().print(
            f"removed {removed} artifacts ({format_size(total_bytes)}) "
            f"from {escape(str(store.root))}"
        )
    return EXIT_OK


# --------------------------------------------------------------------------- parser


def add_cache_parser(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `cache` and its commands on the main parser's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--dir",
        type=Path,
        default=None,
        help=f"store directory (default: {default_store_dir()}, from $PWDAEMON_CACHE_DIR, "
        "$XDG_CACHE_HOME or ~/.cache)",
    )
    common.add_argument("--json", action="store_true", help="print one JSON document")

    cache = subparsers.add_parser(
        "cache", help="inspect and maintain the artifact store", description=__doc__
    )
    commands = cache.add_subparsers(dest="cache_command", metavar="COMMAND", required=True)

    def add(name: str, func: Callable[[argparse.Namespace], int], summary: str) -> Any:
        parser = commands.add_parser(name, parents=[common], help=summary, description=summary)
        parser.set_defaults(func=func)
        return parser

    add("ls", cmd_ls, "list artifacts with their target, device, size and times")
    add("verify", cmd_verify, "check every artifact's checksum; quarantine bad ones (exit 1)")
    gc = add("gc", cmd_gc, "remove old and least recently used artifacts")
    gc.add_argument(
        "--max-bytes",
        type=parse_size,
        default=None,
        metavar="SIZE",
        help="keep at most this much (binary units: 500M, 1G, 2GiB)",
    )
    gc.add_argument(
        "--max-age",
        type=parse_duration,
        default=None,
        metavar="DURATION",
        help="remove artifacts unused for longer than this (30m, 12h, 7d, 1w)",
    )
    clear = add("clear", cmd_clear, "delete every artifact and the shared Inductor cache")
    clear.add_argument("--yes", "-y", action="store_true", help="do not ask for confirmation")
    clear.add_argument(
        "--keep-inductor", action="store_true", help="keep the shared Inductor cache"
    )
