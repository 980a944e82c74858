"""More architectures users bring, beyond the real-model matrix: transformers' ResNet (conv
and batch norm), ViT (patches) and T5's encoder (relative position bias), tiny configs,
random weights, real Inductor in real workers, under `torch.inference_mode()`.

Each traces as one unbacked piece that no call misses; its general serves every batch,
1 included, and the configured size its own compile; every output equals eager within
atol=rtol=1e-4 (float32). On torch 2.11, whose only strategy is the backed one, the
piece traced at batch 4 does not serve batch 1 (dynamo's guard on the size): batch 1
misses, and would get a piece of its own once hot.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.strategy import ORDER, ShapeStrategy

pytestmark = pytest.mark.slow

TOL: dict[str, Any] = {"atol": 1e-4, "rtol": 1e-4}


def _build(name: str) -> nn.Module:
    import transformers as t

    torch.manual_seed(0)
    if name == "resnet":
        resnet = t.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic"
        )
        return t.ResNetModel(resnet).eval()
    if name == "vit":
        vit = t.ViTConfig(
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            image_size=32,
            patch_size=8,
        )
        return t.ViTModel(vit).eval()
    t5 = t.T5Config(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_heads=4, vocab_size=100)
    return t.T5EncoderModel(t5).eval()


def _inputs(name: str, batch: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(batch)
    if name == "resnet":
        return {"pixel_values": torch.randn(batch, 3, 64, 64, generator=g)}
    if name == "vit":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}
    ids = torch.randint(0, 100, (batch, 12), generator=g)
    mask = torch.ones(batch, 12, dtype=torch.long)
    if batch > 1:
        mask[0, -3:] = 0  # some padding
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("name", ["resnet", "vit", "t5"])
def test_an_architecture_is_one_piece_whose_general_serves_every_batch(
    name: str,
) -> None:
    model = _build(name)
    reference = _build(name)
    compiler = pwd.CompileConfig(workers=1, start_timeout_s=300)
    with torch.inference_mode(), pwd.attach(model, sizes=[4], compiler=compiler, store=False) as h:
        model(**_inputs(name, 4))
        assert h.wait_traced(300)
        for batch in (1, 2, 4, 7):
            model(**_inputs(name, batch))
        assert h.wait(timeout=600), str(h.status())
        trace = h.status().trace
        unbacked = ORDER[0] is ShapeStrategy.UNBACKED
        misses = 0 if unbacked else 1  # the one call of batch 1, before 2.12
        assert len(h.pieces) == 1 and trace.miss_calls == misses, str(h.status())
        assert h.pieces[0].strategy is ORDER[0], trace.attempts
        tiers = {n: h.table().lookup(n).tier for n in (3, 4, 7)}
        want = {3: pwd.Tier.GENERAL, 4: pwd.Tier.SIZE, 7: pwd.Tier.GENERAL}
        assert tiers == want, str(h.status())
        if unbacked:  # batch 1 reached the piece, and its general serves it
            assert 1 in h.pieces[0].dispatcher.histogram(), str(h.status())
            assert h.table().lookup(1).tier is pwd.Tier.GENERAL
        for batch in (1, 3, 4, 7):
            got = model(**_inputs(name, batch)).last_hidden_state
            want_out = reference(**_inputs(name, batch)).last_hidden_state
            torch.testing.assert_close(got, want_out, **TOL)
