"""The demo's views, summary and mismatch report, on FakeExecutor (no real compiles)."""

from __future__ import annotations

import io
import math
import re

import pytest
import torch
from rich.console import Console

from pwdaemon.demo.options import DemoOptions
from pwdaemon.demo.records import DemoResult
from pwdaemon.demo.run import DemoRun, run_demo
from pwdaemon.demo.summary import print_summary
from pwdaemon.demo.traffic import Call
from pwdaemon.metrics.stats import percentile
from pwdaemon.models import demo_model, example_tokens
from pwdaemon.serving.range_table import Tier
from pwdaemon.testing import FakeExecutor

RESULT = re.compile(r"Result: (OK|FAILED) \((\d+) specialized swaps, (\d+) mismatches\)")


def fake_run(**overrides: object) -> tuple[str, DemoResult]:
    """A short demo on FakeExecutor ("compiles" are the eager graph, instant)."""
    kwargs: dict[str, object] = {"duration": 7.0, "rate": 200.0, "hot_calls": 2, "fresh": True}
    kwargs.update(overrides)
    options = DemoOptions(**kwargs)  # type: ignore[arg-type]
    buf = io.StringIO()
    console = Console(
        file=buf, force_terminal=not options.plain, width=160, height=50, color_system=None
    )
    result = run_demo(options, console, executor=FakeExecutor())
    return buf.getvalue(), result


def test_demo_live_view_and_summary_with_fake_compiles() -> None:
    out, result = fake_run()
    assert result.exit_code == 0
    assert not result.mismatches
    assert result.checked > 0
    swaps = result.swaps
    assert any(s.event.tier is Tier.GENERAL for s in swaps)
    assert result.specialized_swaps
    # Every specialized size served at least one call that was checked on its tier.
    assert result.calls_by_tier["size"] > 0
    # The live view drew its panels.
    for text in (
        "pwdaemon demo",
        "sizes, by calls",
        "recent swaps",
        "served by",
        "table v",
        "queue",
        "in flight",
        "p50",
        "p99",
    ):
        assert text in out, text
    # And the summary.
    match = RESULT.search(out)
    assert match is not None and match.group(1) == "OK" and match.group(3) == "0"
    assert "Hot sizes" in out and "Speed per specialized size" in out
    assert result.speed
    assert result.hot_to_swap


def test_demo_plain_with_fake_compiles() -> None:
    out, result = fake_run(plain=True, stop_after_swaps=1, duration=20.0)
    assert result.exit_code == 0
    assert result.duration < 15.0  # stopped after the swap
    assert "\x1b[" not in out  # no escape codes in plain mode
    assert re.search(r"^\[\s*\d+\.\ds\] calls", out, re.M)
    assert "swap: general (dynamic)" in out
    assert "swap: size" in out


def test_demo_reports_mismatches() -> None:
    # The demo's own check (outside pwdaemon's validation): a served output that differs
    # from the eager reference beyond atol/rtol 1e-4 is a mismatch, the summary says so
    # and the exit code is 1.
    buf = io.StringIO()
    run = DemoRun(DemoOptions(plain=True), Console(file=buf, width=120, color_system=None))
    model = demo_model(0)
    tokens = example_tokens(4)
    with torch.no_grad():
        good = model(tokens)
        run._check(Call(0, 4, "decode", 0, 0.0), "size", tokens, good, model)
        assert run.result.mismatches == [] and run.result.exit_code == 0
        bad = good + 1e-3
        run._check(Call(1, 4, "decode", 0, 0.0), "size", tokens, bad, model)
    assert run.result.checked == 2
    [m] = run.result.mismatches
    assert (m.index, m.size, m.tier) == (1, 4, "size")
    assert m.max_abs_diff == pytest.approx(1e-3, rel=1e-2)
    assert run.result.exit_code == 1
    print_summary(run, None)
    out = buf.getvalue()
    assert "1 MISMATCHES" in out and "call 1: size 4 on size" in out
    assert RESULT.search(out) is not None and "Result: FAILED" in out


def test_percentile() -> None:
    assert percentile([], 50) == 0.0
    assert percentile([3.0], 99) == 3.0
    values = [float(i) for i in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0
    assert percentile([2.0, 1.0], 50) == 1.0  # unsorted input
    assert math.isnan(percentile([], 99, empty=math.nan))  # what the benchmarks ask for
    for bad in (-1.0, 100.5, math.nan):
        with pytest.raises(ValueError, match=r"0\.\.100"):
            percentile(values, bad)
