"""A worker compiles with the attention backends the serving process left on.

`torch.backends.cuda.enable_*_sdp` are global flags of the serving process; a worker is a
fresh process, and Inductor picks the attention kernel while it compiles. A server that
turned cuDNN attention off (torch keeps cuDNN's attention plans per thread: each new
size costs the calling thread 85-95 ms on an H100, bench/first_calls.py) still got cuDNN
attention in every compiled graph. Proves (the options that carry them:
tests/unit/test_attention_options.py): a job compiles with exactly
those off and the worker's own flags come back after it (real Inductor, CPU); on a GPU,
an attached model's stored artifacts hold no fused attention kernel when the serving
process turned all three off, and do when it did not, with outputs equal to eager's
(fp16: 1e-2).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
import torch.nn.functional as F
from recorded import assert_matches, capture
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.range_table import Target
from pwdaemon.store import ArtifactStore
from pwdaemon.workers.compiler import JobSpec, compile_job, load_artifact
from pwdaemon.workers.sdpa import (
    SDPA_OFF_OPTION,
    sdpa_backends_off,
    sdpa_flags,
    set_sdpa_flags,
)
from pwdaemon.workers.shipping import dump_graph

FUSED = (
    b"_scaled_dot_product_cudnn_attention",
    b"_scaled_dot_product_flash_attention",
    b"_scaled_dot_product_efficient_attention",
)


class Attention(nn.Module):
    """One self-attention over (batch, 16, 64): 4 heads of 16."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv = nn.Linear(64, 192)
        self.out = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 4, 16).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, 64))


@pytest.mark.slow
def test_a_job_compiles_with_the_backends_it_names_off_and_the_worker_keeps_its_own(
    sdpa_backends_restored: None, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # compile_job is what a worker process runs for each job; here in this process, with
    # real Inductor, so that the flags in force inside Inductor's compile can be read.
    import torch._inductor
    import torch.compiler.config as compiler_config

    model = Attention().eval()
    recorded = capture(model, [{"x": torch.randn(3, 16, 64)}])
    (gm,) = recorded.gms
    seen: list[dict[str, Any]] = []
    real = torch._inductor.standalone_compile

    def spy(*args: Any, **kwargs: Any) -> Any:
        flags: dict[str, Any] = {**sdpa_flags(), "tag": compiler_config.cache_key_tag}
        seen.append(flags)
        return cast(Callable[..., Any], real)(*args, **kwargs)

    monkeypatch.setattr(torch._inductor, "standalone_compile", spy)
    before = sdpa_backends_off()
    spec = JobSpec(
        dump_graph(gm, "attention"),
        Target.general(),
        str(tmp_path / "general.bin"),
        {SDPA_OFF_OPTION: ["cudnn", "mem_efficient"]},
    )
    result = compile_job(spec)
    assert seen and seen[0] == {
        "cudnn": False,
        "flash": True,
        "mem_efficient": False,
        "math": True,
        "tag": "pwdaemon-sdpa-off:cudnn,mem_efficient",  # in Inductor's cache keys
    }, seen
    assert sdpa_backends_off() == before  # the worker's own flags, back
    assert compiler_config.cache_key_tag == ""
    runnable = load_artifact(result["path"])
    for args, expected in recorded.calls[0]:
        assert_matches(runnable(*args), expected)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_server_that_turned_fused_attention_off_gets_no_fused_kernel_compiled(
    sdpa_backends_restored: None, tmp_path: Path
) -> None:
    found: dict[bool, list[bytes]] = {}
    for fused_off in (False, True):
        set_sdpa_flags(dict.fromkeys(("cudnn", "flash", "mem_efficient"), not fused_off))
        torch.manual_seed(0)
        model = Attention().cuda().half().eval()
        reference = Attention().cuda().half().eval()
        reference.load_state_dict(model.state_dict())
        store = tmp_path / f"store-{fused_off}"
        x = {n: torch.randn(n, 16, 64, device="cuda", dtype=torch.half) for n in (2, 5)}
        # No sizes: the general (or its range) is all the artifacts need to show.
        policy = pwd.PolicyConfig(budget=0)
        with (
            torch.inference_mode(),
            pwd.attach(model, store=str(store), policy=policy) as handle,
        ):
            model(x[2])
            assert handle.wait_traced(120)
            model(x[2])
            assert handle.wait(timeout=300), str(handle.status())
            # The general, or where a backed trace guards the batch above 1 (torch 2.11:
            # `Ne(s, 1)`), the range of every size above 1 that the engine compiles instead.
            tier = handle.table().lookup(5).tier
            assert tier in (pwd.Tier.GENERAL, pwd.Tier.RANGE), str(handle.status())
            for t in x.values():
                torch.testing.assert_close(model(t), reference(t), atol=1e-2, rtol=1e-2)
        artifacts = ArtifactStore(store)
        blobs = [artifacts.artifact_path(m.key).read_bytes() for m in artifacts.entries()]
        assert blobs, f"nothing stored in {store}"
        found[fused_off] = [name for name in FUSED if any(name in b for b in blobs)]
    assert found[True] == [], found  # the math path alone
    assert found[False], found  # torch's default picks a fused kernel on this GPU
