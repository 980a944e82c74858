"""The loader's pre-warm on a GPU: Triton's source key is computed (or replayed from the
store's record) before any kernel loads. Skipped cleanly where there is no GPU (CI)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

# A fresh process that loads no kernel: only the pre-warm can have computed the key.
# `fill_cache` is watched: it runs only when a recorded key is replayed.
CHILD = """
import json
import pwdaemon
from pwdaemon.workers import triton_source_key
try:
    from triton.runtime.cache import triton_key
except ImportError:
    from triton.compiler.compiler import triton_key
replayed = []
fill = triton_source_key.fill_cache
triton_source_key.fill_cache = lambda fn, key: replayed.append(key) or fill(fn, key)
pwdaemon.prewarm().join(120)
info = getattr(triton_key, "cache_info", None)
print(json.dumps({
    "cached": info().currsize if info is not None else None,
    "key": triton_key(),
    "real": triton_key.__wrapped__() if info is not None else None,
    "replayed": len(replayed),
}))
"""


def _prewarmed_process(cache_dir: Path) -> dict[str, object]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache_dir)}
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=180, env=env
    )
    assert out.returncode == 0, out.stderr[-2000:]
    answer: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return answer


def test_the_pre_warm_computes_tritons_key_and_the_next_process_replays_it(
    tmp_path: Path,
) -> None:
    first = _prewarmed_process(tmp_path)
    if first["cached"] is None:
        pytest.skip("this Triton does not cache its source key (nothing to compute early)")
    assert first["cached"] == 1 and first["replayed"] == 0
    assert first["key"] == first["real"]
    second = _prewarmed_process(tmp_path)  # the same store: Triton's key is recorded
    assert second["cached"] == 1 and second["replayed"] == 1
    # The replayed key is the one Triton's own body computes in that process.
    assert second["key"] == second["real"] == first["key"]
