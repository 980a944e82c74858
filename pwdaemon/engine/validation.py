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


def reject_category(reason: str) -> str:
    """A low-cardinality label for a rejection reason (for metrics)."""
    if reason.startswith("candidate raised"):
        return "raised"
    if "NaN" in reason:
        return "nan"
    if "differs beyond" in reason:
        return "mismatch"
    return "structure"
