"""Every thread's stack during a slow call, read with the GIL held (bench/stalls.py).

`faulthandler.dump_traceback_later` dumps from a C thread without the GIL, which reads
frames other threads are changing: it crashed bench/stalls.py (SIGSEGV, SIGBUS) in 4 of
7 BERT runs at a 20 ms threshold. This sampler is a Python thread instead, idle on an
event until a call has run `after_s`; then it takes every thread's stack
(`sys._current_frames`, under the GIL) every `every_s` until the call ends.

What it sees differs in one useful way: it needs the GIL to look. Where another thread
keeps the GIL through one long C call, the sample comes only when that call returns, so
the sample records how late it came (the GIL hold it waited out) and that thread stands
at, or just past, the line that made the call.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback

# Frames kept per thread, innermost first: enough to reach pwdaemon's or torch's caller.
DEPTH = 24

# (seconds into the call it was due, ms it came late, {thread name: frames, innermost
# first, as "file:line function"})
Sample = tuple[float, float, dict[str, list[str]]]


class StackSampler:
    """`begin(call)` before a call and `end()` after it, from one serving thread."""

    def __init__(self, after_s: float, every_s: float) -> None:
        self.after_s = after_s
        self.every_s = every_s
        self.samples: dict[int, list[Sample]] = {}
        self._call = (0, 0.0)  # (call id, perf_counter at its start)
        self._begun = threading.Event()
        self._ended = threading.Event()
        self._idle = threading.Event()  # the sampler is between calls
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="stack-sampler", daemon=True)
        self._thread.start()

    def begin(self, call: int) -> None:
        # The last call's sampling must be over before this one arms: the sampler takes
        # the GIL within microseconds once `end` woke it, unless a C call keeps it.
        self._idle.wait()
        self._idle.clear()
        self._ended.clear()
        self._call = (call, time.perf_counter())
        self._begun.set()

    def end(self) -> None:
        self._ended.set()

    def _run(self) -> None:
        me = threading.get_ident()
        while True:
            self._begun.wait()
            self._begun.clear()
            call, start = self._call
            due = start + self.after_s
            while not self._ended.wait(max(0.0, due - time.perf_counter())):
                late = time.perf_counter() - due
                names = {t.ident: t.name for t in threading.enumerate()}
                stacks = {
                    names.get(ident, str(ident)): _frames(frame)
                    for ident, frame in sys._current_frames().items()
                    if ident != me
                }
                # Kept even where the call ended while this sample waited for the GIL:
                # whoever kept it then stands near the line that did.
                self.samples.setdefault(call, []).append((due - start, late * 1e3, stacks))
                due = time.perf_counter() + self.every_s
            self._idle.set()


def _frames(frame: object) -> list[str]:
    entries = traceback.extract_stack(frame, limit=DEPTH)  # type: ignore[arg-type]
    return [f"{_short(e.filename)}:{e.lineno} {e.name}{_code(e)}" for e in reversed(entries)]


def _code(entry: traceback.FrameSummary) -> str:
    # A graph's generated forward (FX keeps its source in linecache): which op it is on.
    if not entry.filename.startswith("<eval_with_key") or not entry.line:
        return ""
    return " | " + entry.line.strip()[:110]


def _short(path: str) -> str:
    # .../site-packages/torch/x.py -> torch/x.py; .../python3.11/queue.py -> queue.py.
    for root in ("site-packages/", "dist-packages/"):
        if root in path:
            return path.rsplit(root, 1)[1]
    if "/pwdaemon/" in path:
        return "pwdaemon/" + path.rsplit("/pwdaemon/", 1)[1]
    if "/python3." in path:
        return path.rsplit("/python3.", 1)[1].partition("/")[2]
    return path
