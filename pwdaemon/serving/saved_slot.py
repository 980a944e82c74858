"""One tracer's saved traces: loaded before its first trace, saved as its pieces come.

A model can settle as one piece and still gain pieces later: under the backed strategy
(BERT, GPT-2 and Llama on a GPU, where the unbacked one fails) the first call's trace
holds a guard `size == 1` when that call was of size 1, and the first call of a larger
size is traced again into a second piece (misses.py). Saving only the first trace left
every warm restart to trace the second in the serving process, under traffic: 10.7 s
for BERT on an H200, with calls of up to 110 ms meanwhile.

So each piece that a whole call captured alone is saved under its index, 0 for the
first call's, 1, 2, ... for the inputs the earlier ones' guards refused, as long as the
ones before it are stored (a restart loads them in order and stops at the first one
missing). A restart loads them all and a settled call tries their guards in turn.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch

from pwdaemon.serving import strategy as strategies
from pwdaemon.serving.inputs import copy_call
from pwdaemon.serving.marks import SizeMarks
from pwdaemon.serving.piece import GraphPiece
from pwdaemon.serving.saved_trace import (
    LoadedTrace,
    SavedTraceError,
    SavedTraceOutcome,
    TraceShelf,
    load_trace,
    save_trace,
)
from pwdaemon.serving.strategy import ShapeStrategy

log = logging.getLogger(__name__)

# At most this many saved traces per model: a call that the loaded ones refuse runs
# every one's guard check first (microseconds each). Two are what the backed strategy
# makes (size 1, and sizes above it); the rest leave room for another dtype or rank.
MAX_SAVED_TRACES = 4


class SavedTraceSlot:
    """One tracer's saved traces: what became of them, and the loaded ones.

    Used on trace threads under TRACE_LOCK; `loaded` is set once, each bound to its
    piece's dispatcher before the tracer marks itself settled, and read without a lock
    by settled calls.
    """

    def __init__(self, shelf: TraceShelf | None, name: str) -> None:
        self._shelf = shelf
        self._name = name
        self.outcome = SavedTraceOutcome.NONE
        self.detail = ""
        self.loaded: tuple[LoadedTrace, ...] = ()
        self._tried = False
        self._stored = 0  # traces 0 .. _stored - 1 are on the shelf (loaded or saved)

    @property
    def active(self) -> bool:
        """There is a shelf: traces are loaded from it and saved to it."""
        return self._shelf is not None

    def note(self, outcome: SavedTraceOutcome, detail: str) -> None:
        self.outcome, self.detail = outcome, detail
        log.info("pwdaemon: %s: saved trace %s: %s", self._name, outcome.value, detail)

    def load(self, model: torch.nn.Module, strategy: ShapeStrategy) -> tuple[LoadedTrace, ...]:
        """The shelf's traces loaded for `model` (in index order), kept in `loaded` too;
        () when there is none or the first cannot serve (noted NOT_LOADED with the
        reason: the caller traces). A later one that cannot be loaded ends the list: the
        inputs it served are traced again when they come often, and saved in its place.

        Tried once, before the first tracing call: a trace another process saves while
        this one traces must not add a second piece of the same graph (each of its keys
        then loaded twice)."""
        if self._shelf is None or self._tried:
            return ()
        self._tried = True
        start = time.monotonic()
        loaded: list[LoadedTrace] = []
        first = strategy  # the strategy of the first trace loaded
        try:
            for index in range(MAX_SAVED_TRACES):
                record = self._shelf.load(index)
                if record is None:
                    break  # none stored (index 0: traced, then saved)
                # A trace saved with a later strategy than this run's first is what an
                # earlier run fell back to (a conv net's unbacked trace captures nothing,
                # which is not remembered: it can depend on the first call's inputs).
                # Loading it skips the failing trace and the fallback's (a CNN's warm
                # restart: 0.8 s of tracing under traffic); the tracer takes its
                # strategy on (`Tracer._load_saved`). All of a model's traces share one.
                order = strategies.ORDER
                allowed = order[order.index(strategy) :] if not loaded else (first,)
                if record.strategy not in allowed:
                    raise SavedTraceError(
                        f"saved with strategy {record.strategy.value}, this run traces "
                        f"with {first.value}"
                    )
                first = record.strategy
                loaded.append(load_trace(record, model))
        except Exception as exc:  # SavedTraceError, a shelf that cannot read
            if not loaded:
                self.note(SavedTraceOutcome.NOT_LOADED, f"traced instead: {exc}")
                return ()
            log.warning(
                "pwdaemon: %s: saved trace %d not loaded (%s); its inputs are traced again",
                self._name,
                len(loaded),
                exc,
            )
        if not loaded:
            return ()
        self.loaded, self._stored = tuple(loaded), len(loaded)
        count = f"{len(loaded)} traces " if len(loaded) > 1 else ""
        self.note(
            SavedTraceOutcome.LOADED,
            f"{count}loaded in {time.monotonic() - start:.3f} s, not traced",
        )
        return self.loaded

    def save(
        self,
        model: torch.nn.Module,
        piece: GraphPiece,
        call: tuple[tuple[Any, ...], dict[str, Any]],
        marks: SizeMarks,
    ) -> None:
        """Trace `model` again with torch's precompile on a copy of `call` (the inputs
        that made `piece`) and put the record on the shelf under the piece's index
        (`save_trace`); the outcome is noted either way. A piece whose predecessors are
        not all on the shelf is not saved: a restart could not reach it."""
        if self._shelf is None:
            return
        index = piece.index
        if index != self._stored or index >= MAX_SAVED_TRACES:
            log.info(
                "pwdaemon: %s: piece %d's trace not saved: %d trace(s) stored before it",
                self._name,
                index,
                self._stored,
            )
            return
        args, kwargs = copy_call(call[0], call[1], self._name)
        marks.mark(args, kwargs, piece.strategy)
        # A stored trace that did not load is replaced: say why it was not used.
        before = (
            f" (replacing one that was not loaded: {self.detail})"
            if self.outcome is SavedTraceOutcome.NOT_LOADED
            else ""
        )
        start = time.monotonic()
        try:
            record = save_trace(model, piece, (args, kwargs))
            self._shelf.save(index, record)
        except Exception as exc:  # SavedTraceError, a store that cannot be written
            if index == 0:
                self.note(SavedTraceOutcome.NOT_SAVED, f"{exc}{before}")
            else:
                log.info("pwdaemon: %s: piece %d's trace not saved: %s", self._name, index, exc)
            return
        self._stored += 1
        took = f"{time.monotonic() - start:.2f} s"
        if index == 0:
            self.note(SavedTraceOutcome.SAVED, f"traced again and saved in {took}{before}")
        else:
            self.detail += f"; piece {index}'s trace saved in {took}"
            log.info("pwdaemon: %s: piece %d's trace saved in %s", self._name, index, took)
