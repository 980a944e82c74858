"""Background Python work in the serving process runs in the gaps between calls.

pwdaemon does some Python work in the serving process itself: dynamo's trace of the
model (seconds), pickling a graph for the workers, loading artifacts, validating them,
the loader's one-time set-up. All of it needs the GIL, and a serving call that has to win
the GIL back after every torch op (hundreds per forward) waits up to CPython's switch
interval each time. Measured on this project's 2-core CPU box, a transformers BERT (4
layers, hidden 128) whose eager call takes 0.7 ms answered in 40-500 ms while dynamo
traced it on another thread.

So such work runs *gated*: `ServingGate.background()` installs a profile hook on the
working thread (and only there), and the hook parks that thread on an event, GIL
released, whenever a serving call is in progress. A serving call then costs what it costs
alone, plus at most one switch interval to get the GIL at its start (lowered while gated
work runs, see `lower_switch_interval`). Under traffic that never pauses, the parked
thread takes a short slice after `MAX_PAUSE_S`, and where serving leaves it no CPU at
all for seconds, slices that serving calls wait for (`catch_up.py`): the work finishes.

The hook is installed only while there is traffic to make way for. Any profile hook costs
the thread it runs on dearly: CPython 3.11 runs every bytecode of a profiled thread
through its tracing path, unspecialized, and calls the hook on every call and return.
Measured on dynamo's trace of the demo model: 1.2-1.4 s bare, 1.7-2.4 s with a no-op
C-level hook, 2.5-2.6 s with a Python one; a warm restart spent 6.4 s tracing instead of
2.7 s. Another thread cannot install a hook on a gated thread, but a garbage collection
runs its callbacks on the thread that triggered it, and gated work (tracing, unpickling,
loading) allocates all the time: a `gc.callbacks` entry installs the hook on a gated
thread at its first collection after a serving call began, and the hook takes itself off
once serving has been idle for `HOOK_IDLE_S`. The collection threshold is lowered while
gated work runs (`GATED_GC_THRESHOLD`) so that the first collection comes soon: during
the demo's trace, collections came every 1 ms (median; 3 ms at the 90th percentile)
instead of every 21-35 ms. Until then the call shares the GIL at the lowered switch
interval. Where automatic collection is off (`gc.disable()`), the hook is installed for
the whole block as before.

Serving calls announce themselves with `ServingGate.call()` only while gated work runs
or is about to (`working` is read without a lock on every call: a stale non-zero costs
one lock round). A call that began while `working` was 0 is not counted, so gated work
that starts during it does not park for it, and the call shares the GIL at the default
switch interval (5 ms) for every torch op: the demo's first call, made right after
`attach()` while the loader's set-up thread began its imports, took 130-280 ms instead of
6-18 ms in about a quarter of the runs. So whoever starts gated work *holds* the gate first
(`hold()`), on its own thread, before any gated thread exists: the engine holds it from
`attach()` until its plan completes, and around each job it runs.
"""

from __future__ import annotations

import _imp
import atexit
import contextlib
import ctypes
import gc
import sys
import threading
import time
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from pwdaemon.serving import catch_up, imports, pause, switch_interval
from pwdaemon.serving.catch_up import CatchUp, Yield
from pwdaemon.serving.dynamo_skip import codes_of, skip_in_dynamo
from pwdaemon.serving.imports import IMPORT_WATCH, import_awaited, in_import
from pwdaemon.serving.pause import PAUSE
from pwdaemon.serving.switch_interval import (
    INTERVAL_LOCK,
    lower_interval,
    lower_switch_interval,
    restore_interval,
)

# How long gated work waits for serving to pause before it takes a slice anyway: under
# back-to-back traffic it still progresses at SLICE_S / (MAX_PAUSE_S + SLICE_S) ~ 9 %.
MAX_PAUSE_S = 0.05
# The slice it then takes: a serving call arriving meanwhile waits at most this long.
SLICE_S = 0.005
# The switch interval while gated work runs: what a serving call can wait for the GIL at
# its start (the gated thread notices the call at its next Python call and parks). The
# default 5 ms would be 7x a 0.7 ms call; much lower and CPython spends its time switching.
GATED_SWITCH_INTERVAL_S = 0.0005

# While parked inside an import, how often to look whether a call began waiting for
# the module (it then runs on): what such a call can wait beyond the import itself.
IMPORT_CHECK_S = 0.002
# How long serving must be idle before a gated thread's hook takes itself off: calls that
# come closer together than this keep it on, so each finds the thread ready to park
# instead of waiting for its next collection.
HOOK_IDLE_S = 0.25
# How many hook events pass between two looks at the clock while serving is idle (one
# event every few hundred nanoseconds: a look every ~1 ms of gated work).
_IDLE_CHECK_EVERY = 4096
# The first-generation collection threshold while gated work runs (CPython's default is
# 700): a collection, and so the chance to install the hook, every ~1 ms of dynamo's
# tracing instead of every ~20-35 ms. A collection of 50 young objects takes
# microseconds; the second threshold is raised to match, so older generations are
# collected as often as before.
GATED_GC_THRESHOLD = 50
# The third threshold while serving traffic meets gated work (from the first call made
# while gated work runs until serving goes quiet or the work ends), not only during a
# call: full collections wait until then. A full collection cannot be parked, and what
# it walks is everything created since the heap was last frozen (dynamo's trace,
# Inductor's modules): one took 98 ms of a BERT call during a warm restart
# (bench/stalls.py). Freezing makes it come sooner, too: CPython runs one once the
# objects pending promotion exceed a quarter of the (now small) unfrozen old generation.
# Deferred only during calls, they came in the gaps between paced calls and the next
# call waited for them (bench/gil_holds.py: 30 ms during Inductor's imports, 66-69 ms
# during BERT's trace). Young cycles are still collected by the first two generations;
# what reaches the old one meanwhile waits for the next full collection after the work
# (or is frozen with the rest, as before).
GATED_FULL_COLLECTION_THRESHOLD = 1_000_000

# How long the interpreter's exit waits for gated threads to leave their work (see
# `ServingGate.close`): they leave at their next Python call, within milliseconds, unless
# they wait on something outside Python; the longest such wait is the vector-ISA probe's
# compiler run (~1 s).
EXIT_WAIT_S = 3.0

ProfileHook = Callable[[FrameType, str, Any], object]


class GateClosed(SystemExit):
    """Raised inside gated work when the interpreter exits (`ServingGate.close`).

    A SystemExit, so that the thread ends silently (threading's excepthook ignores it)
    and code that catches Exception to carry on (dynamo's fallbacks) lets it pass.
    """


class ServingGate:
    """Counts serving calls in progress; parks gated background threads meanwhile."""

    def __init__(self) -> None:
        # Gated threads alive plus holds: while non-zero, serving calls are counted (the
        # serving path reads it lock-free).
        self.working = 0
        self.calls = 0  # serving calls in progress (only counted while working > 0)
        self.last_call_end = 0.0  # time.monotonic() when the last serving call ended
        self._lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        # Threads running gated work whose hook comes on demand (read by the collection
        # callback on whatever thread collects: a set lookup, atomic under the GIL).
        self._on_demand: set[int] = set()
        self._gated: set[int] = set()  # every thread in a gated block
        self._hooked: set[int] = set()  # gated threads with the hook on
        # The collection thresholds before pwdaemon changed them, what it set, and
        # whether the watch is on (see `_apply_thresholds`).
        self._saved_threshold: tuple[int, int, int] | None = None
        self._applied_threshold: tuple[int, int, int] | None = None
        self._watching = False
        # The switch interval each gated thread asked for, and the one applied while
        # serving traffic is recent (None: not lowered now).
        self._intervals: dict[int, float] = {}
        self._traffic_interval: float | None = None
        self._closing = False
        self._parked_for_exit = 0  # gated threads parked for good by `close`
        # The catch-up schedule: slices of a starved gated thread that calls wait for.
        self.yielding = Yield()
        self._left = threading.Condition(self._lock)  # a gated block ended

    # ---- the serving side ----------------------------------------------------------

    @contextlib.contextmanager
    def call(self) -> Iterator[None]:
        """Mark one serving call in progress (use only when `working` is non-zero)."""
        if self.yielding.expires:
            self.yielding.wait()  # inside a catch-up slice of gated work: until its end
        with self._lock:
            self.calls += 1
            if self.calls == 1:
                PAUSE.stop()  # busy compile workers, where they share too few CPUs
            self._idle.clear()
            if self._on_demand:
                self._start_collection_watch()
            if self._traffic_interval is None and self._intervals:
                # Traffic came while gated work runs: from now on a call waits at most
                # the lowered interval for the GIL. Lowered only now because gated
                # threads hand the GIL to each other at that rate too, and that cost a
                # warm restart 1-1.5 s of 4-5 s with nobody calling.
                self._begin_traffic(min(self._intervals.values()))
        try:
            yield
        finally:
            with self._lock:
                self.calls -= 1
                if self.calls == 0:
                    PAUSE.resume()
                    self.last_call_end = time.monotonic()
                    self._idle.set()
                    self._stop_collection_watch()

    # ---- the background side -------------------------------------------------------

    def hold(self, *, expect_call: bool = False) -> None:
        """Count serving calls from now on, before the gated work they must hold back
        exists (see the module's docstring); undo with `release()`.

        `expect_call`: a call is likely soon (the first request after `attach()`), so
        gated work starting within `HOOK_IDLE_S` from now is hooked from its start, as
        if a call had just ended, instead of at its first collection after that call
        began (which came 5-15 ms into it while Inductor's imports ran).
        """
        with self._lock:
            self.working += 1
            if expect_call:
                self.last_call_end = max(self.last_call_end, time.monotonic())

    def release(self) -> None:
        """End one `hold()`."""
        with self._lock:
            self.working -= 1

    def gates_this_thread(self) -> bool:
        """Whether the calling thread runs inside `background()`."""
        return threading.get_ident() in self._gated

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """`hold()` for the block."""
        self.hold()
        try:
            yield
        finally:
            self.release()

    @contextlib.contextmanager
    def background(self, switch_interval: float | None = GATED_SWITCH_INTERVAL_S) -> Iterator[None]:
        """Run the block gated: on this thread, park while serving calls are in progress.

        While serving calls come, the switch interval is lowered to `switch_interval`
        (None: leave it). Re-entrant; other threads are not affected by the hook.
        """
        ident = threading.get_ident()
        if ident in self._gated:
            yield  # nested: the outer block gates this thread already
            return
        if self._closing:
            raise GateClosed("the interpreter is exiting")
        if sys.getprofile() is not None:
            # Someone profiles this thread: no hook of ours; lower the interval for
            # the block, as before the gate.
            with lower_switch_interval(switch_interval):
                yield
            return
        on_demand = gc.isenabled() and gc.get_threshold()[0] > 0
        with self._lock:
            self.working += 1
            self._gated.add(ident)
            if switch_interval is not None:
                self._intervals[ident] = switch_interval
                if self.calls and self._traffic_interval is None:
                    # A counted call is in progress already (the gate was held): it
                    # waits at most this interval for the GIL from now on.
                    self._begin_traffic(switch_interval)
            if on_demand:
                self._on_demand.add(ident)
                if self.calls:
                    self._start_collection_watch()
        if not on_demand or self._serving_active():
            # No collections to install it from (the hook then stays for the whole
            # block), or serving is active now: hooked from the start, the hook comes
            # off by itself once serving has been idle for HOOK_IDLE_S.
            self._install_hook()
        try:
            yield
        finally:
            # Out of the collection watch first (a set's discard, atomic under the GIL):
            # a collection in the lock section below put the hook back after
            # `_remove_hook`, and the thread kept it after the block (anyio's worker
            # threads live on), parked in each later block's lock section.
            self._on_demand.discard(ident)
            if _is_gate_hook(sys.getprofile()):
                self._remove_hook()
                if self.yielding.expires:
                    # Work done: calls need not wait for its slices (another starved
                    # gated thread, rarer still, sets a schedule again at once).
                    self.yielding.end()
            with self._lock:
                self.working -= 1
                self._gated.discard(ident)
                self._left.notify_all()
                self._intervals.pop(ident, None)
                if not self._intervals:
                    self._end_traffic()
                if on_demand and not self._on_demand:
                    self._stop_collection_watch()

    def close(self, timeout: float = EXIT_WAIT_S) -> bool:
        """Stop all gated work for good: a hooked gated thread parks for ever at its
        next Python call, an unhooked one gets `GateClosed` raised in it (between two
        bytecodes, as KeyboardInterrupt is) and leaves its work, and new gated blocks
        raise it at once. Waits up to `timeout` for every gated thread to park or leave;
        whether all did.

        Registered with atexit for `GATE`: on CPython < 3.14 a daemon thread that wants
        the GIL back once the interpreter is finalizing is ended with pthread_exit, and
        that forced unwind through a torch op (pybind11's GIL release, a noexcept
        destructor) calls std::terminate: "terminate called without an active
        exception", exit status 134, in ~1 of 30 short scripts that exited during the
        warm-up (core dump: the loader's set-up thread in `torch.empty_strided`). A
        thread parked for ever never takes the GIL again, so it is never unwound; the
        process's exit ends it. Raising in a hooked thread could land inside the hook,
        which also runs inside collection callbacks and C code that does not expect an
        error (raised from the hook, the interpreter crashed); an unhooked thread, such
        as one in a loop of torch ops that leaves nothing for a collection to find,
        would never park.
        """
        deadline = time.monotonic() + timeout
        raised: set[int] = set()
        with self._lock:
            if not self._closing:
                self._closing = True
                self.calls += 1  # never ends: hooks stay on
                self._idle.set()  # parked threads wake, see `_closing` and park for good
            while len(self._gated) > self._parked_for_exit:
                for ident in self._gated - self._hooked - raised:
                    _raise_in_thread(ident, GateClosed)
                    raised.add(ident)
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                # Woken by a block ending or a thread parking; every 50 ms to catch a
                # hook that took itself off just as this began.
                self._left.wait(min(left, 0.05))
        # A thread that left its block for GateClosed is still unwinding (its frames'
        # tensors freed, which can release the GIL inside torch): finalization beginning
        # then ends it mid-destructor and aborts the process, as above. Wait for those
        # threads to end (outside the lock, which they may take on their way out).
        for thread in threading.enumerate():
            if thread.ident in raised and thread is not threading.current_thread():
                thread.join(max(0.0, deadline - time.monotonic()))
        return True

    def _park_for_exit(self) -> None:
        with self._lock:
            self._parked_for_exit += 1
            self._left.notify_all()
        threading.Event().wait()  # never set: see `close`

    def _begin_traffic(self, interval: float) -> None:
        # Under self._lock, while no traffic is under way: the lowered switch interval
        # and deferred full collections, until `_end_traffic`.
        self._traffic_interval = interval
        lower_interval(interval)
        self._apply_thresholds()

    def _end_traffic(self) -> None:
        # Under self._lock.
        if self._traffic_interval is not None:
            self._traffic_interval = None
            restore_interval()
            self._apply_thresholds()

    def _serving_active(self) -> bool:
        """A serving call is in progress or ended less than HOOK_IDLE_S ago."""
        return bool(self.calls) or time.monotonic() - self.last_call_end <= HOOK_IDLE_S

    def _serving_went_quiet(self) -> bool:
        """Whether no serving call ran for HOOK_IDLE_S; if so, ends the lowered interval.

        Called from the hook, which can fire on a thread that holds either lock (a C
        call inside `lower_switch_interval`, say): never block on them.
        """
        if self._serving_active():
            return False
        if self._traffic_interval is not None and self._lock.acquire(blocking=False):
            try:
                if not self.calls and INTERVAL_LOCK.acquire(blocking=False):
                    INTERVAL_LOCK.release()  # free now; _end_traffic takes it briefly
                    self._end_traffic()
            finally:
                self._lock.release()
        return True

    # Both under self._lock. The watch (a collection callback, a lower threshold) is on
    # only while serving calls are in progress and gated threads run: a Python callback
    # on every collection lets CPython switch threads inside C code that allocates, and
    # CPython 3.11.7's AST constructor then failed with "AST constructor recursion depth
    # mismatch" once here (pytest rewriting a module while a gated thread ran; the error
    # threaded programs report, python/cpython#106905).
    def _start_collection_watch(self) -> None:
        if not self._watching:
            self._watching = True
            self._apply_thresholds()
            gc.callbacks.append(self._on_collection)
            IMPORT_WATCH.gates.add(self)

    def _stop_collection_watch(self) -> None:
        if self._watching:
            self._watching = False
            self._apply_thresholds()
            with contextlib.suppress(ValueError):
                gc.callbacks.remove(self._on_collection)
            IMPORT_WATCH.gates.discard(self)

    def _apply_thresholds(self) -> None:
        # Under self._lock. The thresholds follow two states: the watch lowers the first
        # (a collection soon, to hook a gated thread), and the watch or traffic during
        # gated work defers full collections. Neither: what was there before. A user
        # who changed the thresholds meanwhile keeps theirs.
        defer = self._watching or self._traffic_interval is not None
        current = gc.get_threshold()
        if self._saved_threshold is not None and current != self._applied_threshold:
            self._saved_threshold = current  # changed by someone else: theirs from now on
        if not defer:
            if self._saved_threshold is not None:
                gc.set_threshold(*self._saved_threshold)
            self._saved_threshold = self._applied_threshold = None
            return
        saved = self._saved_threshold = self._saved_threshold or current
        first = min(saved[0], GATED_GC_THRESHOLD) if self._watching else saved[0]
        applied = (
            first,
            # The second raised to match a lowered first: older generations as often.
            saved[1] if first == saved[0] else max(1, saved[1] * saved[0] // first),
            max(saved[2], GATED_FULL_COLLECTION_THRESHOLD),
        )
        self._applied_threshold = applied
        gc.set_threshold(*applied)

    def _on_collection(self, phase: str, info: dict[str, int]) -> None:
        # Runs on the thread whose allocation triggered the collection, GIL held, before
        # it starts.
        if phase == "start":
            self._hook_if_called()

    def _hook_if_called(self) -> None:
        # On the thread to hook: sys.setprofile applies to the calling thread only, from
        # its next call on.
        if (
            self.calls
            and not self._closing  # `close` raises in unhooked threads: stay unhooked
            and threading.get_ident() in self._on_demand
            and sys.getprofile() is None
        ):
            self._install_hook()

    # Both on the thread concerned. `_hooked` tells `close` which threads the hook will
    # park (a set add or discard is atomic under the GIL).
    def _install_hook(self) -> None:
        self._hooked.add(threading.get_ident())
        sys.setprofile(self._hook())

    def _remove_hook(self) -> None:
        sys.setprofile(None)
        self._hooked.discard(threading.get_ident())

    def _hook(self) -> ProfileHook:
        run_until = 0.0
        countdown = _IDLE_CHECK_EVERY
        idle, monotonic = self._idle, time.monotonic
        state, yielding = CatchUp(), self.yielding
        # The locks every counted serving call takes (`call`): the hook never parks a
        # thread while one of them is held, by anyone. It parks at any profile event,
        # and one inside a `with lock:` section parks with the lock held (a Python call
        # there, or any event after the GIL changed hands there). Seen on an H100
        # (bench/stalls.py --stacks, warm BERT starts, 2026-12-06): calls of 55-69 ms
        # against medians of 1-5 ms, mostly a size's first call on a tier just
        # published, the serving thread asleep at the end of `call` waiting for this
        # gate's lock, the engine's loop thread beside it, for the 50 ms of a pause.
        # One that the serving thread holds for its microseconds only defers a park to
        # a later event. Other locks (a gated section's own, logging's) are not
        # covered: serving calls do not take them.
        serving_locks = (self._lock, INTERVAL_LOCK, PAUSE)

        def hook(frame: FrameType, event: str, arg: Any) -> None:
            # Called by CPython on every call/return on the gated thread (never on
            # others), with profiling off inside: keep the common case to one read.
            nonlocal run_until, countdown
            if self._closing:
                if not _imp.lock_held():  # see below
                    self._park_for_exit()
                return
            if not self.calls:
                countdown -= 1
                if countdown <= 0:
                    countdown = _IDLE_CHECK_EVERY
                    if self._serving_went_quiet() and threading.get_ident() in self._on_demand:
                        # Run at full speed until a collection finds a call in progress.
                        self._remove_hook()
                return
            if run_until and monotonic() < run_until:
                return  # inside a slice taken after a long pause
            # Inside an import, park only while nobody waits for a module this thread is
            # importing: parked there, a serving call that needed the module waited on
            # its lock while we ran 5 ms per 50 ms (a demo call took 4.2 s right after
            # the trace thread started). Running every import on instead made serving
            # calls during dynamo's and Inductor's imports (seconds) share the GIL at
            # the switch interval for each torch op: ~40 ms for a 1 ms demo call.
            importing = in_import(frame)
            if importing and import_awaited(self._gated):
                run_until = monotonic() + SLICE_S
                return
            if importing and _imp.lock_held():
                # Inside a meta-path finder (importlib calls each under its global
                # lock, `_ImportWatch` among them), or taking a module lock: parked
                # here, every import on every thread would wait, a serving call's too.
                return
            if any(lock.locked() for lock in serving_locks):
                # This thread may hold it: parked, it would hold every serving call that
                # wants it for MAX_PAUSE_S (see `serving_locks` above).
                return
            now = monotonic()
            catching = state.starved(now)
            if catching:
                # Starved of the CPU (catch_up.py): inside a slice that serving calls
                # wait for, run; else park as below until the next one at the latest.
                yielding.renew(now)
                left = yielding.left(now)
                if left > 0:
                    run_until = now + left
                    return
            # Park, GIL released, until no serving call is in progress. Checked again
            # on waking, with the GIL held (calls are counted under it): back-to-back
            # calls leave gaps of microseconds, and going on into the C function this
            # hook fired for (dynamo's guard building can hold the GIL for milliseconds)
            # while the next call has begun would stall that call.
            deadline = monotonic() + MAX_PAUSE_S
            while self.calls:
                left = deadline - monotonic()
                if left <= 0 or (importing and import_awaited(self._gated)):
                    run_until = monotonic() + SLICE_S
                    return
                if catching:
                    now = monotonic()
                    left_of_slice = yielding.left(now)
                    if left_of_slice > 0:
                        run_until = now + left_of_slice  # calls beginning now wait for it
                        return
                    left = min(left, yielding.until_next(now))
                # Parked in an import: look every IMPORT_CHECK_S whether a call began
                # waiting for it.
                idle.wait(min(left, IMPORT_CHECK_S) if importing else left)
                if self._closing:
                    return  # parks for good at its next event
            run_until = 0.0

        return hook


def _raise_in_thread(ident: int, exc: type[BaseException]) -> None:
    """Raise `exc` in thread `ident` at its next bytecode (CPython's async exception)."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(ident), ctypes.py_object(exc))


_HOOK_CODE = ServingGate._hook(ServingGate()).__code__  # every gate's hooks share it


def _is_gate_hook(profile: object) -> bool:
    return getattr(profile, "__code__", None) is _HOOK_CODE


class GateHold:
    """One `hold()` of a gate, ended once by the first `release()` from any thread."""

    def __init__(self, gate: ServingGate, *, expect_call: bool = False) -> None:
        self._gate = gate
        self._lock = threading.Lock()
        gate.hold(expect_call=expect_call)
        self.held = True

    def release(self) -> None:
        with self._lock:
            if not self.held:
                return
            self.held = False
        self._gate.release()


GATE = ServingGate()
"""The process's gate: calls of every attached model hold back all gated work."""
atexit.register(GATE.close)


# Last, once every function here exists: the hook, the collection callback and all they
# call (this module's, the import checks', the threading events they wait on) run as
# they are on a thread where dynamo's frame callback is installed (see dynamo_skip).
skip_in_dynamo(
    codes_of(
        (
            sys.modules[__name__],
            ServingGate,
            GateHold,
            imports,
            pause.ProcessPause,
            switch_interval,
            catch_up,
            catch_up.CatchUp,
            catch_up.Yield,
            threading.Event,
            threading.Condition,
        ),
        frozenset(
            {
                __file__,
                imports.__file__,
                pause.__file__,
                switch_interval.__file__,
                catch_up.__file__,
                threading.__file__,
            }
        ),
    )
)
