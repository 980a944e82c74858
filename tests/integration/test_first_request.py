"""The first request costs what eager costs, and no warm-up call waits for a compiler.

Each system runs in a fresh process of its own (`bench/models.py`), so first calls pay
what they pay in a real server. The bounds are generous: the benchmark carries the
targets (TTFR <= 1.5x eager's first call, worst warm-up call <= 2x its median); this
test catches regressions: tracing on the first call again (2.6 s, ~600x eager's first
call on the demo model), or a call that waits for a trace or a compile (seconds). The
worst warm-up call measured on this 2-core machine is 0.2-0.45 s (see the README: calls
slow down while compiles run, not wait for them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

BENCH = Path(__file__).resolve().parents[2] / "bench" / "models.py"
TTFR_BOUND = 10.0  # x eager's first call; measured 0.9-2.9 on the demo model
# ... or this much over eager's first call, whichever is larger. The demo's eager first
# call is 2.4-4.9 ms, so 10x is a few tens of ms: pwdaemon's first call took 3.4-15.7 ms
# in 40 fresh processes on 2026-12-03, and 25.7 ms once in a CI run (against 2.4 ms).
# On a loaded box a first call is any multiple of an idle one: 144 ms in a CI run of
# 2026-12-06 (two test processes on 2 CPUs; eager's, measured earlier in its own
# process, 4.5 ms), and with two CPU-bound processes beside the bench here eager's first
# call took 48 ms and pwdaemon's 148 ms (4 and 5 ms idle, 07:5x). What this test is for
# stays far above it: a trace on the first call costs 2.6 s.
TTFR_SLACK_S = 0.5
WORST_CALL_BOUND_S = 1.0  # any single warm-up call; measured 0.2-0.45 s


@pytest.mark.timeout(900)
def test_first_request_at_eager_speed_and_no_warm_up_call_waits_for_a_compiler(
    tmp_path: Path,
) -> None:
    command = [
        sys.executable, str(BENCH), "--models", "demo", "--systems", "eager,pwdaemon",
        "--sizes", "1", "--iters", "20", "--settle-timeout", "400",
        "--run-timeout", "420", "--min-warmup", "0", "--out", str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(command, capture_output=True, text=True, timeout=880)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (results,) = tmp_path.glob("*.json")
    by_system = {r["system"]: r for r in json.loads(results.read_text())}
    eager, pw = by_system["eager"], by_system["pwdaemon"]
    assert "error" not in eager and "error" not in pw, (eager, pw)
    assert pw["settled"], pw  # every size specialized: the warm-up really ran to its end
    # Warm-up calls are compared with medians of calls paced alike, per size.
    assert set(pw["paced_ms"]) == set(pw["eager_paced_ms"]) == {"1"}, pw
    ttfr = pw["first_call_s"] / eager["first_call_s"]
    bound_s = max(TTFR_BOUND * eager["first_call_s"], eager["first_call_s"] + TTFR_SLACK_S)
    assert pw["first_call_s"] <= bound_s, (ttfr, pw["first_call_s"], eager["first_call_s"])
    worst = pw["warmup_worst"]
    assert worst["ms"] <= WORST_CALL_BOUND_S * 1e3, worst
    print(f"TTFR {ttfr:.2f}x eager, worst warm-up call {worst}")
