"""`pwdaemon demo` end to end: a real run, real Inductor in worker processes (the fast
runs on FakeExecutor live in tests/unit/test_demo_views.py)."""

from __future__ import annotations

import re

import pytest

from pwdaemon.cli.main import main

RESULT = re.compile(r"Result: (OK|FAILED) \((\d+) specialized swaps, (\d+) mismatches\)")


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_demo_quick_plain_real_compiles(capsys: pytest.CaptureFixture[str]) -> None:
    # A fresh store (cold Inductor cache): every compile is real. The general compile is
    # skipped so the first hot size is compiled first, and the run ends a few seconds
    # after that swap; --duration is the limit on a slow machine.
    rc = main(
        [
            "demo",
            "--quick",
            "--plain",
            "--duration",
            "150",
            "--fresh",
            "--no-general",
            "--stop-after-swaps",
            "1",
        ]
    )
    out = capsys.readouterr().out
    match = RESULT.search(out)
    assert match is not None, out
    assert "0 mismatches" in out
    assert int(match.group(3)) == 0
    assert int(match.group(2)) >= 1, out
    assert match.group(1) == "OK" and rc == 0
    assert "swap: size" in out  # the plain progress line for the swap
    assert re.search(r"dynamo\s+traced\s+1\s+graph", out)  # no retrace for any size
    print(out)  # shown with -s: the figures of a real run
