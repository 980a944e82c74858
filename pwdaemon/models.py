"""Small bundled models for the demo, the tests and the benchmarks.

`TinyTransformer` is a decoder-style language model small enough to compile in seconds
on a laptop CPU: token embedding, learned positions, a few pre-LayerNorm blocks
(multi-head self-attention over the sequence, then an MLP) and a vocabulary head.

Its input is `tokens`, shape `(batch, seq)` int64, and its output logits
`(batch, seq, vocab)` float32. The sequence length is fixed at construction (positions
are learned for exactly `seq` slots), so the one dynamic size pwdaemon sees is the batch
(dim 0): "a size" is a batch. Attention is plain reshapes, matmuls and a softmax over
the last dimension, traceable by dynamo with an unbacked batch size.

- `demo_model(seed)`: the model `pwdaemon demo` serves (2 layers, d_model 64).
- `larger(seed)`: more layers and width, for benchmarks.
- `example_tokens(batch, ...)`: a random input of a given batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEMO_CONFIG",
    "LARGER_CONFIG",
    "TinyTransformer",
    "TransformerConfig",
    "demo_model",
    "example_tokens",
    "larger",
]


@dataclass(frozen=True)
class TransformerConfig:
    """Shape of a `TinyTransformer`."""

    vocab: int = 1000
    d_model: int = 64
    heads: int = 4
    layers: int = 2
    mlp_ratio: int = 4
    seq: int = 16
    causal: bool = True

    def __post_init__(self) -> None:
        for name in ("vocab", "d_model", "heads", "layers", "mlp_ratio", "seq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerConfig.{name} must be an int >= 1, got {value!r}")
        if self.d_model % self.heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of heads ({self.heads})")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads


DEMO_CONFIG = TransformerConfig()
LARGER_CONFIG = TransformerConfig(d_model=128, heads=8, layers=4)


class SelfAttention(nn.Module):
    """Multi-head self-attention over the sequence, written out with matmul + softmax."""

    mask: torch.Tensor

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.heads = config.heads
        self.head_dim = config.head_dim
        self.scale = 1.0 / math.sqrt(config.head_dim)
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)
        # Additive mask (0 or -inf above the diagonal); a buffer, so it moves with .to().
        mask = torch.zeros(config.seq, config.seq)
        if config.causal:
            mask = mask.masked_fill(
                torch.ones(config.seq, config.seq, dtype=torch.bool).triu(1), float("-inf")
            )
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        # (b, s, 3, h, hd) -> (3, b, h, s, hd); -1 would be fine too, but naming every
        # dim keeps the unbacked batch symbol the only symbol in the graph.
        qkv = self.qkv(x).view(b, s, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale + self.mask[:s, :s]
        attn = torch.softmax(scores, dim=-1)
        out = torch.matmul(attn, v)  # (b, h, s, hd)
        out = out.transpose(1, 2).reshape(b, s, d)
        return self.proj(out)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: TransformerConfig) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model)
        self.attn = SelfAttention(config)
        self.ln2 = nn.LayerNorm(config.d_model)
        hidden = config.mlp_ratio * config.d_model
        self.fc1 = nn.Linear(config.d_model, hidden)
        self.fc2 = nn.Linear(hidden, config.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    """A small decoder-only transformer: `tokens (batch, seq) int64 -> logits`."""

    positions: torch.Tensor

    def __init__(self, config: TransformerConfig = DEMO_CONFIG) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.d_model)
        self.pos = nn.Parameter(torch.zeros(config.seq, config.d_model))
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """GPT-2 style initialisation (normal 0.02), so logits are of sane magnitude."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens) + self.pos
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


def _build(config: TransformerConfig, seed: int) -> TinyTransformer:
    gen_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = TinyTransformer(config)
    finally:
        # Building a model must not disturb the caller's random stream.
        torch.random.set_rng_state(gen_state)
    return model.eval()


def demo_model(seed: int = 0) -> TinyTransformer:
    """The model `pwdaemon demo` serves: 2 layers, d_model 64, vocab 1000, seq 16; eval mode.

    Same seed, same weights.
    """
    return _build(DEMO_CONFIG, seed)


def larger(seed: int = 0) -> TinyTransformer:
    """A larger variant for benchmarks: 4 layers, d_model 128, 8 heads; eval mode."""
    return _build(LARGER_CONFIG, seed)


def example_tokens(
    batch: int,
    config: TransformerConfig = DEMO_CONFIG,
    *,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Random token ids of shape `(batch, config.seq)`, int64."""
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    return torch.randint(0, config.vocab, (batch, config.seq), generator=generator)
