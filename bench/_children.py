"""A bench's child interpreter, with this checkout's pwdaemon or a baseline checkout's."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any


def run_child(code: str, argv: list[str], what: str, baseline: str | None = None) -> dict[str, Any]:
    """`python -c code *argv`; its last stdout line, parsed as JSON. With `baseline`, the
    child imports that checkout's pwdaemon: its directory goes first on PYTHONPATH and is
    the child's working directory (`python -c` puts the working directory first on
    sys.path, before PYTHONPATH), and the child's `pwdaemon` field (its `pwd.__file__`)
    must lie in it. Exits with `what` and the child's stderr when it fails."""
    env, cwd = dict(os.environ), None
    if baseline is not None:
        cwd = baseline
        env["PYTHONPATH"] = os.pathsep.join(p for p in (baseline, env.get("PYTHONPATH")) if p)
    out = subprocess.run(
        [sys.executable, "-c", code, *argv],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=cwd,
    )
    if out.returncode != 0:
        raise SystemExit(f"{what} failed:\n{out.stderr[-4000:]}")
    result: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
    if baseline is not None and not Path(result["pwdaemon"]).is_relative_to(
        Path(baseline).resolve()
    ):
        raise SystemExit(f"{what}: imported {result['pwdaemon']}, not the baseline {baseline}")
    return result
