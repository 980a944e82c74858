"""How the demo's views and summary look: tier and state colours, number formats, tables."""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import JustifyMethod
from rich.table import Table

__all__ = ("STATE_STYLE", "TIER_STYLE", "fmt_ms", "fmt_s", "ordinal", "titled_table")

TIER_STYLE = {
    "eager": "red",
    "general": "yellow",
    "range": "cyan",
    "size": "bold green",
    "graph": "bold magenta",
}
# Keyed by the job states' values; "warm" and "seen" are the demo's own words for a
# size without a job (hot enough but held back, or not hot yet).
STATE_STYLE = {
    "live": "green",
    "compiling": "bold yellow",
    "queued": "cyan",
    "failed": "bold red",
    "rejected": "bold red",
    "dropped": "dim",
    "cancelled": "dim",
    "warm": "magenta",
    "seen": "dim",
}


def fmt_s(seconds: float | None, digits: int = 1) -> str:
    """Seconds with `digits` decimals, "-" for none."""
    return "-" if seconds is None else f"{seconds:.{digits}f}"


def fmt_ms(seconds: float) -> str:
    """Seconds as milliseconds, two decimals below 10 ms and one above."""
    ms = seconds * 1e3
    return f"{ms:.2f} ms" if ms < 10 else f"{ms:.1f} ms"


def ordinal(n: int) -> str:
    """1st, 2nd, 3rd, 4th, ..., 11th, 12th, 13th, 21st."""
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def titled_table(
    title: str, columns: Sequence[tuple[str, JustifyMethod]], *, pad_edge: bool = True
) -> Table:
    """The demo's table: a bold left-aligned title over a simple header.

    `columns` are (header, justify) pairs, in order.
    """
    table = Table(
        box=box.SIMPLE_HEAD,
        title=title,
        title_justify="left",
        title_style="bold",
        pad_edge=pad_edge,
    )
    for header, justify in columns:
        table.add_column(header, justify=justify)
    return table
