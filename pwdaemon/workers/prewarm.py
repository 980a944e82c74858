"""One-time set-up of artifact loading, started as early as a process likes.

The first `CompiledArtifact.load` in a process pays for Inductor's imports, probing the
CPU's vector ISA with a compiler subprocess and hashing torch's source for cache keys:
about 3 s of CPU on a 2-core machine. On a GPU the first load of a Triton kernel also
hashes Triton's compiler sources and its `libtriton.so` (`triton_key`, part of
Triton's cache key): 1.2 s of the H200 machine's warm restart, after the imports, on the
loading thread, unless the store recorded it (`triton_source_key`). `attach()` starts
it all on background threads; a server that calls `pwdaemon.prewarm()` at process start
hides it behind its own start-up (loading weights, say), so a warm restart serves
specialized sooner.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable

from pwdaemon.serving.gate import GATE, GateClosed
from pwdaemon.serving.heap import HEAP
from pwdaemon.serving.priority import lowest_niceness
from pwdaemon.workers import triton_source_key

log = logging.getLogger(__name__)

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _work() -> None:
    # Gated: it parks while serving calls are in progress (`pwdaemon.serving.gate`).
    # At the lowest niceness for its whole life (`pwdaemon.serving.priority`); the
    # probe's compilers inherit it.
    hashing: threading.Thread | None = None
    try:
        with GATE.background(), lowest_niceness():
            hashing = start_triton_key()
            set_up_inductor(probe_cpu=False)
            HEAP.refreeze()  # Inductor's modules stay: out of collections' walks
            if not pick_recorded_isa() and not workers_probe_cpu():
                # No worker will record the answers: probe here, off the load path.
                from torch._inductor import cpu_vec_isa

                with ISA_LOCK:
                    cpu_vec_isa.pick_vec_isa()
    except GateClosed:
        pass  # the interpreter exits
    except Exception:
        log.debug("pwdaemon: loader pre-warm failed", exc_info=True)
    if hashing is not None:
        # A load joins the pre-warm: after this, its kernels find the key computed.
        hashing.join()


def start_triton_key() -> threading.Thread | None:
    """Compute or replay Triton's source key on a thread of its own, beside Inductor's
    imports; None where no Triton kernel will load (no CUDA, no Triton).

    Triton caches the key for the process (`functools.lru_cache`), so the first kernel
    load finds it. Measured on the H200 machine (torch 2.11): 1.2 s on the loading thread
    after the imports, in a warm restart of about 2 s from attach to every size
    specialized. A process whose store recorded the key for these Triton files replays
    it (`triton_source_key`, milliseconds); one that computes it runs beside the imports
    on another core (hashlib lets go of the GIL while it hashes `libtriton.so`).
    """
    import torch

    if not torch.cuda.is_available():
        return None
    try:
        # Triton's own module, not torch's `triton_compat`: that would import
        # `torch._inductor` here, before `set_up_inductor` installs the lazy templates.
        # Imported on the pre-warm's thread, so the hashing thread imports nothing of
        # torch's beside Inductor's imports (two threads importing torch's circular
        # modules at once can deadlock).
        import triton

        try:
            from triton.runtime.cache import triton_key
        except ImportError:
            from triton.compiler.compiler import triton_key
    except ImportError:
        return None
    # Where and which Triton, to key a recorded key by (without them it is computed).
    where, version = getattr(triton, "__file__", None), getattr(triton, "__version__", None)
    package = None
    if isinstance(where, str) and version is not None:
        package = (os.path.dirname(where), str(version))
    thread = threading.Thread(
        target=_hash_triton,
        args=(triton_key, package),
        name="pwdaemon-triton-key",
        daemon=True,
    )
    thread.start()
    return thread


def _hash_triton(triton_key: Callable[[], object], package: tuple[str, str] | None) -> None:
    # `package`: Triton's directory and version, None where Triton does not say them.
    try:
        with GATE.background(), lowest_niceness():
            if package is None:
                triton_key()
            else:
                record = triton_source_key.record_for_environment()
                triton_source_key.prime(triton_key, *package, record)
    except GateClosed:
        pass  # the interpreter exits
    except Exception:
        log.debug("pwdaemon: Triton's source key failed", exc_info=True)


# The first `pick_vec_isa()` of the process, whoever makes it: the probe is not
# thread-safe (`VecAVX512.__bool__` appends -mavx512bf16 to the shared ISA object's flags
# while it test-builds, so a kernel whose build key is computed meanwhile on another
# thread gets a different key and is rebuilt: a warm restart compiled C++ again, in CI).
ISA_LOCK = threading.Lock()


def pick_recorded_isa() -> bool:
    """Pick the CPU's vector ISA from the set-up record only; False (nothing kept) where
    an answer is missing.

    The pre-warm does not probe itself: the probe's test build (g++ on a file including
    torch's headers, ~2 s of a core at niceness 19) kept one vCPU of this 2-core VM while
    serving's two OpenMP threads shared the other, calls of 50-190 ms against 2 ms
    (`bench/stalls.py`, demo model, a fresh store). A compile worker probes at its start
    and records the answers (`setup_record`) before it compiles anything, so the first
    load of what it compiled replays them (`load_artifact`); only a load with no worker's
    answers behind it probes, on its own thread.
    """
    from torch._inductor import cpu_vec_isa

    from pwdaemon.workers import setup_record

    # VecAVX512 changes its flags around a probe: a probe cut short by NotRecorded must
    # not leave them changed.
    flags = [(isa, isa.__dict__.get("_arch_flags")) for isa in cpu_vec_isa.supported_vec_isa_list]
    with ISA_LOCK:
        try:
            with setup_record.replay_only():
                cpu_vec_isa.pick_vec_isa()
        except setup_record.NotRecorded:
            for isa, own in flags:
                if own is None:
                    isa.__dict__.pop("_arch_flags", None)
                else:
                    isa._arch_flags = own
            return False
    return True


def workers_probe_cpu() -> bool:
    """Whether compile workers probe the CPU's vector ISA at their start (and record the
    answers): not on a GPU machine, whose compiles rarely build C++ kernels."""
    import torch

    return not torch.cuda.is_available()


def set_up_inductor(*, probe_cpu: bool) -> None:
    """Inductor's one-time set-up, here and in compile workers: its imports, the CPU
    vector-ISA probe (compiler subprocesses, or their recorded answers:
    `pwdaemon.workers.setup_record`; `probe_cpu`), the hash of torch's sources used in
    cache keys, and the bytecode kept beside its generated modules
    (`pwdaemon.workers.module_bytecode`)."""
    from pwdaemon.workers import lazy_templates

    lazy_templates.install()  # before select_algorithm's import builds its templates
    import torch._inductor.compile_fx
    import torch._inductor.standalone_compile  # noqa: F401
    from torch._inductor import cpu_vec_isa

    from pwdaemon.workers import module_bytecode, setup_record

    # Before any probe or load: a later process replays what this one finds.
    setup_record.install()
    module_bytecode.install()
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


def started() -> threading.Thread | None:
    """The pre-warm's thread, if this process started one."""
    with _lock:
        return _thread
