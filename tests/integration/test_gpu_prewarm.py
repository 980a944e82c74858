"""The loader's pre-warm on a GPU: Triton's source key is computed before any kernel
loads. Skipped cleanly where there is no GPU (CI)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# A fresh process that loads no kernel: only the pre-warm can have computed the key.
CHILD = """
import pwdaemon
try:
    from triton.runtime.cache import triton_key
except ImportError:
    from triton.compiler.compiler import triton_key
pwdaemon.prewarm().join(120)
info = getattr(triton_key, "cache_info", None)
print(info().currsize if info is not None else "uncached")
"""


def test_the_pre_warm_computes_tritons_key_before_any_kernel_loads() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=180, check=True
    )
    answer = out.stdout.split()[-1]
    if answer == "uncached":
        pytest.skip("this Triton does not cache its source key (nothing to compute early)")
    assert answer == "1", out.stderr[-2000:]
