"""Direct calls: a call of a signature served before skips dynamo's guard check.

A call through dynamo first evaluates the guards of the entry frame's cache entries, then
runs the entry's compiled code. On a transformers model the guards number over a
thousand (each parameter's metadata and size marks, every module's hooks dicts, the
globals the forward reads): on the tiny BERT of the tests, torch 2.13, this 2-core CPU,
the guard check took 125-170 µs, and a call through dynamo cost 961 µs against 594 µs
for the same cache entry's compiled code called as a plain function
(`bench/call_overhead.py`). On a GPU, where a CUDA-graph replay is a fraction of a
millisecond, that Python is most of the call (vLLM skips dynamo's guards for the same
reason: its `TorchCompileWrapperWithCustomDispatcher` calls the compiled code itself).

So once a call has gone through dynamo and one cache entry whose code runs one graph
piece and no resume function (no graph break) served it, later calls of the same
*signature* run that entry's compiled code directly. The code is dynamo's own: it fetches
the module's parameters, calls the piece's dispatcher (which picks the size's best tier
as for any call) and builds the output object as dynamo would. What stands in for the
guard check on every direct call:

- the signature (`call_key`): each positional and keyword argument in order: a tensor's
  shape, strides, dtype, device, `requires_grad` and whether it is an inference tensor;
  any other argument's value (None, bool, int, float, str; any other type keeps the call
  on dynamo's path); whether inference mode is on. The shapes are exact, so the size
  guards that tell a batch-1 piece from the others are decided by the key.
- grad mode off (serving calls; a call with grad on goes through dynamo) and no torch
  function mode active (`torch.set_default_device` pushes one).
- the global state dynamo guards (autocast, deterministic algorithms, TF32 flags, thread
  count, default dtype): torch's own `GlobalStateGuard`, taken when the signature was
  registered, checked per call (0.4 µs).

Not checked per call: the Python state of the module and of the globals its code reads
(an attribute, the config, a hook added, a submodule's `training` flag), which dynamo
guards. A direct entry runs its cache entry's whole guard check again on its first call
after `GUARD_RECHECK_S`, on the calling thread with that call's inputs, and drops itself
when the guards no longer hold or dynamo no longer has the entry (calls of the signature
then go through dynamo, which recompiles as it would have). So a change to such state
reaches calls within `GUARD_RECHECK_S`. Opt-in (`attach(guards="rechecked")`); the
default, "every_call", keeps dynamo's check on every call. A direct call that raises drops
its entry and the call is made again through dynamo.
"""

from __future__ import annotations

import enum
import logging
import threading
import time
import types
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import torch

log = logging.getLogger(__name__)

# How often a direct entry re-runs dynamo's guard check (on one call, ~150 µs): a change
# to the module's Python state reaches direct calls within this time, at a cost of one
# check per signature per period (0.03 % of a core at 0.5 s).
GUARD_RECHECK_S = 0.5
# Signatures kept on the direct path; further ones go through dynamo. Each holds a code
# object and a small key; the cap bounds a process that sees unbounded signatures.
MAX_DIRECT_SIGNATURES = 1024

# Argument types a signature compares by value (immutable, cheap to compare).
_VALUE_TYPES = (type(None), bool, int, float, str)

Key = tuple[Hashable, ...]


class GuardMode(enum.StrEnum):
    """Who checks dynamo's guards on a call (`attach(guards=...)`)."""

    RECHECKED = "rechecked"  # direct calls; the guards re-run every GUARD_RECHECK_S
    EVERY_CALL = "every_call"  # dynamo checks every call

    @classmethod
    def parse(cls, value: str) -> GuardMode:
        """The mode named `value`; ValueError otherwise."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(repr(m.value) for m in cls)
            raise ValueError(f"guards must be one of {names}, got {value!r}") from None


class DropReason(enum.StrEnum):
    """Why a signature left the direct path."""

    GUARDS_FAILED = "dynamo's guards no longer hold"
    ENTRY_GONE = "dynamo no longer has the cache entry"
    RAISED = "the direct call raised"


def _tensor_key(t: torch.Tensor) -> Hashable:
    return (t.shape, t.stride(), t.dtype, t.device, t.requires_grad, t.is_inference())


def call_key(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Key | None:
    """The signature of a call, or None when it cannot take the direct path."""
    if torch.is_grad_enabled() or torch._C._len_torch_function_stack():
        return None
    parts: list[Hashable] = [torch.is_inference_mode_enabled(), len(args)]
    seen: set[int] = set()
    for value in (*args, *kwargs.values()):
        if type(value) is torch.Tensor:
            if id(value) in seen:
                return None  # one tensor passed twice: dynamo dedups it in the graph
            seen.add(id(value))
            parts.append(_tensor_key(value))
        elif type(value) in _VALUE_TYPES:
            parts.append((type(value), value))
        else:
            return None
    parts.extend(kwargs)  # keyword names, in order (values are above)
    return tuple(parts)


def piece_entry(entry_fn: types.FunctionType, piece: object, f_locals: dict[str, Any]) -> Any:
    """The cache entry of `entry_fn`'s code that runs `piece` (a dispatcher) and nothing
    else, and whose guards accept `f_locals`; None when there is none.

    Not simply the first entry whose guards pass: dynamo keeps its cache entries most
    recently used first, and an entry it cached for other inputs (one that runs no graph,
    seen on an H200 for BERT under the backed strategy) can accept this call too. The
    entry must call the very dispatcher that served the call.
    """
    from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

    for entry in _debug_get_cache_entry_list(entry_fn.__code__):
        names = entry.code.co_names
        if any(n.startswith("__resume_at") for n in names):
            continue  # a resume function called directly would run eager
        graphs = [n for n in names if n.startswith("__compiled_fn")]
        if len(graphs) != 1:
            continue
        # dynamo wraps the backend's callable in `disable`, which keeps it as __wrapped__
        compiled = entry_fn.__globals__.get(graphs[0])
        if getattr(compiled, "__wrapped__", None) is not piece:
            continue
        if entry.guard_manager.check(f_locals):
            return entry
    return None


@dataclass(eq=False)
class DirectEntry:
    """One signature's compiled code, called without dynamo in front."""

    fn: Callable[..., Any]
    code: types.CodeType  # dynamo's compiled code (identifies its cache entry)
    entry_code: types.CodeType  # the entry frame's code, whose cache holds it
    check: Callable[[dict[str, Any]], bool]  # the cache entry's guard check
    state: Any  # torch's GlobalStateGuard, taken at registration
    recheck_at: float = 0.0
    calls: int = 0  # lost updates under races cost a count, never a wrong answer


@dataclass
class DirectCalls:
    """The direct path of one traced module: signatures, their entries, what was dropped.

    Readers (serving threads) read `entries` without a lock: writers replace the dict
    whole under `_lock`, one reference assignment.
    """

    entries: dict[Key, DirectEntry] = field(default_factory=dict)
    # Signatures refused for good (their code runs more than one piece), with why.
    refused: dict[Key, str] = field(default_factory=dict)
    dropped: dict[DropReason, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def run(self, entry: DirectEntry, key: Key, args: tuple[Any, ...],
            kwargs: dict[str, Any]) -> tuple[bool, Any]:  # fmt: skip
        """(True, output) of a direct call; (False, None) when the call must go through
        dynamo (global state differs, or the entry was dropped just now)."""
        if not entry.state.check():
            return False, None  # autocast or a global flag differs: dynamo decides
        if time.monotonic() >= entry.recheck_at:
            reason = self._recheck(entry, args, kwargs)
            if reason is not None:
                self.drop(key, entry, reason)
                return False, None
        try:
            out = entry.fn(*args, **kwargs)
        except Exception as exc:
            self.drop(key, entry, DropReason.RAISED, exc)
            return False, None
        entry.calls += 1
        return True, out

    def _recheck(self, entry: DirectEntry, args: tuple[Any, ...],
                 kwargs: dict[str, Any]) -> DropReason | None:  # fmt: skip
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

        if not any(e.code is entry.code for e in _debug_get_cache_entry_list(entry.entry_code)):
            return DropReason.ENTRY_GONE
        if not entry.check({"args": args, "kwargs": kwargs}):
            return DropReason.GUARDS_FAILED
        entry.recheck_at = time.monotonic() + GUARD_RECHECK_S
        return None

    def register(self, key: Key, entry_fn: types.FunctionType, piece: object,
                 args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:  # fmt: skip
        """After a call of `key` that `piece` (its dispatcher) served through dynamo: put
        the signature on the direct path (on the calling thread, once per signature)."""
        if key in self.entries or key in self.refused:
            return
        if len(self.entries) >= MAX_DIRECT_SIGNATURES or len(self.refused) >= MAX_DIRECT_SIGNATURES:
            return  # bounded: further signatures go through dynamo
        from torch._C._dynamo.guards import GlobalStateGuard

        cache_entry = piece_entry(entry_fn, piece, {"args": args, "kwargs": kwargs})
        if cache_entry is None:
            with self._lock:
                self.refused[key] = "no cache entry runs the serving piece alone (a graph break)"
            return
        code = cache_entry.code
        fn = types.FunctionType(code, entry_fn.__globals__, entry_fn.__name__)
        entry = DirectEntry(
            fn=fn,
            code=code,
            entry_code=entry_fn.__code__,
            check=cache_entry.guard_manager.check,
            state=GlobalStateGuard(),
            recheck_at=time.monotonic() + GUARD_RECHECK_S,
        )
        with self._lock:
            if key not in self.entries:
                self.entries = {**self.entries, key: entry}

    def drop(self, key: Key, entry: DirectEntry, reason: DropReason,
             exc: BaseException | None = None) -> None:  # fmt: skip
        with self._lock:
            if self.entries.get(key) is not entry:
                return  # dropped by another thread already
            entries = dict(self.entries)
            del entries[key]
            self.entries = entries
            self.dropped[reason] = self.dropped.get(reason, 0) + 1
        detail = f": {type(exc).__name__}: {exc}" if exc is not None else ""
        log.info("pwdaemon: a signature left the direct path: %s%s", reason.value, detail)

    def clear(self) -> None:
        with self._lock:
            self.entries = {}
