"""Which call arguments belong to the caller, and private copies of them.

A graph piece's flat arguments mix the module's own state (parameters and buffers,
which dynamo lifts into graph inputs) with the caller's tensors. Module state is live
and shared: it is referenced, never copied. A caller's tensor may be reused or mutated
after the call returns, so anything kept past the call (a validation sample, a CUDA-graph
input slot, a background trace's inputs) is a copy.
"""

from __future__ import annotations

from collections.abc import Set
from typing import Any

import torch


def is_caller_tensor(a: object, state_ids: Set[int] = frozenset()) -> bool:
    """True for a tensor that the caller passed in (not a parameter or a known buffer)."""
    return (
        isinstance(a, torch.Tensor)
        and not isinstance(a, torch.nn.Parameter)
        and id(a) not in state_ids
    )


def copy_input(a: Any, state_ids: Set[int] = frozenset()) -> Any:
    """A private copy of a caller's tensor; module state and non-tensors as they are."""
    if is_caller_tensor(a, state_ids):
        return a.detach().clone()
    return a


def copy_for_trace(a: Any) -> Any:
    """A private copy of a caller's tensor that dynamo's guards cannot tell from it.

    Dynamo guards on whether a tensor is an inference tensor and on `requires_grad`: a
    piece traced on a copy made inside `inference_mode` from a normal tensor would not
    serve the normal tensors of later calls (each of them a miss, traced again).
    """
    if not is_caller_tensor(a):
        return a
    with torch.inference_mode(a.is_inference()):
        c = a.detach().clone()
    if a.requires_grad:
        c.requires_grad_(True)
    return c
