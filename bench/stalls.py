"""What the process was doing during each slow call of a warm-up.

Attaches a model with a fresh store and calls its sizes round-robin (10 ms apart, as
bench/models.py's warm-up does) for `--seconds`. Each call slower than `--stall-ms`
shows its tier, whether it was the first call of its size on that tier, the CPU time the
serving thread itself spent in it (near the wall time: it was computing; far below: it
waited, for the GIL, a lock or a CPU), the time it spent in garbage collections, and
from `/proc/.../schedstat` who else ran meanwhile: threads by name, worker and compiler
processes with their policy and niceness.

`--stacks` also samples every thread's stack while a call runs past `--stall-ms`
(`_stack_sampler.py`, with the GIL held), every `--stall-ms / 2`: per sample, how late it
came (a GIL hold it waited out) and the threads running Python (not parked in a wait)
with their top frame and the first pwdaemon frame below it. Stacks attributed the slow
warm-up calls of 2026-12-01 (full collections, the ISA probe's and the first load's g++,
imports on threads that did not park) where timing alone could not.

`--waits` times, on the serving thread, each C call and each interval between its
profile events over 2 ms (`_wait_probe.py`): a call's wall time its CPU does not explain
was spent inside one C function (a lock, the GPU: named, with the line that called it)
or between events, waiting for the GIL.

    python bench/stalls.py [--model bert] [--seconds 80] [--stall-ms 40] [--store DIR]
                           [--threads N] [--no-cudnn-sdp] [--stacks] [--waits]
    python bench/stalls.py --device cuda --dtype fp16 --preset issue   # on a GPU

On CUDA every call ends waiting for its stream (as bench/models.py times it), and a
slow call shows the CUDA caching allocator's driver calls (cudaMalloc, cudaFree) any
thread made meanwhile: a serving op may wait for another thread's inside the allocator.
"""

from __future__ import annotations

import argparse
import gc
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _stack_sampler import Sample, StackSampler
from _wait_probe import CallWaits, WaitProbe

# A thread whose innermost frame is one of these functions is waiting, not running Python.
_WAITING = frozenset({"wait", "_wait_for_tstate_lock", "select", "get", "poll", "sleep"})
# Or in one of these files: watchdog's inotify threads block in a read there.
_WAITING_IN = ("watchdog/observers/inotify_c.py",)
_SIZES = (1, 4, 16)


_DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def _build(
    name: str, device_name: str, dtype_name: str, preset: str
) -> tuple[Any, dict[int, tuple[tuple[Any, ...], dict[str, Any]]]]:
    import torch

    device, dtype = torch.device(device_name), getattr(torch, _DTYPES[dtype_name])
    if name == "demo":
        from pwdaemon.models import demo_model, example_tokens

        calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {
            n: ((example_tokens(n).to(device),), {}) for n in _SIZES
        }
        return demo_model().to(device=device, dtype=dtype), calls
    from pwdaemon.real_models import model_spec

    spec = model_spec(name, preset)
    return spec.build(device, dtype), {n: spec.inputs(n, device, dtype) for n in _SIZES}


def _tier(handle: Any, size: int) -> str:
    """The tier a call of `size` will run on (as bench/_systems.py asks it)."""
    pieces = handle.pieces
    if not pieces:
        return "untraced"
    piece = next((p for p in pieces if p.specializable), pieces[0])
    return str(piece.dispatcher.table.lookup(size).tier.value)


Slow = tuple[int, int, float, float, str, bool, float, float, list[str]]


class Collections:
    """Garbage collections on the serving thread (`gc.callbacks`), in milliseconds."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.total_ms = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        if threading.get_ident() != self.thread:
            return
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total_ms += (time.perf_counter() - self._start) * 1e3


_POLICIES = {0: "normal", 3: "batch", 5: "idle"}


def _processes() -> list[int]:
    """This process and every descendant (workers, their compilers), from /proc."""
    parents: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rpartition(")")[2].split()[1])
    found, frontier = [os.getpid()], [os.getpid()]
    while frontier:
        frontier = [pid for pid, ppid in parents.items() if ppid in frontier]
        found += frontier
    return found


def _python_names() -> dict[int, str]:
    return {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}


def sched_snapshot() -> dict[tuple[int, int], tuple[int, int, str]]:
    """(pid, tid) -> (ns on a CPU, ns waiting on a run queue, "name policy/nice"), from
    /proc/<pid>/task/<tid>/schedstat: safe to read while everything runs, unlike a
    stack dump of running threads."""
    out: dict[tuple[int, int], tuple[int, int, str]] = {}
    for pid in _processes():
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in tids:
            base = f"/proc/{pid}/task/{tid}"
            try:
                run, wait, _ = Path(base, "schedstat").read_text().split()
                stat = Path(base, "stat").read_text()
            except (OSError, ValueError):
                continue
            name = stat[stat.index("(") + 1 : stat.rindex(")")]
            if pid == os.getpid():
                name = _python_names().get(int(tid), f"{name} {tid} (no Python thread)")
            else:
                name = f"{name} pid {pid}"
            fields = stat.rpartition(")")[2].split()
            nice, policy = int(fields[16]), int(fields[38])
            label = f"{name} {_POLICIES.get(policy, policy)}/{nice}"
            out[(pid, int(tid))] = (int(run), int(wait), label)
    return out


def sched_report(
    before: dict[tuple[int, int], tuple[int, int, str]],
    after: dict[tuple[int, int], tuple[int, int, str]],
    serving: tuple[int, int],
) -> list[str]:
    """The serving thread's CPU and queue wait during a call, then who else ran most."""
    lines = []
    delta = {
        key: (run - before.get(key, (0, 0, ""))[0], wait - before.get(key, (0, 0, ""))[1], label)
        for key, (run, wait, label) in after.items()
    }
    run, wait, _ = delta.get(serving, (0, 0, ""))
    lines.append(
        f"serving thread: on a CPU {run / 1e6:.1f} ms, waiting for one {wait / 1e6:.1f} ms"
    )
    others = sorted((d for k, d in delta.items() if k != serving), key=lambda d: -d[0])
    for run, wait, label in others[:4]:
        if run > 1e6:
            lines.append(f"{label}: on a CPU {run / 1e6:.1f} ms, waiting {wait / 1e6:.1f} ms")
    return lines


# The CUDA caching allocator's counters of driver calls, process-wide (every thread's):
# a segment's cudaMalloc or cudaFree is made inside the allocator (under its per-device
# lock, which every thread's allocation takes, as far as its source was read here), so a
# serving op may wait for another thread's. A hypothesis to test, not a finding.
_ALLOCATOR = {
    "num_device_alloc": "cudaMalloc",
    "num_device_free": "cudaFree",
    "num_sync_all_streams": "synchronizations of every stream",
    "num_alloc_retries": "allocations retried after freeing the cache",
}


def _allocator_counts() -> dict[str, int]:
    import torch

    stats = torch.cuda.memory_stats()
    return {key: int(stats.get(key, 0)) for key in _ALLOCATOR}


def _allocator_report(before: dict[str, int], after: dict[str, int]) -> list[str]:
    """The allocator's driver calls between the two readings (taken just outside the
    call's timer), by any thread."""
    done = [
        f"{after[k] - before[k]} {name}" for k, name in _ALLOCATOR.items() if after[k] > before[k]
    ]
    return [f"CUDA allocator meanwhile (any thread): {', '.join(done)}"] if done else []


def _report(
    slow: list[Slow], samples: dict[int, list[Sample]], waits: dict[int, CallWaits]
) -> None:
    for call, size, ms, at, tier, first, cpu_ms, gc_ms, sched in slow:
        seen = "first call on it" if first else "not its first"
        print(
            f"call {call} (size {size}, tier {tier}, {seen}) at {at:.2f} s: {ms:.1f} ms,"
            f" serving thread's CPU {cpu_ms:.1f} ms, its collections {gc_ms:.1f} ms"
        )
        for line in sched:
            print(f"    {line}")
        for wait in waits[call].waits if call in waits else []:
            print(
                f"    waited {wait.kind}: {wait.wall_ms:.1f} ms (CPU {wait.cpu_ms:.1f} ms),"
                f" {wait.what} at {wait.where}"
            )
        for due, late_ms, stacks in samples.get(call, []):
            print(f"    stacks {due * 1e3:.0f} ms into the call ({late_ms:.1f} ms late):")
            for name, frames in stacks.items():
                top = frames[0] if frames else ""
                function = top.partition(" | ")[0].rpartition(" ")[2]
                parked = _parked_at(frames)
                if parked:
                    # Shown: where a parked thread stands tells which locks it holds (a
                    # park inside the gate's own lock held every call's end for 50 ms).
                    print(f"      {name}: parked by the gate at {parked[:200]}")
                    continue
                if not top or function in _WAITING or top.startswith(_WAITING_IN):
                    continue
                ours = next(
                    (f for f in frames if f.startswith("pwdaemon/") and "gate.py" not in f), ""
                )
                print(f"      {name}: {frames[0][:200]}  <-  {ours[:70]}")


def _parked_at(frames: list[str]) -> str:
    """The frame a thread parked by the gate's hook stands in ("" if it is not parked):
    the one below the hook, which CPython called for that frame's event."""
    for i, frame in enumerate(frames[:-1]):
        if frame.startswith("pwdaemon/serving/gate.py:") and frame.endswith(" hook"):
            return frames[i + 1]
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert", help="demo, bert, gpt2, llama, ...")
    parser.add_argument("--seconds", type=float, default=80.0)
    parser.add_argument("--stall-ms", type=float, default=40.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(_DTYPES))
    parser.add_argument("--preset", default="tiny", choices=("tiny", "issue"))
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--no-cudnn-sdp",
        action="store_true",
        help="turn cuDNN attention off in this process (torch.backends.cuda.enable_cudnn_sdp)",
    )
    parser.add_argument(
        "--store", help="artifact store to use (default: a fresh one); run twice for a warm one"
    )
    parser.add_argument(
        "--stacks",
        action="store_true",
        help="also sample every thread's stack while a call runs past --stall-ms",
    )
    parser.add_argument(
        "--waits",
        action="store_true",
        help="also time the serving thread's C calls and GIL waits over 2 ms (a profile"
        " hook on it: every call slows alike, a few microseconds per Python call)",
    )
    opts = parser.parse_args()

    import torch

    import pwdaemon as pwd

    if opts.threads:
        torch.set_num_threads(opts.threads)  # before attach, as a server sets it
    if opts.no_cudnn_sdp:
        # cuDNN keeps its attention plans per thread (torch's MHA graph cache is
        # thread_local): each new shape costs the calling thread a plan build.
        torch.backends.cuda.enable_cudnn_sdp(False)
    model, calls = _build(opts.model, opts.device, opts.dtype, opts.preset)
    cuda = torch.device(opts.device).type == "cuda"
    handle = pwd.attach(model, sizes=list(_SIZES), store=opts.store or tempfile.mkdtemp())
    sampler = StackSampler(opts.stall_ms / 1e3, opts.stall_ms / 2e3) if opts.stacks else None
    probe = WaitProbe(threshold_ms=2.0) if opts.waits else None
    waits: dict[int, CallWaits] = {}
    slow: list[Slow] = []
    seen: set[tuple[int, str]] = set()
    collections = Collections()
    serving = (os.getpid(), threading.get_native_id())
    gc.callbacks.append(collections)
    t0 = time.perf_counter()
    with torch.inference_mode():
        i = 0
        while time.perf_counter() - t0 < opts.seconds:
            n = _SIZES[i % len(_SIZES)]
            args, kwargs = calls[n]
            tier = _tier(handle, n)
            first = (n, tier) not in seen
            seen.add((n, tier))
            sched_before = sched_snapshot()
            allocator_before = _allocator_counts() if cuda else {}
            cpu, gc0 = time.thread_time(), collections.total_ms
            if sampler is not None:
                sampler.begin(i)
            if probe is not None:
                probe.begin()
            start = time.perf_counter()
            model(*args, **kwargs)
            if cuda:  # the call's stream, as bench/models.py waits for it
                torch.cuda.current_stream().synchronize()
            took = time.perf_counter() - start
            if probe is not None:
                call_waits = probe.end()
            if sampler is not None:
                sampler.end()
            cpu_ms = (time.thread_time() - cpu) * 1e3
            gc_ms = collections.total_ms - gc0
            sched: list[str] = []
            if took * 1e3 > opts.stall_ms:
                sched = sched_report(sched_before, sched_snapshot(), serving)
                if cuda:
                    sched += _allocator_report(allocator_before, _allocator_counts())
                slow.append((i, n, took * 1e3, start - t0, tier, first, cpu_ms, gc_ms, sched))
                if probe is not None:
                    waits[i] = call_waits
            i += 1
            time.sleep(0.01)  # traffic pacing, as bench/models.py's warm-up
    handle.detach()
    print(f"{i} calls in {opts.seconds:.0f} s, {len(slow)} over {opts.stall_ms:.0f} ms")
    _report(slow, sampler.samples if sampler is not None else {}, waits)


if __name__ == "__main__":
    main()
