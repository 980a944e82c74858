"""The first request costs what eager costs, and warm-up calls stay near their median.

Each system runs in a fresh process of its own (`bench/models.py`'s child mode), so first
calls pay what they pay in a real server. The bounds are generous: the benchmark carries
the targets (TTFR <= 1.5x eager's first call, worst warm-up call <= 2x the median of its
size on its tier); this test catches regressions such as tracing on the serving thread
again (TTFR 10-30x eager's first call) or serving calls that wait for the GIL behind a
trace (worst warm-up calls 100-500x the median).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "models.py"
TTFR_BOUND = 4.0
WORST_BOUND = 60.0


@pytest.mark.timeout(900)
def test_first_request_at_eager_speed_and_no_warm_up_call_far_off_its_median(
    tmp_path: Path,
) -> None:
    command = [
        sys.executable, str(BENCH), "--models", "demo", "--systems", "eager,pwdaemon",
        "--sizes", "1,4,16", "--iters", "20", "--settle-timeout", "400",
        "--run-timeout", "420", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.glob("*.json")
    by_system = {r["system"]: r for r in json.loads(results.read_text())}
    eager, pw = by_system["eager"], by_system["pwdaemon"]
    assert "error" not in eager and "error" not in pw, (eager, pw)
    assert pw["settled"], pw  # every size specialized: the warm-up really ran to its end
    ttfr = pw["first_call_s"] / eager["first_call_s"]
    assert ttfr <= TTFR_BOUND, (ttfr, pw["first_call_s"], eager["first_call_s"])
    assert pw["warmup_worst_ratio"] <= WORST_BOUND, pw
    print(f"TTFR {ttfr:.2f}x eager, worst warm-up {pw['warmup_worst_ratio']:.1f}x median")
