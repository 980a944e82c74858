"""Which call arguments belong to the caller, and private copies of them.

A graph piece's flat arguments mix the module's own state (parameters and buffers,
which dynamo lifts into graph inputs) with the caller's tensors. Module state is live
and shared: it is referenced, never copied. A caller's tensor may be reused or mutated
after the call returns, so anything kept past the call (a validation sample, a CUDA-graph
input slot, a background trace's inputs) is a copy.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator, Mapping, Sequence, Set
from typing import Any

import torch

log = logging.getLogger(__name__)

Call = tuple[tuple[Any, ...], dict[str, Any]]  # a call's positional and keyword arguments

# How deep a call argument is searched for tensors (a transformers cache's key and value
# tensors sit three levels down: cache, its list of layers, a layer); deeper ones are not
# size-marked, and `copy_call` leaves them to `copy.deepcopy`, which keeps neither
# inference mode nor requires_grad.
TENSOR_SEARCH_DEPTH = 6


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


def cuda_device(args: Sequence[Any]) -> torch.device | None:
    """The device of the first tensor in `args` that is on a GPU (None: none is)."""
    for a in args:
        if isinstance(a, torch.Tensor) and a.is_cuda:
            return a.device
    return None


def wait_for_events(args: Sequence[Any], written: Sequence[Any]) -> None:
    """Make the current stream of the GPU `args` are on wait for `written` (on the GPU,
    no thread blocks): `args` made from a sample are then made from it fully written."""
    device = cuda_device(args)
    if device is not None:
        stream = torch.cuda.current_stream(device)
        for event in written:
            stream.wait_event(event)


def copies_written_event(copies: Sequence[Any]) -> Any:
    """For copies made on a GPU: a CUDA event recorded on the current stream after them,
    which another stream waits for before it reads them (None when none is on a GPU).

    The copy kernels are queued on the calling thread's stream; the engine reads a
    sample on a stream of its own (`pwdaemon.engine.gpu_stream`), which the caller's
    queue does not order. One event per recorded size: about 5 us on the call that
    records it, nothing on the others."""
    device = cuda_device(copies)
    if device is None:
        return None
    event = torch.cuda.Event()
    event.record(torch.cuda.current_stream(device))
    return event


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


def copy_call(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    name: str = "",
    replace: Mapping[int, torch.Tensor] | None = None,
) -> Call:
    """Private copies of a whole call's inputs for a trace that runs after the call.

    Deep: the objects a call passes are copied with the tensors inside them. A
    transformers `generate()` passes its KV cache, which the model fills in place; with
    only the top-level tensors copied, a background trace of the prefill ran on the cache
    the caller had filled and went on using (its piece guarded on a full cache and never
    served a prefill again, and its own update wrote into the caller's cache). Tensors are
    cloned by `copy_for_trace` (inference mode and requires_grad kept, which dynamo
    guards on); everything else by `copy.deepcopy`. An input that cannot be deep-copied
    is shared as before (only its top-level tensors copied), with a warning.
    `replace` maps id(tensor) to what stands for it in the copy.
    """
    memo: dict[int, Any] = dict(replace or {})
    try:  # on a serving call's thread (the first call's trace, a hot input's): never raise
        _clone_tensors((args, kwargs), memo, TENSOR_SEARCH_DEPTH + 2)
        return copy.deepcopy((args, kwargs), memo)
    except Exception as exc:  # an object that refuses to be copied (a lock, a handle)
        log.warning(
            "pwdaemon: %s: a call's inputs could not be copied for tracing (%s: %s); "
            "the trace reads the caller's objects, only their top-level tensors copied",
            name or "model",
            type(exc).__name__,
            exc,
        )

        def shallow(a: Any) -> Any:
            if not isinstance(a, torch.Tensor):
                return a
            return memo[id(a)] if id(a) in memo else copy_for_trace(a)

        return tuple(shallow(a) for a in args), {k: shallow(v) for k, v in kwargs.items()}


def copy_small_call(
    args: tuple[Any, ...], kwargs: dict[str, Any], name: str, max_bytes: int
) -> Call | None:
    """`copy_call`, or None (nothing copied) where the caller's tensors in the call hold
    more than `max_bytes`."""
    held = sum(
        t.nbytes
        for t in nested_tensors((args, kwargs), TENSOR_SEARCH_DEPTH + 2)
        if is_caller_tensor(t)
    )
    return None if held > max_bytes else copy_call(args, kwargs, name)


def _clone_tensors(obj: Any, memo: dict[int, Any], depth: int) -> None:
    # Fills deepcopy's memo with each caller tensor's clone, so that deepcopy takes it
    # for every reference to that tensor (shared tensors stay shared in the copy).
    for o in _walk(obj, depth):
        if id(o) in memo:
            continue
        if isinstance(o, torch.nn.Module):
            memo[id(o)] = o  # module state is live and shared, never the caller's
        elif is_caller_tensor(o):
            memo[id(o)] = copy_for_trace(o)


def nested_tensors(obj: Any, depth: int = TENSOR_SEARCH_DEPTH) -> Iterator[torch.Tensor]:
    """The tensors `obj` holds, itself included: inside lists, tuples, sets, dicts and
    plain objects' attributes, at most `depth` levels down, each once; not inside
    modules."""
    return (o for o in _walk(obj, depth) if isinstance(o, torch.Tensor))


def _walk(obj: Any, depth: int) -> Iterator[Any]:
    # Each object reached once (a cycle or a shared object is not walked again), parents
    # before their children, children in order.
    seen: set[int] = set()
    stack: list[tuple[Any, int]] = [(obj, depth)]
    while stack:
        o, left = stack.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        yield o
        if left == 0 or isinstance(o, _LEAVES):
            continue
        children: Any
        if isinstance(o, dict):
            children = [*o.keys(), *o.values()]
        elif isinstance(o, (list, tuple, set, frozenset)):
            children = o
        else:
            children = getattr(o, "__dict__", {}).values()
        stack.extend((c, left - 1) for c in reversed(list(children)))


# Objects not looked inside: a tensor's or a module's attributes are not the caller's
# inputs, and a scalar has none.
_LEAVES = (torch.Tensor, torch.nn.Module, str, bytes, int, float, complex, type(None))
