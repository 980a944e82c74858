"""Inductor's set-up leaves kernel templates uncompiled, and a compile that renders
templates still builds a correct kernel (a real Inductor max-autotune compile)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TOLERANCE = 1e-4  # float32 bmm: the C++ GEMM template's blocking sums in another order

# A fresh process: templates built by an import before the set-up would stay compiled.
_CHILD = """
import json
import torch
from pwdaemon.workers.lazy_templates import LazyTemplate
from pwdaemon.workers.prewarm import set_up_inductor

compiled = []
first_use = LazyTemplate.compiled
def counting(self):
    if self._template is None:
        compiled.append(1)
    return first_use(self)
LazyTemplate.compiled = counting

set_up_inductor(probe_cpu=False)
from torch._inductor.kernel.mm import mm_template
after_set_up = len(compiled)

def f(a, b):
    return torch.bmm(a, b).relu()
a, b = torch.randn(4, 32, 64), torch.randn(4, 64, 48)
# The C++ GEMM template (the only autotune backend on a CPU) renders its templates.
fn = torch.compile(f, options={"max_autotune": True, "max_autotune_gemm_backends": "CPP"})
diff = float((fn(a, b) - f(a, b)).abs().max())
print(json.dumps({"kind": type(mm_template.template).__name__, "after_set_up": after_set_up,
                  "rendered": len(compiled), "diff": diff}))
"""


def test_templates_compile_on_first_render_and_the_rendered_kernel_matches_eager(
    tmp_path: Path,
) -> None:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", _CHILD], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["kind"] == "LazyTemplate"  # the module-level Triton template
    assert result["after_set_up"] == 0  # nothing compiled by the imports
    assert result["rendered"] > 0  # the compile rendered templates through the proxy
    assert result["diff"] <= TOLERANCE
