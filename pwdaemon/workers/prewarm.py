"""One-time set-up of artifact loading, started as early as a process likes.

The first `CompiledArtifact.load` in a process pays for Inductor's imports, probing the
CPU's vector ISA with a compiler subprocess and hashing torch's source for cache keys:
about 3 s of CPU on a 2-core machine. `attach()` starts it on a background thread; a
server that calls `pwdaemon.prewarm()` at process start hides it behind its own start-up
(loading weights, say), so a warm restart serves specialized sooner.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from collections.abc import Iterator

from pwdaemon.serving.gate import GATE, GateClosed
from pwdaemon.serving.heap import HEAP

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _work() -> None:
    # Gated: it parks while serving calls are in progress (`pwdaemon.serving.gate`).
    try:
        with GATE.background():
            set_up_inductor(probe_cpu=False)
            HEAP.refreeze()  # Inductor's modules stay: out of collections' walks
            # Last, because this thread may not get its priority back after it.
            with lowest_niceness():
                from torch._inductor import cpu_vec_isa

                cpu_vec_isa.pick_vec_isa()
    except GateClosed:
        pass  # the interpreter exits
    except Exception:
        log.debug("pwdaemon: loader pre-warm failed", exc_info=True)


# The niceness of the probe and of artifact loads: the lowest CFS weight (1.5 % of a
# nice-0 thread's share when they compete). Not SCHED_IDLE: on a host that serving keeps
# busy that starves outright, and every artifact load waits for the probe.
LOWEST_NICENESS = 19


@contextlib.contextmanager
def lowest_niceness() -> Iterator[None]:
    """This thread, and the processes it starts, at `LOWEST_NICENESS` (Linux); for
    threads of pwdaemon's that start compilers in the serving process (the probe here,
    artifact loads in `pwdaemon.workers.compiler`).

    The vector-ISA probe runs the C++ compiler twice (~1 s). At the serving process's
    priority it took a core from serving, whose OpenMP team then waited for it: BERT's
    3 ms calls took 120-180 ms while it ran (thread stacks at each slow call, 2-core
    box). A child inherits the niceness of the thread that starts it, and on Linux the
    niceness is per thread, so serving threads keep theirs. Going back up needs a
    privilege Linux may deny, so it is the last work of the thread (the probe's, a load's).
    """
    tid = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, max(before, LOWEST_NICENESS))
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, before)


def set_up_inductor(*, probe_cpu: bool) -> None:
    """Inductor's one-time set-up, here and in compile workers: its imports, the CPU
    vector-ISA probe (compiler subprocesses, or their recorded answers:
    `pwdaemon.workers.setup_record`; `probe_cpu`) and the hash of torch's sources used in
    cache keys."""
    import torch._inductor.codecache as codecache
    import torch._inductor.compile_fx
    import torch._inductor.standalone_compile  # noqa: F401
    from torch._inductor import cpu_vec_isa

    from pwdaemon.workers import setup_record

    # Before any probe or load: a later process replays what this one finds.
    setup_record.install()
    if probe_cpu:
        cpu_vec_isa.pick_vec_isa()
    codecache.torch_key()


def prewarm() -> threading.Thread:
    """Start (once per process) the loader's one-time set-up on a daemon thread."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_work, name="pwdaemon-prewarm", daemon=True)
            _thread.start()
        return _thread
