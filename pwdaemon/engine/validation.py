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

from pwdaemon.engine.gpu_stream import engine_stream
from pwdaemon.serving.inputs import copy_input, wait_for_events

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
    """None when they agree; otherwise a reason a person can read.

    Each tensor pair is compared where it lies, and what the comparison found comes back
    to the host in one copy per device: on a GPU, one synchronization for all outputs
    (the issue-sized Llama's graph returns a key and a value cache per layer: 12 outputs
    and more, each copied whole in float64 before, two waits apiece, from memory the
    allocator may have had to ask the driver for). Floating outputs of 32 bits or fewer
    are compared in float32, whose rounding (about 6e-8 of a value) is far under the
    tolerances; float64 and exact types (integers, bool) in float64."""
    got, want = _flatten(candidate), _flatten(reference)
    if len(got) != len(want):
        return f"{len(got)} outputs, expected {len(want)}"
    # (output index, tolerances, [NaN mismatch, worst excess, worst difference])
    pending: list[tuple[int, float, float, torch.Tensor]] = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if isinstance(w, torch.Tensor):
            if not isinstance(g, torch.Tensor):
                return f"output {i} is {type(g).__name__}, expected a tensor"
            if g.shape != w.shape or g.dtype != w.dtype:
                return (
                    f"output {i} is {tuple(g.shape)} {g.dtype}, expected {tuple(w.shape)} {w.dtype}"
                )
            if g.device != w.device:
                g = g.to(w.device)
            rtol, atol = TOLERANCES.get(w.dtype, (0.0, 0.0))
            if w.numel():
                pending.append((i, rtol, atol, _discrepancy(g.detach(), w.detach(), rtol, atol)))
        elif g != w:
            return f"output {i} is {g!r}, expected {w!r}"
    found = _to_host([found for _, _, _, found in pending])
    for (i, rtol, atol, _), (nan_mismatch, excess, worst) in zip(pending, found, strict=True):
        if nan_mismatch:
            return f"output {i}: NaN where the reference has none (or the reverse)"
        if excess > 0:
            return (
                f"output {i} differs beyond rtol={rtol:g} atol={atol:g} "
                f"(max excess {excess:.3g}, max abs diff {worst:.3g})"
            )
    return None


def _discrepancy(got: torch.Tensor, want: torch.Tensor, rtol: float, atol: float) -> torch.Tensor:
    """[NaN where one has none (1.0 or 0.0), max(|got - want| - bound), max |got - want|]
    on their device, NaNs counted as equal in the differences (their mismatch is the
    first entry's). The bound is `atol + rtol * |want|`."""
    small_float = want.is_floating_point() and want.element_size() <= 4
    work = torch.float32 if small_float else torch.float64
    g, w = got.to(work), want.to(work)
    nan_mismatch = torch.isnan(g).ne(torch.isnan(w)).any().to(work)
    diff = (g - w).abs().nan_to_num(0.0)
    bound = w.abs().nan_to_num(0.0).mul_(rtol).add_(atol)
    return torch.stack([nan_mismatch, (diff - bound).max(), diff.max()]).double()


def _to_host(found: list[torch.Tensor]) -> list[tuple[bool, float, float]]:
    """Each [NaN mismatch, excess, difference] triple as Python values, one copy per
    device (a copy from a GPU waits for its stream)."""
    by_device: dict[torch.device, list[int]] = {}
    for index, triple in enumerate(found):
        by_device.setdefault(triple.device, []).append(index)
    values: list[tuple[bool, float, float]] = [(False, 0.0, 0.0)] * len(found)
    for indices in by_device.values():
        rows = torch.stack([found[i] for i in indices]).cpu().tolist()
        for index, (nan_mismatch, excess, worst) in zip(indices, rows, strict=True):
            values[index] = (nan_mismatch > 0, excess, worst)
    return values


def validate(
    candidate: Callable[..., Any],
    reference: Callable[..., Any],
    args: Sequence[Any],
    eager: Callable[..., Any] | None = None,
    written: Sequence[Any] = (),
) -> str | None:
    """Run both on copies of `args` (no grad) and compare; None means accept.

    A reference that raises is the runnable serving the size now failing on it (seen:
    a general compile's cuDNN attention on an H200 at one size): the candidate is then
    compared with `eager`, the piece's own graph, since replacing a runnable that
    raises is the swap most worth making.

    On a GPU all of it runs on the engine's stream (`gpu_stream`), after the `written`
    events of the samples `args` may come from."""
    with torch.no_grad(), engine_stream(args, written):
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
        return compare_outputs(got, want)  # its copy to the host waits for the stream


def tile_input(
    args: Sequence[Any],
    from_size: int,
    to_size: int,
    size_indices: Sequence[int],
    size_dims: Sequence[Sequence[int]],
    written: Sequence[Any] = (),
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
    wait_for_events(args, written)  # `written`: as `validate`'s
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
