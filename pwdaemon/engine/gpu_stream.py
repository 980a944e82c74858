"""The engine's validation runs on a CUDA stream of its own.

A CUDA stream runs its kernels in the order they were queued, whichever thread queued
them. Validation (a candidate's run, the run of the runnable it would replace, the
comparison) used to run on the engine thread's current stream, the device's default
stream, which is also the stream a server calls its model on unless it chose another.
The gate parks the engine's thread while a serving call runs, but the GPU work it had
queued before parking stays queued: the serving call's kernels queued behind it, and a
call that ends by reading its output (`.cpu()`, `.item()`: a wait for its stream) waited
for the validation's work as well. On a stream of its own that work runs beside serving
instead of ahead of it.

What that takes, since the caching allocator and the streams' order no longer make the
engine's reads safe by themselves:

- Inputs written on another stream: the engine's stream waits for the engine thread's
  current stream (work the engine queued there, such as a tiled input, and every sample
  copied on the default stream) and for the event recorded after the copies of the
  sample it reads (`Dispatcher.sample_events`), whichever stream the server copied it
  on. These waits are on the GPU: nothing blocks a thread.
- Memory: everything the validation allocates is allocated on the engine's stream and
  freed within it, and `engine_stream` waits for the stream before it returns, so no
  block the engine used goes back to the allocator with the engine's work on it still
  queued. Samples are kept by their dispatcher while they are read.
- A CUDA graph replayed here and by a serving call shares its static buffers and its
  pool's memory: `CudaGraphRunnable` orders replays made on different streams.

Loads, tiling and a capture's warm-up stay where they were: what they leave behind
(a runnable's tensors) outlives the work, and freed later, while a serving stream still
reads it, its memory would go back to the engine's stream.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from pwdaemon.serving.inputs import cuda_device

_lock = threading.Lock()
_streams: dict[torch.device, torch.cuda.Stream] = {}


def stream_for(device: torch.device) -> torch.cuda.Stream:
    """The engine's stream on `device` (one per device for the process)."""
    with _lock:
        stream = _streams.get(device)
        if stream is None:
            stream = _streams[device] = torch.cuda.Stream(device=device)
        return stream


@contextmanager
def engine_stream(args: Sequence[Any], written: Sequence[Any] = ()) -> Iterator[None]:
    """Run the block's CUDA work on the engine's stream of the device `args` are on
    (nothing changes when none of them is on a GPU), after the engine thread's queued
    work and the `written` events; wait for it at the end, raised or not."""
    device = cuda_device(args)
    if device is None:
        yield
        return
    stream = stream_for(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    for event in written:
        stream.wait_event(event)
    try:
        with torch.cuda.stream(stream):
            yield
    finally:
        stream.synchronize()
