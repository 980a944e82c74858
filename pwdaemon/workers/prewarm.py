"""One-time set-up of artifact loading, started as early as a process likes.

The first `CompiledArtifact.load` in a process pays for Inductor's imports, probing the
CPU's vector ISA with a compiler subprocess and hashing torch's source for cache keys:
about 3 s of CPU on a 2-core machine. `attach()` starts it on a background thread; a
server that calls `pwdaemon.prewarm()` at process start hides it behind its own start-up
(loading weights, say), so a warm restart serves specialized sooner.
"""

from __future__ import annotations

import logging
import threading

from pwdaemon.serving.gate import GATE, GateClosed
from pwdaemon.serving.heap import HEAP
from pwdaemon.serving.priority import lowest_niceness

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _work() -> None:
    # Gated: it parks while serving calls are in progress (`pwdaemon.serving.gate`).
    # At the lowest niceness for its whole life (`pwdaemon.serving.priority`); the
    # probe's compilers inherit it.
    try:
        with GATE.background(), lowest_niceness():
            set_up_inductor(probe_cpu=False)
            HEAP.refreeze()  # Inductor's modules stay: out of collections' walks
            from torch._inductor import cpu_vec_isa

            cpu_vec_isa.pick_vec_isa()
    except GateClosed:
        pass  # the interpreter exits
    except Exception:
        log.debug("pwdaemon: loader pre-warm failed", exc_info=True)


def set_up_inductor(*, probe_cpu: bool) -> None:
    """Inductor's one-time set-up, here and in compile workers: its imports, the CPU
    vector-ISA probe (compiler subprocesses, or their recorded answers:
    `pwdaemon.workers.setup_record`; `probe_cpu`) and the hash of torch's sources used in
    cache keys."""
    from pwdaemon.workers import lazy_templates

    lazy_templates.install()  # before select_algorithm's import builds its templates
    import torch._inductor.compile_fx
    import torch._inductor.standalone_compile  # noqa: F401
    from torch._inductor import cpu_vec_isa

    from pwdaemon.workers import setup_record

    # Before any probe or load: a later process replays what this one finds.
    setup_record.install()
    if probe_cpu:
        cpu_vec_isa.pick_vec_isa()
    setup_record.torch_key()  # codecache.torch_key(), replayed when torch is unchanged


def prewarm() -> threading.Thread:
    """Start (once per process) the loader's one-time set-up on a daemon thread."""
    global _thread
    with _lock:
        if _thread is None:
            _thread = threading.Thread(target=_work, name="pwdaemon-prewarm", daemon=True)
            _thread.start()
        return _thread
