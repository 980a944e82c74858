"""Validation of a candidate runnable against the one it replaces, on a real input.

A compiled kernel may reorder reductions, so outputs are compared within a tolerance
chosen by dtype (the same spirit as `torch.testing.assert_close`'s defaults, a little
wider for the low-precision types where fused kernels round differently).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch

from pwdaemon.serving.inputs import copy_input

log = logging.getLogger(__name__)

# (rtol, atol) per dtype; anything not listed is compared exactly.
TOLERANCES: dict[torch.dtype, tuple[float, float]] = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (1e-2, 1e-2),
    torch.bfloat16: (2e-2, 2e-2),
}


def _flatten(out: Any) -> list[Any]:
    if isinstance(out, tuple | list):
        flat: list[Any] = []
        for o in out:
            flat.extend(_flatten(o))
        return flat
    return [out]


def fresh_args(args: Sequence[Any]) -> list[Any]:
    """Copies of the non-parameter tensors, so neither run can disturb the sample."""
    return [copy_input(a) for a in args]


def compare_outputs(candidate: Any, reference: Any) -> str | None:
    """None when they agree; otherwise a reason a person can read."""
    got, want = _flatten(candidate), _flatten(reference)
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if isinstance(w, torch.Tensor):
            if not isinstance(g, torch.Tensor):
                return f"output {i} is {type(g).__name__}, expected a tensor"
            if g.shape != w.shape or g.dtype != w.dtype:
                return (
                    f"output {i} is {tuple(g.shape)} {g.dtype}, expected {tuple(w.shape)} {w.dtype}"
                )
            rtol, atol = TOLERANCES.get(w.dtype, (0.0, 0.0))
            g64, w64 = g.detach().double().cpu(), w.detach().double().cpu()
            if bool(torch.isnan(g64).ne(torch.isnan(w64)).any()):
                return f"output {i}: NaN where the reference has none (or the reverse)"
            diff = (g64 - w64).abs().nan_to_num(0.0)
            bound = atol + rtol * w64.abs().nan_to_num(0.0)
            if bool((diff > bound).any()):
                worst = float((diff - bound).max())
                return (
                    f"output {i} differs beyond rtol={rtol:g} atol={atol:g} "
                    f"(max excess {worst:.3g}, max abs diff {float(diff.max()):.3g})"
                )
        elif g != w:
            return f"output {i} is {g!r}, expected {w!r}"
    return None


def validate(
    candidate: Callable[..., Any],
    reference: Callable[..., Any],
    args: Sequence[Any],
    eager: Callable[..., Any] | None = None,
) -> str | None:
    """Run both on copies of `args` (no grad) and compare; None means accept.

    A reference that raises is the runnable serving the size now failing on it (seen:
    a general compile's cuDNN attention on an H200 at one size): the candidate is then
    compared with `eager`, the piece's own graph, since replacing a runnable that
    raises is the swap most worth making."""
    with torch.no_grad():
        try:
            want = reference(*fresh_args(args))
        except Exception as exc:
            if eager is None or eager is reference:
                raise
            log.warning(
                "pwdaemon: the runnable serving this size raised %s while validating its "
                "replacement; comparing with eager instead",
                type(exc).__name__,
            )
            want = eager(*fresh_args(args))
        try:
            got = candidate(*fresh_args(args))
        except Exception as exc:
            return f"candidate raised {type(exc).__name__}: {exc}"
    return compare_outputs(got, want)


def tile_input(
    args: Sequence[Any],
    from_size: int,
    to_size: int,
    size_indices: Sequence[int],
    size_dims: Sequence[Sequence[int]],
) -> tuple[Any, ...] | None:
    """A recorded input of `from_size` made into one of `to_size`: each size dimension's
    rows taken in turn (`i % from_size`), the size arguments set to `to_size`, module
    state and other arguments as they are. None when the input does not have the shape
    the graph's facts describe (a piece whose size dims are unknown is never tiled).

    Real rows, repeated: token ids stay in their vocabulary and masks stay masks, so the
    candidate and the runnable it replaces run on an input a caller could send. A size
    loaded from the store before any call of it (a warm restart: no recorded input of
    that size yet) is validated on one, and pays its first invocation's one-time costs
    (AOTAutograd's check of custom ops' aliasing: 3.4-5.1 ms against 0.6-0.8 ms for
    tiny Llama) there instead of on its first serving call."""
    if len(size_dims) != len(args) or from_size < 1 or to_size < 1:
        return None
    out = list(args)
    for i in size_indices:
        if out[i] != from_size:
            return None
        out[i] = to_size
    for i, dims in enumerate(size_dims):
        a = out[i]
        if not dims:
            continue
        if not isinstance(a, torch.Tensor) or any(a.shape[d] != from_size for d in dims):
            return None
        rows = torch.arange(to_size, device=a.device) % from_size
        for d in dims:
            a = a.index_select(d, rows)
        out[i] = a
    return tuple(out)


def reject_category(reason: str) -> str:
    """A low-cardinality label for a rejection reason (for metrics)."""
    if reason.startswith("candidate raised"):
        return "raised"
    if "NaN" in reason:
        return "nan"
    if "differs beyond" in reason:
        return "mismatch"
    return "structure"
