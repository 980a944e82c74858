"""The per-graph-piece dispatcher: the only pwdaemon code on the serving path.

A call does one read of the published table, one lookup, one integer bump in the size
histogram, then runs the runnable. No lock, no logging, no labelled metric. Writers
(the engine, tests) publish a new table with one reference assignment; they serialise
among themselves with a lock that readers never touch.
"""

from __future__ import annotations

import threading
from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pwdaemon.serving.inputs import copies_written_event, copy_input, is_caller_tensor
from pwdaemon.serving.range_table import Entry, Range, RangeTable, Runnable, Tier

# Past this many distinct sizes a piece counts further sizes as "other": the histogram
# stays bounded however wild the traffic.
DEFAULT_SIZE_CAP = 1024
# Validation replays a real input of each size; keep at most this many bytes of them.
DEFAULT_SAMPLE_BYTES = 64 * 1024 * 1024

OutputMarker = Callable[[Any], None]


class Dispatcher:
    """Serves one graph piece: picks the best ready runnable for the call's size."""

    def __init__(
        self,
        graph_index: int,
        eager: Runnable,
        size_index: int | None,
        *,
        size_cap: int = DEFAULT_SIZE_CAP,
        sample_bytes: int = DEFAULT_SAMPLE_BYTES,
        served: threading.local | None = None,
    ) -> None:
        self.graph_index = graph_index
        # Thread-local shared by a tracer's pieces: each call writes this dispatcher
        # into it, so the calling thread can tell afterwards whether any piece served
        # its call (no: dynamo ran it eager, a miss) and which piece ran last. Per
        # thread, so concurrent calls never see each other's writes.
        self.served = served if served is not None else threading.local()
        self.size_index = size_index
        # The published table; replaced whole, never mutated.
        self.table: RangeTable = RangeTable.initial(eager)
        # size -> calls. Written by serving threads without a lock: a lost update
        # under a race costs one count in a histogram, never a wrong answer.
        self.counts: dict[int, int] = {}
        self.overflow_calls = 0
        self.size_cap = size_cap
        # One recorded real input per size, for validating a candidate before a swap.
        self.samples: dict[int, tuple[Any, ...]] = {}
        # size -> the CUDA event after its sample's copies (GPU samples only): what the
        # engine's stream waits for before it reads the sample (`sample_events`).
        self.sample_written: dict[int, Any] = {}
        self.sample_bytes_left = sample_bytes
        self.record_samples = True
        # ids of the module's parameters and buffers (set by the handle): live state a
        # sample references instead of copying, and a CUDA graph reads in place.
        self.state_ids: frozenset[int] = frozenset()
        # Set while outputs must carry dynamo's size mark into a resumed frame
        # (a graph break after this piece); None on the plain path.
        self.mark_outputs: OutputMarker | None = None
        # Work the engine hands to a serving thread (a CUDA-graph capture): run at the
        # start of the next call, by whichever thread makes it. None on the plain path.
        self.pending: Callable[[], None] | None = None
        self._pending_lock = threading.Lock()
        self._publish_lock = threading.Lock()

    # ---- serving path -------------------------------------------------------------

    def __call__(self, *args: Any) -> Any:
        # Locals, not repeated attribute reads: each read is also a chance to see a
        # different value under a concurrent writer. `table` is read exactly once.
        if self.pending is not None:
            self._run_pending()
        self.served.last = self
        table = self.table
        index = self.size_index
        size = args[index] if index is not None else 0
        counts = self.counts
        count = counts.get(size)
        if count is None:
            self._first_seen(size, args)
        else:
            counts[size] = count + 1
        # RangeTable.lookup, inlined (a Python call costs as much as the lookup itself).
        entry = table._exact_get(size)
        if entry is None:
            entry = table._segments[bisect_right(table._bounds, size) - 1]
        out = entry.runnable(*args)
        mark = self.mark_outputs
        if mark is not None:
            mark(out)
        return out

    def _run_pending(self) -> None:
        # One thread takes the task; the others go straight on serving.
        if not self._pending_lock.acquire(blocking=False):
            return
        try:
            task, self.pending = self.pending, None
        finally:
            self._pending_lock.release()
        if task is not None:
            task()  # records its own outcome; never raises into the caller

    def _first_seen(self, size: int, args: Sequence[Any]) -> None:
        # Slow path, once per distinct size (or every call of a size past the cap).
        if len(self.counts) >= self.size_cap:
            self.overflow_calls += 1
            return
        self.counts[size] = 1
        if self.record_samples:
            self._record_sample(size, args)

    def _record_sample(self, size: int, args: Sequence[Any]) -> None:
        # Parameters and buffers are live module state: keep a reference. Everything
        # else may be reused or mutated by the caller after the call, so it is copied,
        # within a budget.
        if size in self.samples:
            return  # two threads brought a new size at once: keep one, charge it once
        state = self.state_ids
        nbytes = sum(a.numel() * a.element_size() for a in args if is_caller_tensor(a, state))
        if nbytes > self.sample_bytes_left:
            return
        self.sample_bytes_left -= nbytes
        copies = tuple(copy_input(a, state) for a in args)
        event = copies_written_event(copies)
        if event is not None:  # before the sample: whoever finds the sample finds it
            self.sample_written[size] = event
        self.samples[size] = copies

    # ---- writer side --------------------------------------------------------------

    def install(
        self,
        range_: Range | None,
        tier: Tier,
        runnable: Runnable,
        info: Mapping[str, Any] | None = None,
    ) -> RangeTable:
        """Publish `runnable` for `range_` (None: the general entry); returns the new table.

        Thread-safe for writers; readers see the old or the new table, never a mix.
        """
        with self._publish_lock:
            table = self.table.with_entry(range_, tier, runnable, info)
            self.table = table  # the one assignment that publishes
            return table

    def sample_for(self, range_: Range | None) -> tuple[int, tuple[Any, ...]] | None:
        """A recorded real input whose size falls in `range_` (any size for None)."""
        for size, args in list(self.samples.items()):
            if range_ is None or size in range_:
                return size, args
        return None

    def samples_for(self, range_: Range | None) -> list[tuple[int, tuple[Any, ...]]]:
        """Recorded real inputs in `range_` (any size for None): the smallest and the
        largest size there (one sample when they are the same size)."""
        found = sorted(
            (
                (size, args)
                for size, args in list(self.samples.items())
                if range_ is None or size in range_
            ),
            key=lambda item: item[0],
        )
        return found[:1] + found[-1:] if len(found) > 1 else found

    def sample_events(self, size: int) -> list[Any]:
        """The CUDA event after the copies of `size`'s sample, if it is on a GPU: a stream
        that waits for it reads that sample fully written, whichever stream copied it."""
        event = self.sample_written.get(size)
        return [] if event is None else [event]

    def histogram(self) -> dict[int, int]:
        # dict.copy runs in C under the GIL: a consistent snapshot even while serving
        # threads insert new sizes.
        return self.counts.copy()

    def entry_for(self, size: int) -> Entry:
        return self.table.lookup(size)


def match_output_structure(fn: Runnable, returns_tuple: bool) -> Runnable:
    """Make a compiled callable return what the captured graph returns.

    Inductor's compiled artifacts return a list where dynamo's graph returns a tuple
    (vLLM's wrapper unwraps the same way); dynamo indexes the result either way, but a
    caller-visible difference is not ours to introduce.
    """
    if not returns_tuple:
        return fn

    def as_tuple(*args: Any) -> Any:
        out = fn(*args)
        return out if isinstance(out, tuple) else tuple(out)

    return as_tuple
