"""Which dimension of which argument carries a call's size, and marking it for dynamo.

Default: dim 0 of every tensor argument whose dim 0 equals the first tensor argument's
(else the first tensor inside an argument's), and of every such tensor inside the other
arguments (lists, dicts, objects such as a KV cache).
`attach(dynamic={"name": dim})` names the argument and dim instead. The same answer
serves three places: marking inputs before a tracing call, the miss signature of a call
no piece served, and the size a call brings while the model is still being traced.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch

from pwdaemon.serving.inputs import copy_call, is_caller_tensor, nested_tensors
from pwdaemon.serving.strategy import ShapeStrategy, mark_size, torch_release
from pwdaemon.serving.trace_record import input_signature

# torch < 2.12 refuses a SymBool where an op takes a bool: transformers' attention passes
# `is_causal = q_length > 1 and ...`, and where dynamo's automatic dynamic made the query
# length a symbol (generate()'s decode step, length 1, traced after the prompt's, length
# 6), the falsy SymBool itself reached `scaled_dot_product_attention` (pytorch/pytorch
# #124707, #154038): a graph break at every attention, pieces with no size, each decode
# step on eager. So there a call's tensor arguments keep each other dimension of size 1
# static (`mark_static`): a decode step's length, a single channel; a call whose length
# is above 1 is traced as its own piece when it comes often, as any other miss.
_ONES_STATIC = torch_release() < (2, 12)


def forward_params(model: torch.nn.Module) -> tuple[str, ...]:
    """The names of `model.forward`'s arguments (what `attach(dynamic=...)` may name);
    empty where Python cannot tell (a builtin or C-implemented forward)."""
    try:
        return tuple(inspect.signature(model.forward).parameters)
    except (TypeError, ValueError):
        return ()


class SizeMarks:
    """The size dimensions of one model's calls (`dynamic` as given to attach)."""

    def __init__(
        self, model: torch.nn.Module, dynamic: Mapping[str, int] | None, shape_id: str
    ) -> None:
        self.shape_id = shape_id  # one shared id: every marked dim is the same size
        self._dynamic = dict(dynamic) if dynamic else None
        self._positions: dict[str, int] = {}
        if self._dynamic:
            params = list(forward_params(model))
            unknown = [name for name in self._dynamic if name not in params]
            if unknown:
                raise ValueError(
                    f"dynamic names {unknown} are not arguments of "
                    f"{type(model).__name__}.forward{tuple(params)}"
                )
            self._positions = {name: params.index(name) for name in self._dynamic}

    def mark(
        self,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        strategy: ShapeStrategy,
        *,
        inside: bool = True,
    ) -> None:
        """Mark each size dimension of this call's tensors for dynamo, per `strategy`;
        with `inside` False, of its tensor arguments only. A call dynamo only runs (a
        settled call, run-only) is marked so: its marks shape no trace, and walking a
        32-layer KV cache to mark its 64 tensors took 190 us of every decode step."""
        dims = self._size_dims(args, kwargs, inside)
        # Tensors inside the call's objects are marked weak beside a tensor argument that
        # carries the size (`mark_size`); with none (a dict of tensors), they carry it.
        # A settled call (`inside` False) has none inside: no set built on its path.
        top: set[int] = set()
        if inside and self._dynamic is None:
            top = {id(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)}
        weak_inside = any(id(t) in top for t, _ in dims)
        for t, d in dims:
            mark_size(t, d, strategy, self.shape_id, weak=weak_inside and id(t) not in top)
        if _ONES_STATIC:
            sized = {(id(t), d) for t, d in dims}
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor):
                    for d, n in enumerate(a.shape):
                        if n == 1 and (id(a), d) not in sized:
                            torch._dynamo.mark_static(a, d)

    def widened(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], size: int
    ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """A copy of a size-1 call brought to `size`: each size dimension repeated, the
        tensors inside the call's objects too (`copy_call`). For tracing only: its
        outputs are not served."""
        wide = {
            id(t): torch.cat([t] * size, dim=d)
            for t, d in self._size_dims(args, kwargs)
            if t.shape[d] == 1
        }
        return copy_call(args, kwargs, replace=wide)

    def signature(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
        """The call's input signature (`trace_record.input_signature`; slow paths)."""
        dims = self._size_dims(args, kwargs)
        size = int(dims[0][0].shape[dims[0][1]]) if dims else None
        return input_signature(args, kwargs, {id(t): d for t, d in dims}, size)

    def size(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> int | None:
        """The size this call brings; None when no argument carries one."""
        for t, d in self._size_dims(args, kwargs):
            return int(t.shape[d])
        return None

    def _size_dims(
        self, args: tuple[Any, ...], kwargs: dict[str, Any], inside: bool = True
    ) -> list[tuple[torch.Tensor, int]]:
        if self._dynamic is not None:
            return self._named_dims(args, kwargs)
        # Default: dim 0 of every tensor argument whose dim 0 equals the first one's, and
        # of each such tensor inside the other arguments (a KV cache's keys and values:
        # unmarked, the decode step's piece took the cache's batch for a constant, pinned
        # to one batch with no size symbol). With no tensor argument (a model called with
        # a dict of tensors), the first tensor inside one sets the size: unmarked, such a
        # model was pinned to its first call's batch and every other batch missed.
        out: list[tuple[torch.Tensor, int]] = []
        size = -1
        holders = []
        for a in (*args, *kwargs.values()):
            if isinstance(a, torch.Tensor):
                if a.dim() > 0:
                    if size < 0:
                        size = a.shape[0]
                    if a.shape[0] == size:
                        out.append((a, 0))
            elif inside:
                holders.append(a)  # scalars and modules: `nested_tensors` finds none
        for holder in holders:
            for t in nested_tensors(holder):
                if t.dim() > 0 and is_caller_tensor(t):
                    if size < 0:  # no tensor argument: a dict of them, say
                        size = t.shape[0]
                    if t.shape[0] == size:
                        out.append((t, 0))
        return out

    def _named_dims(
        self, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> list[tuple[torch.Tensor, int]]:
        assert self._dynamic is not None
        out: list[tuple[torch.Tensor, int]] = []
        for name, dim in self._dynamic.items():
            t = kwargs.get(name)
            if t is None:
                pos = self._positions[name]
                t = args[pos] if pos < len(args) else None
            if isinstance(t, torch.Tensor):
                # A negative dim counts from the end, as everywhere in torch; dynamo's
                # mark ignores one, which would trace static and retrace every size.
                ndim = t.dim()
                d = dim + ndim if dim < 0 else dim
                if 0 <= d < ndim:
                    out.append((t, d))
        return out
