"""A whole trace saved for the next start: a warm restart loads dynamo's work, not redoes it.

A warm restart used to run dynamo's trace of the model again before any stored artifact
could serve (the store key covers the traced graph): on this 2-core box the demo's trace
ended 1.8-2.4 s after attach (it shares the GIL with Inductor's imports), and a restart
missed its 2 s target. torch's precompile saves a traced frame with its guards
(`torch.compile(fn, fullgraph=True).aot_compile(...)`, experimental in torch): loading it
takes 10-100 ms here (`bench/trace_load.py`).

What is saved, once a background trace settles as one piece with no graph break (and
for each piece a later input's trace adds alone, `saved_slot`):

- dynamo's transformed bytecode of a fresh entry frame (`entry.make_entry`, traced again
  with the same marks and strategy, so the graph is the same; its fingerprint must be the
  serving piece's, or nothing is saved), and its guards, filtered to torch's portable ones
  (`keep_portable_guards_unsafe`: tensor metadata, shapes, global state such as grad
  mode). torch 2.13 cannot save the guards on object identity that BERT's and Llama's
  traces hold, and the guards on the module's Python state go with them: the loaded trace
  does not notice a change to the module's attributes (its config, a hook added) made
  after the save. vLLM serves its saved traces the same way (it drops every guard). The
  model's class, parameters and buffers (names, shapes, dtypes, devices), torch's and
  Python's versions and the training flag are checked instead, by the store key
  (`store_link.model_id`) and on every call (training);
- the graph the bytecode calls, as a `PieceCall` placeholder: the loading process puts
  the piece's dispatcher behind it, so serving goes through the range table as after a
  trace.

The graph module and the facts serving needs (`GraphFacts`) travel beside it in a
`TraceRecord`; the engine layer stores it (`pwdaemon.engine.saved_traces`).

A loaded trace is called with unmarked inputs: the saved guards reject a tensor carrying
dynamo's marks. Its guards run on every call; a call they reject (another dtype, rank or
grad mode) goes on to the ordinary path, where dynamo traces it if it comes often.
"""

from __future__ import annotations

import builtins
import contextlib
import enum
import importlib
import io
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.fx

from pwdaemon.serving.entry import make_entry
from pwdaemon.serving.graph_facts import GraphFacts, analyse_graph
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.strategy import ShapeStrategy, tracing

try:  # torch's precompile (torch >= 2.9); without it nothing is saved or loaded
    from torch._dynamo.aot_compile_types import SerializableCallable

    PRECOMPILE = True
except ImportError:  # pragma: no cover - older torch
    SerializableCallable = object  # type: ignore[assignment,misc]
    PRECOMPILE = False

__all__ = (
    "LoadedTrace",
    "PieceCall",
    "SavedTraceError",
    "SavedTraceOutcome",
    "TraceRecord",
    "TraceShelf",
    "load_trace",
    "process_state",
    "save_trace",
)


# The name the entry frame's global `model` is saved under: the module is not pickled
# (its weights change between runs), the loading process hands its own.
_MODEL_REF = "model"
# Modules the saved bytecode names by their id in the saving process
# ("___module_collections_140592021082880_c1"); imported again when loading.
_MODULE_REF = re.compile(r"^___module_(?P<module>[\w.]+?)_\d+_c\d+$")


# Fields of dynamo's global-state guard that a call sets for itself (`no_grad`,
# `autocast`, a torch-function mode): a call under another of them is the ordinary miss
# path's to trace. The guard's other fields are the process's settings.
_PER_CALL_STATE = frozenset(
    {"grad_mode", "autocast_state", "torch_function", "torch_function_all_disabled"}
)


def process_state() -> str:
    """The process-wide settings a saved trace's guards check on every call, as text:
    torch's thread count, default dtype, deterministic algorithms, TF32 and reduced-
    precision reductions (the fields of dynamo's `GlobalStateGuard`, read from torch so
    that a field a later torch adds counts too).

    A trace saved under other settings is rejected by its guards on every call: a
    restart with `torch.set_num_threads(1)` after a run with 2 threads loaded the saved
    trace, loaded every stored size into its piece and reported them live, while every
    call missed it and ran eager until a hot input was traced again (4.5 s for tiny
    Llama). Part of the saved trace's store key, so each setting keeps its own."""
    guard_type = getattr(getattr(torch._C, "_dynamo", None), "guards", None)
    guard_type = getattr(guard_type, "GlobalStateGuard", None)
    try:
        fields = json.loads(guard_type().__getstate__())  # type: ignore[misc]
    except Exception:  # a torch without it: the two settings servers change most
        fields = {
            "num_threads": torch.get_num_threads(),
            "default_dtype": str(torch.get_default_dtype()),
        }
    state = {k: v for k, v in fields.items() if k not in _PER_CALL_STATE}
    return json.dumps(state, sort_keys=True, separators=(",", ":"))


class SavedTraceError(Exception):
    """A trace that could not be saved or loaded, with the reason a person can read."""


class SavedTraceOutcome(enum.StrEnum):
    """What happened to this run's saved trace (`Tracer.saved_trace`)."""

    NONE = "none"  # no store, saving turned off, or not traced in the background
    LOADED = "loaded"  # this run serves a trace saved by an earlier one
    NOT_LOADED = "not_loaded"  # one was stored but could not be loaded: traced instead
    SAVED = "saved"  # this run's trace is stored for the next start
    NOT_SAVED = "not_saved"  # the trace could not be saved (reason in the detail)


@dataclass(frozen=True)
class TraceRecord:
    """What a warm restart needs instead of a trace."""

    strategy: ShapeStrategy
    facts: GraphFacts
    gm: torch.fx.GraphModule
    dynamo: bytes  # torch's saved function (bytecode, guards, PieceCall)
    module_refs: Mapping[str, str] = field(default_factory=dict)  # ref -> module name
    builtin_refs: frozenset[str] = frozenset()  # builtins the bytecode names
    training: bool = False
    # A loaded record's graph as a compile worker gets it (`GraphPiece.shipped`); its
    # `gm` is then the graph without metadata, enough to serve eagerly.
    shipped: bytes | None = None


class TraceShelf(Protocol):
    """Where one model's saved traces are kept, by index: 0 the first call's, then the
    traces of inputs the earlier ones refused (`saved_slot`; the engine layer implements
    it)."""

    def load(self, index: int) -> TraceRecord | None: ...

    def save(self, index: int, record: TraceRecord) -> None: ...


class PieceCall(SerializableCallable):
    """The graph's place in a saved trace: the loading process binds a dispatcher to it."""

    def __init__(self) -> None:
        self.target: Callable[..., Any] | None = None

    @classmethod
    def serialize_compile_artifacts(cls, fn: Any) -> bytes:
        return b""  # nothing: the graph travels in the TraceRecord

    @classmethod
    def deserialize_compile_artifacts(cls, data: bytes) -> Any:
        return cls()

    def __call__(self, *args: Any) -> Any:
        target = self.target
        if target is None:
            raise SavedTraceError("a loaded trace was called before its graph was bound")
        return target(*args)


@contextlib.contextmanager
def _precompile_enabled() -> Iterator[None]:
    # torch 2.11 keeps aot_compile behind a flag (on by default from 2.13).
    config = torch._dynamo.config
    if hasattr(config, "enable_aot_compile"):
        with config.patch(enable_aot_compile=True):
            yield
    else:
        yield


def save_trace(
    model: torch.nn.Module, piece: GraphPiece, call: tuple[tuple[Any, ...], dict[str, Any]]
) -> TraceRecord:
    """Trace `model` again with torch's precompile on `call` (inputs marked as the
    serving trace marked its own: fresh copies, the caller's are not touched) and return
    what a restart needs: the record holds the serving `piece`'s strategy, graph and
    facts. Raises SavedTraceError when torch cannot save it or the graph differs from
    the piece's (its fingerprint)."""
    strategy, facts = piece.strategy, piece.facts
    portable = getattr(torch.compiler, "keep_portable_guards_unsafe", None)
    if not PRECOMPILE or portable is None:
        raise SavedTraceError(f"torch {torch.__version__} cannot save a trace")
    traced: list[GraphFacts] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> PieceCall:
        traced.append(analyse_graph(gm))
        return PieceCall()

    entry = make_entry(model, strategy.value)
    # Before the trace: dynamo installs the modules its bytecode loads into these globals.
    own = frozenset(entry.__globals__)
    # torch 2.11 checks, as it saves, that the frame's globals hold every name the
    # bytecode loads, builtins (`type`) included ("Missing required external
    # references"); this entry is the save's own, so they go into its globals.
    entry.__globals__.update(
        {name: getattr(builtins, name) for name in dir(builtins) if not name.startswith("_")}
    )
    args, kwargs = call
    try:
        # torch 2.11 gives the wrapper its `aot_compile` only when the flag is on as
        # torch.compile() builds it.
        with _precompile_enabled():
            compiled = torch.compile(
                entry, fullgraph=True, backend=backend, options={"guard_filter_fn": portable}
            )
            with tracing(strategy):
                result = compiled.aot_compile((args, kwargs))  # type: ignore[attr-defined]
        data = result.serialize(result, external_data={_MODEL_REF: model}).serialized_data
    except Exception as exc:  # dynamo's own errors, unpicklable state: not saved
        raise SavedTraceError(f"{type(exc).__name__}: {_first_line(exc)}") from exc
    if len(traced) != 1 or traced[0].fingerprint != facts.fingerprint:
        raise SavedTraceError("traced again, the graph differs from the one serving")
    artifacts = result._artifacts
    env = artifacts.runtime_env
    refs = getattr(env, "external_refs", ()) or ()
    # What torch supplies itself when loading: imports, the globals it saved, the graph.
    supplied = {*env.import_sources, *env.used_globals, artifacts.backend_id}
    modules = {}
    for ref in refs:
        if ref in own or ref in supplied or hasattr(builtins, ref):
            continue  # the loading entry frame has it (`model`), or a builtin (`type`)
        match = _MODULE_REF.match(ref)
        if match is None:
            raise SavedTraceError(f"the saved trace needs {ref!r}, which a restart cannot supply")
        modules[ref] = match["module"]
    used = frozenset(ref for ref in refs if hasattr(builtins, ref))
    # The serving piece's facts, not the ones read from this trace's graph: the same code,
    # but the graph precompile hands the backend keeps no example inputs on its
    # placeholders (`grapharg.example`), where `analyse_graph` finds the marks. A graph
    # with a size symbol per input (the backed strategy: BERT's input_ids and
    # attention_mask) then read as one size and "other symbols", and a restart served it
    # on the general tier alone: no size compiles, no CUDA graphs (BERT on an H200).
    return TraceRecord(strategy, facts, piece.gm, data, modules, used, model.training)


class LoadedTrace:
    """A saved trace loaded for `model`: call `serve` once a dispatcher is bound."""

    def __init__(self, fn: Any, call: PieceCall, record: TraceRecord, model: torch.nn.Module):
        self._fn = fn
        self._run: Callable[..., Any] = fn.fn  # dynamo's bytecode, behind the guard check
        self.guard_check: Callable[..., bool] = fn.guard_check  # torch's, as the call runs it
        self.call = call
        self.record = record
        self._model = model

    def bind(self, target: Callable[..., Any]) -> None:
        self.call.target = target

    def serve(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[bool, Any]:
        """(True, output) for a call the saved guards accept; (False, None) otherwise,
        without running anything. Exceptions of the graph's code propagate."""
        if self._model.training != self.record.training:
            return False, None
        try:
            accepted = self.guard_check(*args, **kwargs)
        except TypeError:  # arguments the entry's signature does not bind
            return False, None
        if not accepted:
            return False, None
        return True, self._run(*args, **kwargs)


def load_trace(record: TraceRecord, model: torch.nn.Module) -> LoadedTrace:
    """Load `record`'s saved function for `model`. Raises SavedTraceError on any failure
    (another torch or Python, a module that no longer imports, bad bytes)."""
    if not PRECOMPILE:
        raise SavedTraceError(f"torch {torch.__version__} cannot load a saved trace")
    if record.training != model.training:
        raise SavedTraceError("saved in another training mode")
    entry = make_entry(model, record.strategy.value)
    scope: dict[str, Any] = dict(entry.__globals__)
    # Builtins the bytecode names (`type`): torch checks that its globals hold them.
    scope.update({name: getattr(builtins, name) for name in record.builtin_refs})
    try:
        for ref, module in record.module_refs.items():
            scope[ref] = importlib.import_module(module)
        fn = torch.compiler.load_compiled_function(
            io.BytesIO(record.dynamo), f_globals=scope, external_data={_MODEL_REF: model}
        )
    except Exception as exc:
        raise SavedTraceError(f"{type(exc).__name__}: {_first_line(exc)}") from exc
    _check_sources(fn)
    call = getattr(getattr(fn, "_artifacts", None), "compiled_fn", None)
    if not isinstance(call, PieceCall):
        raise SavedTraceError(f"the saved function calls a {type(call).__name__}, not a graph")
    return LoadedTrace(fn, call, record, model)


def _check_sources(fn: Any) -> None:
    # The store key names the model's class and weights, not its code: a deployment that
    # changed `forward` (or any function dynamo inlined) must not serve the old graph.
    # torch records each inlined function's module, lines and a hash of their source;
    # each must hash the same today (torch's own check for its compile packages).
    try:
        from torch._dynamo.package import _hash_sourcelines

        sources = fn.source_info().inlined_sources
    except (ImportError, AttributeError) as exc:
        raise SavedTraceError(f"this torch cannot check a saved trace's sources: {exc}") from exc
    for source in sources:
        try:
            module = importlib.import_module(source.module)
            checksum = _hash_sourcelines(module, source.firstlineno, source.lastlineno)
        except Exception as exc:  # gone, or no source file to read
            raise SavedTraceError(f"cannot read {source.module}'s source: {exc}") from exc
        if checksum != source.checksum:
            raise SavedTraceError(
                f"{source.module} (lines {source.firstlineno}-{source.lastlineno}) changed "
                "since the trace was saved"
            )


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]
