"""`pwdaemon doctor`: the pre-deployment report, and its exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pwdaemon.serving.strategy import ORDER

TESTS = Path(__file__).resolve().parents[1]  # factories.py lives in tests/


def _doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pwdaemon", "doctor", *args],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=TESTS,
        env={"PYTHONPATH": str(TESTS), "PATH": "/usr/bin:/bin"},
    )


def test_doctor_reports_pieces_strategy_and_shipping_for_a_traceable_model() -> None:
    r = _doctor(
        "factories:small_mlp", "--inputs", "factories:small_inputs", "--no-compile", "--json"
    )
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [p["strategy"] for p in report["pieces"]] == [ORDER[0].value]  # no fall-back
    assert report["pieces"][0]["specializable"] and report["pieces"][0]["graph_bytes"] > 0
    assert report["planned_compiles"] == 1 + 3  # general + sizes 1, 2, 8
    assert report["problems"] == [] and report["mismatches"] == []


def test_doctor_exits_non_zero_when_nothing_can_be_compiled() -> None:
    r = _doctor("factories:identity", "--inputs", "factories:small_inputs", "--no-compile")
    assert r.returncode == 1, r.stdout + r.stderr
    assert "traced nothing" in r.stdout


def test_doctor_refuses_a_bad_factory_with_a_usage_error() -> None:
    r = _doctor("factories:no_such_factory")
    assert r.returncode == 2
    assert "has no attribute 'no_such_factory'" in r.stdout
