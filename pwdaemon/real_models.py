"""Real architectures from small configs: transformers' BERT, GPT-2, Llama; torch.nn's.

pwdaemon counts a feature as working when it works on models nobody here wrote. This
module builds them the same way everywhere (tests, `bench/models.py`, `pwdaemon doctor`,
`pwdaemon warm`): random weights from a seed, small configs, no downloads, eval mode.
transformers is imported only when a transformers model is built (it is a dev
dependency, not a runtime one).

Each model is a `ModelSpec`: `build(device, dtype)` returns the module, `inputs(batch)`
returns `(args, kwargs)` for one call whose size (dim 0 of every tensor) is `batch`.
Sequence lengths are fixed per spec, so the one dynamic size is the batch; for a
transformers model sized on its sequence dim instead, `sequence_inputs` makes the calls
and `SEQUENCE_DIMS` is the `dynamic=` that marks them.

Two presets: "tiny" (seconds to compile on a 2-core CPU) and "issue" (the shapes the
GPU issues measured: BERT MiniLM-shaped, Llama 8 layers of 1024 with GQA).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

__all__ = (
    "CAUSAL_LMS",
    "MODEL_NAMES",
    "SEQUENCE_DIMS",
    "ModelSpec",
    "causal_lm",
    "model_spec",
    "sequence_inputs",
)

Inputs = tuple[tuple[Any, ...], dict[str, Any]]


@dataclass(frozen=True)
class ModelSpec:
    """How to build one model and its inputs."""

    name: str
    build: Callable[[torch.device, torch.dtype], nn.Module]
    inputs: Callable[[int, torch.device, torch.dtype], Inputs]
    # True for transformers models: the test matrix skips them if transformers is absent.
    needs_transformers: bool = False


def _seeded(build: Callable[[], nn.Module], device: torch.device, dtype: torch.dtype) -> nn.Module:
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        model = build()
    finally:
        torch.random.set_rng_state(state)  # building must not disturb the caller's stream
    return model.to(device=device, dtype=dtype).eval()


def _token_inputs(vocab: int, seq: int, mask: bool) -> Callable[..., Inputs]:
    def make(batch: int, device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(batch)
        ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        kwargs: dict[str, Any] = {"input_ids": ids}
        if mask:
            kwargs["attention_mask"] = torch.ones(batch, seq, dtype=torch.long, device=device)
        return (), kwargs

    return make


# A transformers model sized on its sequence dim, as a server that batches requests by
# length calls it: `attach(model, dynamic=SEQUENCE_DIMS)` with `sequence_inputs` calls.
SEQUENCE_DIMS = {"input_ids": 1, "attention_mask": 1}


def sequence_inputs(model: nn.Module, length: int, device: torch.device, batch: int = 2) -> Inputs:
    """One call of a transformers `model` whose size is the sequence `length` (token ids
    from the model's vocabulary, seeded by the length; a mask of ones)."""
    g = torch.Generator().manual_seed(length)
    vocab = int(cast(Any, model).config.vocab_size)  # a transformers model's config
    ids = torch.randint(0, vocab, (batch, length), generator=g).to(device)
    mask = torch.ones(batch, length, dtype=torch.long, device=device)
    return (), {"input_ids": ids, "attention_mask": mask}


def _dense_inputs(*shape: int) -> Callable[..., Inputs]:
    def make(batch: int, device: torch.device, dtype: torch.dtype) -> Inputs:
        g = torch.Generator().manual_seed(batch)
        return (torch.randn(batch, *shape, generator=g).to(device=device, dtype=dtype),), {}

    return make


# transformers model class, its config class, and config fields per preset (tiny, issue).
_TRANSFORMERS: dict[str, tuple[str, str, dict[str, tuple[Any, Any]]]] = {
    "bert": (
        "BertModel",
        "BertConfig",
        {
            "hidden_size": (64, 384),  # issue: MiniLM-shaped
            "num_hidden_layers": (2, 6),
            "num_attention_heads": (4, 12),
            "intermediate_size": (128, 1536),
        },
    ),
    "gpt2": (
        "GPT2Model",
        "GPT2Config",
        {
            "n_embd": (64, 256),
            "n_layer": (2, 4),
            "n_head": (4, 4),
            # GPT-2's default token ids (50256) lie outside this vocabulary.
            "bos_token_id": (0, 0),
            "eos_token_id": (0, 0),
        },
    ),
    "llama": (
        "LlamaModel",
        "LlamaConfig",
        {
            "hidden_size": (64, 1024),
            "intermediate_size": (128, 2816),
            "num_hidden_layers": (2, 8),
            "num_attention_heads": (4, 16),
            "num_key_value_heads": (2, 4),  # grouped-query attention
        },
    ),
}
_VOCAB = 1000
_MAX_POSITIONS = 512  # GPT-2 names it n_positions, the others max_position_embeddings


def _transformers(name: str, preset: str) -> ModelSpec:
    model_cls, config_cls, fields = _TRANSFORMERS[name]
    big = preset == "issue"

    def build() -> nn.Module:
        import transformers

        values = {k: v[big] for k, v in fields.items()}
        positions = "n_positions" if name == "gpt2" else "max_position_embeddings"
        config = getattr(transformers, config_cls)(
            vocab_size=_VOCAB, **{positions: _MAX_POSITIONS}, **values
        )
        extra = {"add_pooling_layer": False} if name == "bert" else {}
        model: nn.Module = getattr(transformers, model_cls)(config, **extra)
        return model

    return ModelSpec(
        name,
        lambda d, t: _seeded(build, d, t),
        _token_inputs(_VOCAB, 128 if big else 16, mask=True),
        needs_transformers=True,
    )


def _sequential(preset: str) -> ModelSpec:
    width = 512 if preset == "issue" else 32

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width), nn.LayerNorm(width)
        )

    return ModelSpec("sequential", lambda d, t: _seeded(build, d, t), _dense_inputs(width))


def _transformer_encoder(preset: str) -> ModelSpec:
    big = preset == "issue"
    d_model, seq = (256, 64) if big else (32, 8)

    def build() -> nn.Module:
        layer = nn.TransformerEncoderLayer(
            d_model=d_model, nhead=4, dim_feedforward=2 * d_model, batch_first=True
        )
        return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)

    return ModelSpec(
        "transformer_encoder",
        lambda d, t: _seeded(build, d, t),
        _dense_inputs(seq, d_model),
    )


_SPECS: dict[str, Callable[[str], ModelSpec]] = {
    "sequential": _sequential,
    "transformer_encoder": _transformer_encoder,
    **{name: functools.partial(_transformers, name) for name in _TRANSFORMERS},
}
MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)


def model_spec(name: str, preset: str = "tiny") -> ModelSpec:
    """The spec of one model by name (see `MODEL_NAMES`); preset "tiny" or "issue"."""
    if preset not in ("tiny", "issue"):
        raise ValueError(f"preset must be 'tiny' or 'issue', got {preset!r}")
    try:
        return _SPECS[name](preset)
    except KeyError:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)}") from None


# Importable factories for the command line (`pwdaemon doctor pwdaemon.real_models:bert
# --inputs pwdaemon.real_models:bert_inputs`, `pwdaemon warm ...`): CPU, float32, tiny.
_CPU = torch.device("cpu")


def _factory(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        return model_spec(name).build(_CPU, torch.float32)

    build.__name__ = name
    return build


def _inputs(name: str) -> Callable[[int], Inputs]:
    def make(batch: int) -> Inputs:
        return model_spec(name).inputs(batch, _CPU, torch.float32)

    make.__name__ = f"{name}_inputs"
    return make


bert, bert_inputs = _factory("bert"), _inputs("bert")
gpt2, gpt2_inputs = _factory("gpt2"), _inputs("gpt2")
llama, llama_inputs = _factory("llama"), _inputs("llama")
sequential, sequential_inputs = _factory("sequential"), _inputs("sequential")
transformer_encoder = _factory("transformer_encoder")
transformer_encoder_inputs = _inputs("transformer_encoder")


# The models `causal_lm` builds with a language-model head, for `generate()`.
CAUSAL_LMS = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}


def causal_lm(name: str, vocab: int = 100) -> nn.Module:
    """transformers' GPT-2 or Llama with its language-model head, the "tiny" preset's
    shape, for `generate()`: seeded random weights, eval mode, CPU float32. No
    end-of-sequence token: a greedy generation runs its whole length."""
    import transformers

    _, config_cls, fields = _TRANSFORMERS[name]
    values = {k: v[0] for k, v in fields.items()}
    values.update(bos_token_id=0, eos_token_id=None)
    config = getattr(transformers, config_cls)(vocab_size=vocab, **values)
    return _seeded(lambda: getattr(transformers, CAUSAL_LMS[name])(config), _CPU, torch.float32)
