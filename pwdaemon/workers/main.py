"""A compile worker's entry point: a plain subprocess that serves jobs over two pipes.

    python -m pwdaemon.workers.main --job-fd R --result-fd W [--parent-pid P] [--nice N]

`process.Worker` starts it (through a tiny `-c` bootstrap that lowers the priority before
anything imports torch) and owns both pipe ends. It is never started by multiprocessing:
spawn re-runs the user's `__main__` in the child, so a script without a main guard never
gets a worker, and it leaves a resource tracker behind (DESIGN.md).

Frames (`framing`), one job at a time:

    worker -> host   ready  {pid, torch, start_s}        after the imports and set-up
    host -> worker   job    {target, out_path, options, fault} + graph bytes (payload)
    worker -> host   result {path, seconds, note}     note: a torch bug worked around
                     error  {reason, traceback}          reason: one line a person reads
    host -> worker   stop                                 (or closes the pipe: exit now)

Frames use their own pipe fds, never stdout/stdin: Inductor and user code may print, and
one stray byte on the channel would end the worker. The host points our stdout at its
stderr and stdin at /dev/null.
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from pwdaemon.workers.framing import (
    Frame,
    FrameError,
    PeerClosed,
    encode,
    fd_writer,
    file_reader,
    read_frame,
)

log = logging.getLogger(__name__)

_REASON_CHARS = 2000  # one readable line in status and logs; the traceback carries the rest
_PARENT_POLL_S = 1.0


def _warm_up() -> None:
    # What every first compile in a process pays, paid before "ready" so that a job's
    # timeout bounds its compile, not this process's start (CompileConfig.start_timeout_s
    # bounds this part): Inductor's set-up, and the graph unpickler.
    import torch
    import torch.fx._graph_pickler  # noqa: F401

    import pwdaemon.workers.compiler  # noqa: F401
    from pwdaemon.workers.prewarm import set_up_inductor, start_triton_key, workers_probe_cpu

    # On a GPU, every worker's first Triton compile needs Triton's source key (1.2 s of
    # hashing on the H200 machine, replayed from the store's record once one process
    # computed it): worked out beside the imports.
    hashing = start_triton_key()
    set_up_inductor(probe_cpu=workers_probe_cpu())
    if hashing is not None:
        hashing.join()


def _watch_parent(parent_pid: int) -> None:
    # The host closing our job pipe ends us (the reader thread sees EOF). This covers the
    # case where the pipe's write end leaked into another process (a fork in the host):
    # once our parent is gone nobody waits for a result. prctl(PR_SET_PDEATHSIG) is not
    # used: it fires when the *thread* that started us exits, and the host starts workers
    # from pool threads that come and go.
    while True:
        time.sleep(_PARENT_POLL_S)
        if os.getppid() != parent_pid:
            os._exit(0)


def _read_jobs(read: Callable[[int], bytes], jobs: queue.Queue[Frame]) -> None:
    # Reads on its own thread so that the host going away is seen even mid-compile.
    while True:
        try:
            frame = read_frame(read)
        except PeerClosed:
            os._exit(0)  # the host closed the pipe: nobody waits for what we would send
        except FrameError as exc:
            sys.stderr.write(f"pwdaemon worker {os.getpid()}: bad frame from host: {exc}\n")
            os._exit(2)
        except OSError:
            os._exit(0)
        jobs.put(frame)
        if frame.type == "stop":
            return


def _error_header(exc: BaseException) -> dict[str, Any]:
    reason = f"{type(exc).__name__}: {exc}".strip()
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    first = lines[0] if lines else type(exc).__name__
    # A compiler's failure (Inductor's CppCompileError) says only "C++ compile error" on
    # its first line; the compiler's output below it names what failed.
    detail = next((line for line in lines[1:] if "error:" in line.lower()), None)
    if detail is not None:
        first = f"{first}: {detail}"
    if len(first) > _REASON_CHARS:
        first = first[:_REASON_CHARS] + "..."
    return {"reason": first, "traceback": traceback.format_exc(limit=12)}


def serve(job_fd: int, result_fd: int, parent_pid: int | None) -> int:
    """Import, say ready, then compile jobs until told to stop; returns an exit code."""
    started = time.perf_counter()
    send = fd_writer(result_fd)
    try:
        _warm_up()
        import torch

        from pwdaemon.workers.compiler import JobSpec, compile_job
    except BaseException as exc:
        send(encode("error", _error_header(exc)))
        return 1
    send(
        encode(
            "ready",
            {
                "pid": os.getpid(),
                "torch": torch.__version__,
                "start_s": round(time.perf_counter() - started, 3),
            },
        )
    )
    if parent_pid is not None:
        threading.Thread(
            target=_watch_parent, args=(parent_pid,), name="pwdaemon-parent", daemon=True
        ).start()
    jobs: queue.Queue[Frame] = queue.Queue()
    threading.Thread(
        target=_read_jobs,
        args=(file_reader(lambda n: os.read(job_fd, n)), jobs),
        name="pwdaemon-jobs",
        daemon=True,
    ).start()
    while True:
        frame = jobs.get()
        if frame.type == "stop":
            return 0
        if frame.type != "job":
            send(encode("error", {"reason": f"unknown message {frame.type!r}", "traceback": ""}))
            continue
        try:
            spec = JobSpec.from_frame(frame)
            result = compile_job(spec)
        except BaseException as exc:
            send(encode("error", _error_header(exc)))
            continue
        send(encode("result", result))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pwdaemon.workers.main")
    parser.add_argument("--job-fd", type=int, required=True)
    parser.add_argument("--result-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, default=None)
    parser.add_argument(
        "--nice",
        type=int,
        default=0,
        help="priority increment; the host's bootstrap applies it before importing torch",
    )
    args = parser.parse_args(argv)
    # Ctrl-C in a terminal belongs to the serving process; it stops us by closing pipes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if args.nice:
        try:
            os.nice(args.nice)
        except OSError:
            log.debug("could not lower the worker's priority", exc_info=True)
    try:
        code = serve(args.job_fd, args.result_fd, args.parent_pid)
    except BrokenPipeError:
        # The serving process is gone (killed, or crashed) while we sent a result:
        # nobody is left to read it, nor a traceback on the terminal we share with it.
        code = 0
    # No interpreter teardown: nothing to flush, and torch's atexit hooks may print.
    os._exit(code)


if __name__ == "__main__":
    main()
