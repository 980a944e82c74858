"""What a CUDA-graph capture costs the calls around it, torch.cuda.graph against pwdaemon's.

pwdaemon captures a size's graph inside a serving call. `torch.cuda.graph` (the context
manager torch documents) synchronizes the whole device and empties the caching allocator
on entry; pwdaemon's capture (`pwdaemon.serving.cudagraph._capturing`) calls the graph's
`capture_begin`/`capture_end` on a side stream and leaves the allocator's cache alone.
This script measures both in one process, arms alternating round by round:

- the capture itself (warm-up iterations, capture, first sync), per size;
- the first call of every *other* size right after a capture, divided by that size's
  median call (measured before the round): what an emptied cache costs serving;
- the allocator segments (cudaMalloc calls) those calls made.

The runnable is the model's eager forward (the allocator effect does not depend on what
is captured; eager needs no compile). GPU only.

    python bench/capture_cost.py [--models bert,llama] [--sizes 1,4,16,64] [--rounds 4]
                                 [--preset issue] [--dtype fp16]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from models import DTYPES, _build, _timer  # noqa: E402

ARMS = ("torch.cuda.graph", "pwdaemon")
# Calls per size for the median the after-capture calls are divided by.
MEDIAN_CALLS = 20


@contextlib.contextmanager
def _torch_capturing(graph: Any, stream: Any, pool: Any = None) -> Iterator[None]:
    import torch

    with torch.cuda.graph(graph, pool=pool, stream=stream, capture_error_mode="thread_local"):
        yield


def _flat(inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> tuple[list[Any], list[str], int]:
    args, kwargs = inputs
    keys = list(kwargs)
    return [*args, *(kwargs[k] for k in keys)], keys, len(args)


def _runnable(model: Any, keys: list[str], n_args: int) -> Callable[..., Any]:
    import torch

    def run(_size: int, *tensors: Any) -> Any:
        out = model(*tensors[:n_args], **dict(zip(keys, tensors[n_args:], strict=True)))
        return out if isinstance(out, torch.Tensor) else out[0]

    return run


def measure(name: str, opts: argparse.Namespace) -> dict[str, dict[str, list[float]]]:
    import torch

    from pwdaemon.serving import cudagraph

    device = torch.device("cuda")
    model, inputs = _build(name, opts.preset, device, getattr(torch, DTYPES[opts.dtype]))
    timed = _timer(device)
    samples: dict[int, list[Any]] = {}
    for n in opts.sizes:
        tensors, keys, n_args = _flat(inputs(n))  # the same keys at every size
        samples[n] = [n, *tensors]
    run = _runnable(model, keys, n_args)
    copy_indices = list(range(1, len(samples[opts.sizes[0]])))
    ours = cudagraph._capturing
    out: dict[str, dict[str, list[float]]] = {
        arm: {"capture_ms": [], "after": [], "segments": []} for arm in ARMS
    }
    with torch.inference_mode():
        for n in opts.sizes:  # warm every size's allocations and kernels
            for _ in range(5):
                run(*samples[n])
        for r in range(opts.rounds):
            arms = ARMS if r % 2 == 0 else ARMS[::-1]
            for arm in arms:
                median = {
                    n: statistics.median(
                        timed(lambda n=n: run(*samples[n])) for _ in range(MEDIAN_CALLS)
                    )
                    for n in opts.sizes
                }
                cudagraph._capturing = ours if arm == "pwdaemon" else _torch_capturing
                try:
                    _round(arm, opts.sizes, samples, median, run, copy_indices, out[arm])
                finally:
                    cudagraph._capturing = ours
    return out


def _round(
    arm: str,
    sizes: list[int],
    samples: dict[int, list[Any]],
    median: dict[int, float],
    run: Callable[..., Any],
    copy_indices: list[int],
    out: dict[str, list[float]],
) -> None:
    """Capture every size in a fresh pool; after each, time one call of every other size."""
    import torch

    from pwdaemon.serving import cudagraph

    device = torch.device("cuda")
    timed = _timer(device)
    pool = cudagraph.GraphPool(device)
    graphs: list[Any] = []
    for n in sizes:

        def capture(n: int = n) -> None:
            graphs.append(cudagraph.capture(run, samples[n], n, 0, copy_indices, pool))

        out["capture_ms"].append(timed(capture) * 1e3)
        before = torch.cuda.memory_stats(device)["segment.all.allocated"]
        for m in sizes:
            if m != n:
                out["after"].append(timed(lambda m=m: run(*samples[m])) / median[m])
        after = torch.cuda.memory_stats(device)["segment.all.allocated"]
        out["segments"].append(float(after - before))
    # Each replay equals the eager call it was captured from (fp16: 1e-2).
    for graph, n in zip(graphs, sizes, strict=True):
        torch.testing.assert_close(graph(*samples[n]), run(*samples[n]), atol=1e-2, rtol=1e-2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bert,llama")
    ap.add_argument("--sizes", default="1,4,16,64")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--preset", default="issue", choices=("tiny", "issue"))
    ap.add_argument("--dtype", default="fp16", choices=tuple(DTYPES))
    opts = ap.parse_args()
    opts.sizes = [int(s) for s in opts.sizes.split(",")]
    import torch

    if not torch.cuda.is_available():
        sys.exit("capture_cost: needs a GPU")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, sizes {opts.sizes}")
    print(
        "| model | capture | capture ms (median) | next call of another size ÷ its median:"
        " median / max | cudaMalloc segments after a capture (mean) |"
    )
    print("|---|---|---|---|---|")
    for name in opts.models.split(","):
        res = measure(name, opts)
        for arm in ARMS:
            r = res[arm]
            print(
                f"| {name} | {arm} | {statistics.median(r['capture_ms']):.1f} | "
                f"{statistics.median(r['after']):.2f} / {max(r['after']):.2f} | "
                f"{statistics.mean(r['segments']):.1f} |"
            )


if __name__ == "__main__":
    main()
