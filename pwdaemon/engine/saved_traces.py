"""The store's shelf of saved traces: one per model, for its next start.

`pwdaemon.serving.saved_trace` makes and loads a trace's dynamo part; this module puts a
`TraceRecord` into the artifact store and takes it out again, with its graph twice:
shipped as a worker's graph is (`dump_graph`: fake metadata and size guards kept, so the
engine can compile new sizes from a loaded piece as from a traced one), and without
metadata (`dump_plain_graph`), which is what a restart loads to serve eagerly. Loading
the fake metadata (fake tensors, symbolic shapes) took 0.06-0.2 s of a warm restart's
GIL beside Inductor's imports, for a graph that only a compile worker reads: the shipped
bytes now go to the workers as they were stored, never unpickled in the serving process.

The record is keyed by what the trace depends on and the module's weights do not touch:
`store_link.model_id` (class and package version, torch's version, size marks, training
flag, every parameter's and buffer's name, shape, dtype and device), Python's version
(the bytecode is Python's own), the process-wide settings its guards check on every
call (`saved_trace.process_state`: torch's thread count above all, which replicas on
other hosts, or a server following pwdaemon's own advice, set differently) and the
record's format. The settings are read as the record is loaded or saved, on the trace
thread, as dynamo reads them there.
"""

from __future__ import annotations

import hashlib
import pickle
import sys
from typing import Any

from pwdaemon.engine.store_link import StoreLink
from pwdaemon.serving.graph_facts import GraphFacts
from pwdaemon.serving.saved_trace import TraceRecord, process_state
from pwdaemon.serving.strategy import ShapeStrategy
from pwdaemon.workers.shipping import dump_graph, dump_plain_graph, load_plain_graph

__all__ = ("StoredTraces", "trace_key")

# Bumped when TraceRecord's stored form or meaning changes: an older record is then not
# found (3: the facts are the serving piece's; format 2 records of a model with a size
# symbol per input misread them, see `saved_trace.save_trace`. 4: the shipped graph
# names its size symbols, `graph_facts.SIZE_SYMBOLS_META`).
FORMAT = 4


def trace_key(model_key: str, index: int = 0) -> str:
    """The store id of a model's saved trace number `index` (`serving.saved_slot`) under
    this process's settings (`model_key`: `store_link.model_id`)."""
    python = ".".join(str(v) for v in sys.version_info[:3])
    settings = hashlib.sha256(process_state().encode()).hexdigest()[:12]
    piece = f"-r{index}" if index else ""
    return f"{model_key}-py{python}-s{settings}-f{FORMAT}{piece}"


class StoredTraces:
    """`TraceShelf` for one model in one artifact store (trace thread only)."""

    def __init__(self, link: StoreLink, model_key: str) -> None:
        self._link = link
        self._model_key = model_key

    def load(self, index: int) -> TraceRecord | None:
        """The stored record number `index`, or None when there is none (or the store is
        refused). Raises on a record that does not unpickle or whose graph does not load."""
        if not self._link.enabled:
            return None
        payload = self._link.store.load_trace(trace_key(self._model_key, index))
        if payload is None:
            return None
        # The store checked who could have written it: a trace is code we run anyway.
        fields: dict[str, Any] = pickle.loads(payload)
        gm = load_plain_graph(fields["eager"])
        facts = fields["facts"]
        if not isinstance(facts, GraphFacts):
            raise TypeError(f"saved facts are a {type(facts).__name__}")
        return TraceRecord(
            strategy=ShapeStrategy(fields["strategy"]),
            facts=facts,
            gm=gm,
            dynamo=bytes(fields["dynamo"]),
            module_refs=dict(fields["module_refs"]),
            builtin_refs=frozenset(fields["builtin_refs"]),
            training=bool(fields["training"]),
            shipped=bytes(fields["graph"]),
        )

    def save(self, index: int, record: TraceRecord) -> None:
        """Store `record` as number `index` (a store that cannot be written counts a
        write error)."""
        if not self._link.enabled:
            return
        fields = {
            "strategy": record.strategy.value,
            "facts": record.facts,
            "graph": dump_graph(
                record.gm,
                "the saved trace's graph",
                record.facts.size_guards,
                record.facts.size_symbols,
            ),
            "eager": dump_plain_graph(record.gm),
            "dynamo": record.dynamo,
            "module_refs": dict(record.module_refs),
            "builtin_refs": sorted(record.builtin_refs),
            "training": record.training,
        }
        self._link.store.save_trace(trace_key(self._model_key, index), pickle.dumps(fields))
