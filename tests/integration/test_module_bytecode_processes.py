"""Inductor's generated modules across real processes: the process that compiles a graph
keeps its module's bytecode; the next one, loading it from Inductor's cache, executes
that bytecode without compiling the module's source (one C call that keeps the GIL)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

# Counts compile() calls on files inside Inductor's cache, compiles a small function
# (the second process finds it in the FX graph cache and loads its module), and
# checks it against eager.
_CHILD = """
import builtins, json, os, sys
import torch
from pwdaemon.workers import module_bytecode

if sys.argv[1] == "on":
    module_bytecode.install()
root = os.path.realpath(os.environ["TORCHINDUCTOR_CACHE_DIR"])
compiled = []
real = builtins.compile
def counting(source, filename, *args, **kwargs):
    if isinstance(filename, str) and os.path.realpath(filename).startswith(root):
        compiled.append(filename)
    return real(source, filename, *args, **kwargs)
builtins.compile = counting
fn = torch.compile(lambda x: torch.tanh(x * 3) + x.sum(dim=1, keepdim=True), dynamic=False)
x = torch.linspace(-1, 1, 48).reshape(6, 8)
diff = float((fn(x) - (torch.tanh(x * 3) + x.sum(dim=1, keepdim=True))).abs().max())
print(json.dumps({"compiled": len(compiled), "diff": diff}))
"""


def _run(cache: Path, bytecode: str) -> dict[str, float]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, bytecode],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, float] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_later_process_loads_inductors_module_without_compiling_its_source(
    tmp_path: Path,
) -> None:
    first = _run(tmp_path, "on")
    assert first["compiled"] >= 1  # the module written and compiled, its bytecode kept
    assert list(tmp_path.rglob("*.pwdaemon.pyc"))
    plain = _run(tmp_path, "off")  # torch as it is: the loaded module compiled again
    assert plain["compiled"] >= 1
    again = _run(tmp_path, "on")
    assert again["compiled"] == 0
    # float32 on the CPU; Inductor's fused tanh may round differently from eager's.
    assert first["diff"] <= 1e-5 and plain["diff"] <= 1e-5 and again["diff"] <= 1e-5
