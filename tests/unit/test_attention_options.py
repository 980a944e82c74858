"""The compile options name the attention backends the serving process turned off.

`torch.backends.cuda.enable_*_sdp` are global flags a worker, a fresh process, does not
share (tests/integration/test_attention_backends.py compiles with them). Nothing is added
while every backend is on, so the store keys of the default stay what they were.
"""

from __future__ import annotations

import types
from typing import cast

import torch

from pwdaemon.engine.store_link import compile_options
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.workers.sdpa import SDPA_OFF_OPTION, sdpa_backends_off


def _piece(device: str) -> GraphPiece:
    # compile_options reads a piece's strategy and device only.
    return cast(GraphPiece, types.SimpleNamespace(strategy=ShapeStrategy.UNBACKED, device=device))


def test_compile_options_name_the_attention_backends_turned_off_and_nothing_by_default(
    sdpa_backends_restored: None,
) -> None:
    assert sdpa_backends_off() == []
    assert SDPA_OFF_OPTION not in compile_options({}, _piece("cuda:0"))
    torch.backends.cuda.enable_flash_sdp(False)
    torch.backends.cuda.enable_cudnn_sdp(False)
    assert compile_options({"max_autotune": False}, _piece("cuda:0")) == {
        "max_autotune": False,
        SDPA_OFF_OPTION: ["cudnn", "flash"],
    }
    assert compile_options({}, _piece("cpu"))[SDPA_OFF_OPTION] == ["cudnn", "flash"]
