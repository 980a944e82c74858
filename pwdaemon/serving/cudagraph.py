"""Tier 3: a CUDA graph of a size's compiled runnable, captured in the serving process.

CUDA graphs belong to the process (and pool) that captures them, so capture happens
here, on the engine's thread, on a side stream with thread-local capture mode: serving
threads keep launching work on their own streams meanwhile. A replay copies the call's
inputs into the graph's static buffers, replays, and copies the outputs out, so a caller
never sees its output overwritten by a later replay. Replays of one graph are
serialised by a non-blocking lock: a call that finds the graph busy (another thread is
replaying it) runs the tier-2 runnable instead of waiting.

The lock orders replays on the host; on the GPU, replays queued on one stream run in
order, but a replay queued on another stream (validation on the engine's stream, a
server that calls from streams of its own) could run while the last one still reads
the static buffers, or the memory the pool's graphs share. So a replay from another
stream than the pool's last one first makes its stream wait for that one (an event on
the GPU, nothing blocks a thread); a replay from the same stream pays one comparison.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from pwdaemon.serving.inputs import wait_for_events

log = logging.getLogger(__name__)

Runnable = Callable[..., Any]


@dataclass(frozen=True)
class GraphConfig:
    """CUDA-graph tier settings (used only for pieces whose tensors live on a GPU).

    Capture runs on a serving thread, at the start of a call (a one-time pause per
    size, see `Engine.capture_pauses`): while torch captures a graph, any other use of
    the default CUDA RNG in the process raises. A server whose *other* threads draw CUDA
    random numbers concurrently with model calls should set `enabled=False`.
    """

    enabled: bool = True
    """Capture a CUDA graph for every size that has a tier-2 runnable."""
    memory_budget_bytes: int = 2 << 30
    """Stop capturing once the model's graphs hold this much pool memory."""
    pad: bool = False
    """Serve a size with the next larger captured graph, padding the inputs. Off by
    default: the model then sees a batch with extra rows (they are sliced off)."""
    warmup_iters: int = 3
    """Runs of the size's runnable before its capture: all but one on the engine's
    thread beforehand (`warm_up`), the last in the serving call that captures."""

    def check(self) -> None:
        """Raise ValueError naming the first bad value (at attach time)."""
        if self.memory_budget_bytes < 0:
            raise ValueError(f"memory_budget_bytes must be >= 0, got {self.memory_budget_bytes}")
        if self.warmup_iters < 1:
            raise ValueError(f"warmup_iters must be >= 1, got {self.warmup_iters}")


class NothingToCapture(RuntimeError):
    """The runnable does no CUDA work a graph could replay (its outputs are not on a
    GPU): capturing would give an empty graph whose replays return stale outputs."""


class GraphPool:
    """One CUDA memory pool for a model's graphs, the lock that serialises their use,
    and the pool memory they hold (for the budget)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.handle = torch.cuda.graph_pool_handle()
        self.lock = threading.Lock()
        self.bytes = 0
        self.graphs = 0
        # The stream of the last replay of any of the pool's graphs (under `lock`).
        self.last_stream: torch.cuda.Stream | None = None

    def order_replay(self) -> None:
        """Called with `lock` held before a replay: after the pool's last replay, on
        whichever stream that was."""
        stream = torch.cuda.current_stream(self.device)
        last = self.last_stream
        if last is not None and last != stream:
            stream.wait_stream(last)
        self.last_stream = stream


def _static_copy(t: torch.Tensor) -> torch.Tensor:
    """A graph's input slot: a normal tensor even when `t` is an inference tensor.

    Servers call models under `torch.inference_mode()`, so recorded inputs are inference
    tensors, and torch refuses an in-place write to one outside inference mode ("Inplace
    update to inference tensor outside InferenceMode"): validation replays on the
    engine's thread, outside it. A normal tensor may be written in either mode.
    """
    with torch.inference_mode(False):
        slot = torch.empty_like(t)
        slot.copy_(t)
    return slot


def _has_cuda_tensor(out: Any) -> bool:
    if isinstance(out, torch.Tensor):
        return out.is_cuda
    if isinstance(out, tuple | list):
        return any(_has_cuda_tensor(o) for o in out)
    return False


class CudaGraphRunnable:
    """Replays one captured CUDA graph for one size (or, padded, for sizes up to it)."""

    def __init__(
        self,
        graph: torch.cuda.CUDAGraph,
        size: int,
        size_index: int,
        static_args: list[Any],
        copy_indices: Sequence[int],
        static_out: Any,
        fallback: Runnable,
        pool: GraphPool,
    ) -> None:
        self.graph = graph
        self.size = size
        self.size_index = size_index
        self.static_args = static_args
        self.copy_indices = tuple(copy_indices)
        self.static_out = static_out
        self.fallback = fallback
        self.pool = pool
        self.replays = 0
        self.fallbacks = 0
        self.nbytes = 0  # pool memory this graph took at capture (for the budget)
        self._busy = pool.lock

    def instantiate(self) -> None:
        """Instantiate a graph captured with `instantiate=False` (once, before its first
        replay; a replay would do it, on the serving thread that makes it)."""
        with torch.cuda.device(self.pool.device):
            self.graph.instantiate()

    def __call__(self, *args: Any) -> Any:
        if not self._busy.acquire(blocking=False):
            self.fallbacks += 1
            return self.fallback(*args)
        return self._replay(args)

    def replay_exclusive(self, *args: Any) -> Any:
        """Replay the graph itself, waiting for the pool if a sibling is replaying (for
        validation: the caller must compare the graph, never its fallback)."""
        self._busy.acquire()
        return self._replay(args)

    def _replay(self, args: tuple[Any, ...]) -> Any:
        # Called with the pool lock held; releases it.
        try:
            self.pool.order_replay()
            n = args[self.size_index]
            static = self.static_args
            if n == self.size:
                for i in self.copy_indices:
                    static[i].copy_(args[i])
            else:  # padded: the first n rows are the call's, the rest are left over
                for i in self.copy_indices:
                    static[i][:n].copy_(args[i])
            self.graph.replay()
            self.replays += 1
            return _copy_out(self.static_out, n, self.size)
        finally:
            self._busy.release()


def _copy_out(out: Any, n: int, size: int) -> Any:
    if isinstance(out, torch.Tensor):
        if n != size and out.dim() > 0 and out.shape[0] == size:
            return out[:n].clone()
        return out.clone()
    if isinstance(out, tuple | list):
        return type(out)(_copy_out(o, n, size) for o in out)
    return out


@contextmanager
def _capturing(
    graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream, pool: Any = None
) -> Iterator[None]:
    """Capture the block's CUDA work on `stream` into `graph`, in thread-local mode.

    Not `torch.cuda.graph`: on entry it synchronizes the whole device and empties the
    caching allocator (and the pinned-host cache), to give the graph all the memory it
    can. Here a capture runs inside a serving call while the process goes on serving:
    the device-wide sync waits for every stream's work (other threads', other models'),
    and the emptied cache hands back the blocks every other size's calls were reusing,
    so the calls after a capture allocate from the driver again (cudaMalloc, which
    synchronizes the device). The stream context and the begin/end pair are all the
    capture itself needs; the caller has made `stream` wait for the current one.

    cuBLAS's workspaces are cleared before and after, as cudagraph trees do. cuBLAS keeps
    one workspace per (handle, stream), allocated on first use and held only by torch's
    map of them: a graph captured on a stream whose workspace the warm-up allocated
    replays into memory that map alone keeps. cudagraph trees (torch.compile's
    `mode="reduce-overhead"`) clear that map before and after every recording, the
    allocator hands the memory to other tensors, and the graph's matmuls write into them
    (on an H200: "unspecified launch failure", a device-side assert in an embedding
    whose indices were overwritten). Cleared before, the workspace the capture needs is
    allocated during the capture, from the graph's own pool, which outlives the graph;
    cleared after, the map lets go of that pool memory, so no later call outside a
    capture writes into it. Other threads' workspaces go too and come back from the
    allocator's cache on their next matmul; torch guards the map with a mutex, and a
    thread between fetching its workspace and launching its matmul is the one window
    left, the same that trees leave.
    """
    with torch.cuda.stream(stream):
        torch._C._cuda_clearCublasWorkspaces()
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            yield
        finally:
            # As torch.cuda.graph's __exit__: end the capture even when the block raised,
            # so the stream leaves capture mode (capture_end then raises on its own
            # account for a capture that CUDA invalidated).
            try:
                graph.capture_end()
            finally:
                torch._C._cuda_clearCublasWorkspaces()


def _clear_broken_capture(device: torch.device) -> None:
    """After a capture that failed midway: leave the CUDA generator usable again.

    torch marks the default CUDA generator as capturing when a capture begins and unmarks
    it when the capture ends well; a capture that fails midway leaves it marked, and
    every later CUDA random op in the process then raises "Offset increment outside
    graph capture encountered unexpectedly" (seen on an H200, torch 2.11). One tiny
    capture that ends well runs that begin/end pair again and clears the mark.
    """
    try:
        scratch = torch.zeros(1, device=device)
        side = torch.cuda.Stream(device=device)
        side.wait_stream(torch.cuda.current_stream(device))
        with _capturing(torch.cuda.CUDAGraph(), side):
            scratch.add_(1)
        side.synchronize()
    except Exception as exc:  # the original failure is what the caller reports
        log.warning("pwdaemon: could not clear a failed CUDA graph capture: %s", exc)


def warm_up(
    runnable: Runnable,
    sample: Sequence[Any],
    copy_indices: Sequence[int],
    iters: int,
    written: Sequence[Any] = (),
) -> None:
    """Run `runnable` `iters` times on `sample`'s copies, on a side stream of its own, and
    wait for the GPU: a capture's warm-up, done before the capture is handed to a serving
    call (on the engine's thread) so that the call pays one warm-up run and the capture
    instead of all of them. The side stream waits for the `written` events first (the
    sample's copies, made on a serving thread's stream).

    Measured on an H200 (torch 2.11, issue-sized Llama, fp16): three warm-up runs took
    14-15 ms of the ~21 ms a capture held its serving call, the capture itself 6 ms
    (`cudaStreamBeginCapture` to the instantiated graph); the call it paused took 35 ms
    against a 1 ms replay. Lazy work a first run does (loading a kernel's module, sizing
    workspaces, Triton's per-shape launch set-up) is the process's, not the thread's; the
    run the capture makes on its own thread and stream just before capturing stays.
    """
    _side_stream_runs(runnable, sample, copy_indices, iters, written)


def _side_stream_runs(
    runnable: Runnable,
    sample: Sequence[Any],
    copy_indices: Sequence[int],
    iters: int,
    written: Sequence[Any] = (),
) -> tuple[list[Any], torch.cuda.Stream]:
    """Static copies of `sample`'s inputs, a side stream that waits for the current one,
    and `iters` runs of `runnable` on them there, finished on the GPU. The copies are
    made on the current stream, after the `written` events: a graph's input slots are
    freed (an evicted graph) while serving streams may still read them, and a block goes
    back to the stream that allocated it."""
    device = next(a.device for a in sample if isinstance(a, torch.Tensor))
    wait_for_events(sample, written)
    args = list(sample)
    for i in copy_indices:
        args[i] = _static_copy(sample[i])
    stream = torch.cuda.Stream(device=device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.no_grad():
        for _ in range(iters):
            runnable(*args)
    stream.synchronize()
    return args, stream


def capture(
    runnable: Runnable,
    sample: Sequence[Any],
    size: int,
    size_index: int,
    copy_indices: Sequence[int],
    pool: GraphPool,
    warmup_iters: int = 3,
    instantiate: bool = True,
) -> CudaGraphRunnable:
    """Capture `runnable` on `sample` (whose size must be `size`) into a CUDA graph.

    `copy_indices`: the arguments that change per call (inputs); the others (weights,
    buffers, the size int) are used in place. Runs on the calling thread, on a side
    stream, in thread-local capture mode. `instantiate=False` keeps the captured graph
    uninstantiated (`CudaGraphRunnable.instantiate`): `cudaGraphInstantiate` is the one
    step of a capture that touches no CUDA RNG state, so it need not pause the serving
    call that captures (the engine runs it on its own thread).
    """
    if sample[size_index] != size:
        raise ValueError(f"sample has size {sample[size_index]}, expected {size}")
    device = next(a.device for a in sample if isinstance(a, torch.Tensor))
    before = torch.cuda.memory_reserved(device)
    static_args, stream = _side_stream_runs(runnable, sample, copy_indices, warmup_iters)
    graph = torch.cuda.CUDAGraph(keep_graph=not instantiate)
    with pool.lock:  # no replay of a sibling graph while this one takes pool memory
        try:
            with torch.no_grad(), _capturing(graph, stream, pool.handle):
                static_out = runnable(*static_args)
        except BaseException:
            _clear_broken_capture(device)
            raise
        stream.synchronize()
    if not _has_cuda_tensor(static_out):
        raise NothingToCapture("the piece's outputs are not on a GPU: nothing to replay")
    replayer = CudaGraphRunnable(
        graph, size, size_index, static_args, copy_indices, static_out, runnable, pool
    )
    replayer.nbytes = max(0, torch.cuda.memory_reserved(device) - before)
    pool.bytes += replayer.nbytes
    pool.graphs += 1
    return replayer
