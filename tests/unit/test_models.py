"""Tests for pwdaemon.models: the bundled transformer, its variants, and that dynamo
captures it as one graph for every batch size (size 1 included) under pwdaemon."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

import pwdaemon
from pwdaemon.models import (
    DEMO_CONFIG,
    LARGER_CONFIG,
    TinyTransformer,
    TransformerConfig,
    demo_model,
    example_tokens,
    larger,
)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_demo_model_shape_and_mode() -> None:
    model = demo_model()
    assert isinstance(model, TinyTransformer)
    assert not model.training
    cfg = model.config
    assert cfg == DEMO_CONFIG
    assert cfg.layers == 2 and 64 <= cfg.d_model <= 128 and cfg.vocab == 1000
    tokens = example_tokens(3)
    assert tokens.shape == (3, cfg.seq) and tokens.dtype == torch.int64
    with torch.no_grad():
        out = model(tokens)
    assert out.shape == (3, cfg.seq, cfg.vocab)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()


def test_same_seed_same_weights() -> None:
    a, b, c = demo_model(0), demo_model(0), demo_model(1)
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert not all(
        torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters(), strict=True)
    )


def test_building_does_not_disturb_the_callers_rng() -> None:
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    demo_model(seed=9)
    assert torch.equal(torch.rand(4), expected)


def test_larger_is_larger() -> None:
    small, big = demo_model(), larger()
    assert not big.training
    assert big.config == LARGER_CONFIG
    assert big.config.layers > small.config.layers
    assert big.config.d_model > small.config.d_model
    assert n_params(big) > 2 * n_params(small)
    with torch.no_grad():
        out = big(example_tokens(2, big.config))
    assert out.shape == (2, big.config.seq, big.config.vocab)


def test_attention_is_causal() -> None:
    model = demo_model()
    tokens = example_tokens(2)
    changed = tokens.clone()
    changed[:, -1] = (changed[:, -1] + 1) % model.config.vocab
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    # Only the last position sees the last token.
    torch.testing.assert_close(a[:, :-1], b[:, :-1])
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_batch_rows_are_independent() -> None:
    model = demo_model()
    tokens = example_tokens(5)
    with torch.no_grad():
        whole = model(tokens)
        one = model(tokens[2:3])
    torch.testing.assert_close(whole[2:3], one, atol=1e-5, rtol=1e-5)


def test_example_tokens() -> None:
    gen = torch.Generator().manual_seed(0)
    a = example_tokens(4, generator=gen)
    gen = torch.Generator().manual_seed(0)
    b = example_tokens(4, generator=gen)
    assert torch.equal(a, b)
    assert int(a.min()) >= 0 and int(a.max()) < DEMO_CONFIG.vocab
    with pytest.raises(ValueError):
        example_tokens(0)


@pytest.mark.parametrize(
    "kwargs",
    [{"d_model": 63, "heads": 4}, {"layers": 0}, {"vocab": 0}, {"seq": -1}],
)
def test_bad_config(kwargs: dict[str, int]) -> None:
    with pytest.raises(ValueError):
        TransformerConfig(**kwargs)  # type: ignore[arg-type]


def test_one_graph_for_fifty_sizes() -> None:
    """Dynamo captures the model once (unbacked batch) and never retraces for a size."""
    model = demo_model()
    reference = demo_model()
    graphs_before = counters["stats"]["unique_graphs"]
    handle = pwdaemon.attach(model, compile=False)
    sizes = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 31, 32, 33, 64, 100, 127, 128, 129, 255, 256]
    sizes += [n for n in range(10, 100) if n not in sizes][:30]
    assert len(set(sizes)) == 50
    try:
        with torch.no_grad():
            for n in sizes:
                tokens = example_tokens(n)
                out = model(tokens)
                torch.testing.assert_close(out, reference(tokens), atol=1e-5, rtol=1e-5)
        assert len(handle.pieces) == 1
        piece = handle.pieces[0]
        assert piece.specializable
        assert piece.size_symbol is not None
        assert counters["stats"]["unique_graphs"] - graphs_before == 1
        assert set(handle.dispatchers[0].histogram()) == set(sizes)
    finally:
        handle.detach()


def test_larger_is_one_graph_too() -> None:
    model = larger()
    handle = pwdaemon.attach(model, compile=False)
    try:
        with torch.no_grad():
            for n in (1, 2, 9, 64):
                model(example_tokens(n, model.config))
        assert len(handle.pieces) == 1
        assert handle.pieces[0].specializable
    finally:
        handle.detach()
