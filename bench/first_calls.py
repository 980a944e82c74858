"""What a size's first call costs the plain model, and whether another thread pays it again.

A warm start's slowest calls on a GPU were each tier's first call of a size: on an H200
(2026-12-05, BERT issue preset, fp16) 60-80 ms of the serving thread's own CPU inside
scaled_dot_product_attention, with the GIL released. PyTorch keeps cuDNN's attention
plans in a thread_local cache, so a plan built on one thread does not serve another.
This bench times, with no pwdaemon at all, on one fresh process per row:

- each size's first, second and median call on the main thread (`--calls` rounds, the
  sizes in turn, 10 ms apart as the warm-up benches pace them);
- then each size's first call on a new thread, and its second there.

`--no-cudnn-sdp` turns cuDNN attention off (`torch.backends.cuda.enable_cudnn_sdp`): the
rows with and without it say how much of a size's first call, and of another thread's,
is cuDNN's plan building.

    python bench/first_calls.py --device cuda --dtype fp16 --preset issue --model bert
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import threading
import time

from models import DTYPES, PACE_S, _build, _timer

SIZES = (1, 4, 16)


def child(opts: argparse.Namespace) -> None:
    import torch

    if opts.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    device = torch.device(opts.device)
    timed = _timer(device)  # seconds, the device synchronized around the call
    model, inputs = _build(opts.model, opts.preset, device, getattr(torch, DTYPES[opts.dtype]))
    calls = {n: inputs(n) for n in SIZES}

    def call_ms(n: int) -> float:
        args, kwargs = calls[n]
        return timed(lambda: model(*args, **kwargs)) * 1e3

    times: dict[int, list[float]] = {n: [] for n in SIZES}
    with torch.inference_mode():
        for _ in range(opts.calls):
            for n in SIZES:
                times[n].append(call_ms(n))
                time.sleep(PACE_S)
    other: dict[int, tuple[float, float]] = {}

    def on_new_thread() -> None:
        with torch.inference_mode():
            for n in SIZES:
                other[n] = (call_ms(n), call_ms(n))

    thread = threading.Thread(target=on_new_thread)
    thread.start()
    thread.join()
    label = "off" if opts.no_cudnn_sdp else "on"
    for n in SIZES:
        median = statistics.median(times[n][1:])
        first, second = times[n][0], times[n][1]
        new_first, new_second = other[n]
        print(
            f"| {opts.model} | {label} | {n} | {first:.1f} | {second:.1f} | {median:.2f} |"
            f" {new_first:.1f} | {new_second:.1f} | {new_first / median:.1f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--preset", default="tiny", choices=("tiny", "issue"))
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--no-cudnn-sdp", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.child:
        child(opts)
        return
    print(
        "| model | cuDNN attention | size | first ms | second ms | median ms"
        " | new thread: first ms | its second ms | its first ÷ median |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for cudnn_off in (False, True):
        args = [sys.executable, __file__, "--child", "--model", opts.model]
        args += ["--device", opts.device, "--dtype", opts.dtype, "--preset", opts.preset]
        args += ["--calls", str(opts.calls)] + (["--no-cudnn-sdp"] if cudnn_off else [])
        subprocess.run(args, check=True)


if __name__ == "__main__":
    main()
