"""A piece with a dynamic size besides the specialized one says where it comes from and
which `dynamic=` would size the model on it (`pwdaemon.serving.size_hint`)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import Tokens
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.size_hint import dynamic_spec, general_only_hint


def _serve_lengths(model: nn.Module, reference: nn.Module) -> None:
    """Batches of 2 at lengths 3-6, each checked against the eager model (float32
    default tolerances of `assert_close`)."""
    with torch.inference_mode():
        for length in (3, 4, 5, 6):
            ids = torch.randint(0, 50, (2, length))
            torch.testing.assert_close(model(input_ids=ids), reference(ids))


def test_lengths_varying_under_batch_sizing_warn_with_the_dynamic_that_fixes_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    torch.manual_seed(0)
    model = Tokens().eval()
    reference = copy.deepcopy(model)
    handle = pwd.attach(model, compile=False, store=False, trace="inline")
    try:
        with caplog.at_level(logging.WARNING, logger="pwdaemon"):
            _serve_lengths(model, reference)
        (piece,) = (p for p in handle._tracer.pieces if p.extra_symbols)
        assert not piece.specializable
        (symbol,) = piece.extra_symbols
        # Called with a keyword, the argument reaches dynamo's frame through **kwargs.
        assert piece.extra_dims == ((symbol, "L['kwargs']['input_ids']", 1),)
        advice = "attach(model, dynamic={'input_ids': 1})"
        assert f"input_ids dim 1 ({symbol})" in piece.size_hint and advice in piece.size_hint
        warned = [r.getMessage() for r in caplog.records if advice in r.getMessage()]
        assert len(warned) == 1, caplog.text  # once per piece, not per call
        assert advice in str(handle.status())
    finally:
        handle.detach()


def test_following_the_advice_gives_one_specializable_piece() -> None:
    torch.manual_seed(0)
    model = Tokens().eval()
    reference = copy.deepcopy(model)
    handle = pwd.attach(model, compile=False, store=False, trace="inline", dynamic={"input_ids": 1})
    try:
        _serve_lengths(model, reference)
        pieces = handle._tracer.pieces
        assert pieces and all(p.specializable and not p.size_hint for p in pieces)
    finally:
        handle.detach()


PARAMS = ("input_ids", "attention_mask")


@pytest.mark.parametrize(
    ("source", "argument"),
    [
        ("L['input_ids']", "input_ids"),
        ("L['kwargs']['input_ids']", "input_ids"),  # called through **kwargs
        ("L['args'][1]", "attention_mask"),  # called through *args
    ],
)
def test_a_forward_argument_is_named_as_dynamic_takes_it(source: str, argument: str) -> None:
    dims = (("s1", source, 1),)
    hint = general_only_hint(dims, ("s1",), PARAMS, dynamic_spec(dims, PARAMS))
    assert f"dynamic={{{argument!r}: 1}}" in hint


def test_two_inputs_of_one_symbol_are_one_spec() -> None:
    dims = (("s1", "L['input_ids']", 1), ("s1", "L['attention_mask']", 1))
    hint = general_only_hint(dims, ("s1",), PARAMS, dynamic_spec(dims, PARAMS))
    assert "dynamic={'input_ids': 1, 'attention_mask': 1}" in hint


@pytest.mark.parametrize(
    "dims",
    [
        (("s1", "L['hidden_states']", 1),),  # an inner frame's local: not forward's
        (("s1", "L['past'][0]", 2),),  # a tensor inside an argument
        (("s1", "L['input_ids']", 1), ("s2", "L['attention_mask']", 2)),  # two sizes
        (),  # a graph without dynamo's metadata (loaded)
    ],
)
def test_no_spec_is_offered_where_dynamic_cannot_express_it(
    dims: tuple[tuple[str, str, int], ...],
) -> None:
    assert dynamic_spec(dims, PARAMS) is None
    symbols = tuple(sorted({d[0] for d in dims})) or ("s1",)
    hint = general_only_hint(dims, symbols, PARAMS, dynamic_spec(dims, PARAMS))
    assert "general compile only" in hint and "dynamic=" not in hint
