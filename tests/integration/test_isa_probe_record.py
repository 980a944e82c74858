"""The ISA probe's record across real processes: the second one probes nothing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_CHILD = """
import json
from torch._inductor import cpu_vec_isa
from pwdaemon.workers import isa_record

calls = []
probe = cpu_vec_isa.VecISA.check_build
def counting(isa, code):
    calls.append(type(isa).__name__)
    return probe(isa, code)
cpu_vec_isa.VecISA.check_build = counting
isa_record.install()
isa = cpu_vec_isa.pick_vec_isa()
print(json.dumps({"calls": len(calls), "isa": str(isa), "flags": isa.build_arch_flags()}))
"""


@pytest.mark.slow
def test_a_second_process_picks_the_same_isa_without_probing(tmp_path: Path) -> None:
    # Real probes: g++ and the dlopen child, in a fresh Inductor cache.
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}

    def pick() -> dict[str, object]:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
        )
        assert out.returncode == 0, out.stderr[-3000:]
        result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
        return result

    first = pick()
    if not first["isa"]:
        pytest.skip("no vector ISA builds here (no C++ compiler?): nothing to record")
    assert isinstance(first["calls"], int) and first["calls"] >= 1
    second = pick()
    assert second == {**first, "calls": 0}
