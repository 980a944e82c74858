"""Serving calls while pwdaemon validates beside them: validation on the engine's own CUDA
stream (`pwdaemon/engine/gpu_stream.py`, since 5e06bb1) against the stream serving uses
(the device's default stream, as before).

One process, the model on the GPU. The main thread serves sizes 1 / 4 / 16 in turn, 10 ms
apart (bench/models.py's pacing), each call timed to the end of its stream's work, as a
server that reads its output waits. A second thread validates the model against itself
on a recorded size-16 input (`pwdaemon.engine.validation.validate`, what the engine runs
before every swap) back to back, gated as pwdaemon gates it (`GATE.background()`, the
serving calls inside `GATE.call()`): it parks while a call runs, and the GPU work it had
queued stays queued. Rounds of `--seconds` alternate the two modes, after every kernel
either side launches has been loaded (CUDA's lazy loading would otherwise put a whole-
device wait into whichever round comes first). Per mode and size: calls, median, p99 and
worst ms, worst ÷ median; and the validations done per second.

    python bench/validation_streams.py --device cuda --dtype fp16 --preset issue --model bert
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

from models import DTYPES, PACE_S, _build, _fmt, _timer, p99

SIZES = (1, 4, 16)
MODES = ("engine stream", "serving stream")


@contextlib.contextmanager
def _no_stream_of_its_own(args: Sequence[Any], written: Sequence[Any] = ()) -> Iterator[None]:
    yield  # validation on the calling thread's current stream: the default one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="bert")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="fp16", choices=sorted(DTYPES))
    parser.add_argument("--preset", default="issue", choices=("tiny", "issue"))
    parser.add_argument("--seconds", type=float, default=10.0, help="per round")
    parser.add_argument("--rounds", type=int, default=2, help="per mode, alternated")
    opts = parser.parse_args()

    import torch

    from pwdaemon.engine import validation
    from pwdaemon.serving.gate import GATE

    device = torch.device(opts.device)
    if device.type != "cuda":
        print("validation_streams: streams are CUDA's; run with --device cuda", file=sys.stderr)
        return 2
    model, inputs = _build(opts.model, opts.preset, device, getattr(torch, DTYPES[opts.dtype]))
    calls = {n: inputs(n) for n in SIZES}
    # The size-16 call's tensors, keyword ones first, as one flat input (as a graph
    # piece takes them): validation finds its device there.
    args16, kwargs16 = calls[16]
    names = sorted(kwargs16)
    sample_args = [kwargs16[k] for k in names] + list(args16)

    def forward(*tensors: Any) -> Any:
        out = model(*tensors[len(names) :], **dict(zip(names, tensors, strict=False)))
        return out if isinstance(out, torch.Tensor) else out[0]  # a transformers output

    timed = _timer(device)
    real_stream = validation.engine_stream
    modes = {MODES[0]: real_stream, MODES[1]: _no_stream_of_its_own}
    with torch.inference_mode():
        for stream in modes.values():  # every kernel loaded (see the docstring)
            validation.engine_stream = stream
            assert validation.validate(forward, forward, list(sample_args)) is None
        for n in SIZES:
            timed(lambda n=n: model(*calls[n][0], **calls[n][1]))
    times: dict[str, dict[int, list[float]]] = {m: {n: [] for n in SIZES} for m in MODES}
    validations: dict[str, tuple[int, float]] = dict.fromkeys(MODES, (0, 0.0))
    GATE.hold()
    try:
        for _ in range(opts.rounds):
            for mode, stream in modes.items():
                validation.engine_stream = stream
                done = _round(opts.seconds, model, calls, forward, sample_args, times[mode])
                count, seconds = validations[mode]
                validations[mode] = (count + done, seconds + opts.seconds)
    finally:
        GATE.release()
        validation.engine_stream = real_stream
    gpu = torch.cuda.get_device_name(device)
    print(f"{opts.model} ({opts.preset}, {opts.dtype}) on {gpu}, torch {torch.__version__}: "
          f"{opts.rounds} rounds of {opts.seconds:g} s per mode")  # fmt: skip
    print("| validation on | size | calls | median ms | p99 ms | worst ms | worst ÷ median |")
    print("|---|---|---|---|---|---|---|")
    for mode in MODES:
        for n in SIZES:
            ms = times[mode][n]
            median = statistics.median(ms)
            print(f"| {mode} | {n} | {len(ms)} | {median:.2f} | {_fmt(p99(ms))} | "
                  f"{max(ms):.2f} | {max(ms) / median:.1f} |")  # fmt: skip
    for mode in MODES:
        count, seconds = validations[mode]
        print(f"validations beside serving, {mode}: {count / seconds:.1f} per second")
    return 0


def _round(
    seconds: float,
    model: Any,
    calls: dict[int, Any],
    forward: Any,
    sample: Sequence[Any],
    out: dict[int, list[float]],
) -> int:
    """Serve for `seconds` with validations beside; the validations done."""
    import torch

    from pwdaemon.engine import validation
    from pwdaemon.serving.gate import GATE

    # bench/models.py's timer: no wait before the call (what validation queued ahead of
    # it on its stream is what this bench looks for), its stream's end after.
    timed = _timer(torch.device("cuda"))
    stop = threading.Event()
    done = [0]

    def validate_back_to_back() -> None:
        with torch.inference_mode(), GATE.background():
            while not stop.is_set():
                assert validation.validate(forward, forward, list(sample)) is None
                done[0] += 1

    thread = threading.Thread(target=validate_back_to_back, name="validation")
    thread.start()
    end = time.monotonic() + seconds
    try:
        with torch.inference_mode():
            while time.monotonic() < end:
                for n in SIZES:
                    args, kwargs = calls[n]
                    with GATE.call():
                        out[n].append(timed(lambda a=args, k=kwargs: model(*a, **k)) * 1e3)
                    time.sleep(PACE_S)
    finally:
        stop.set()
        thread.join()
    return done[0]


if __name__ == "__main__":
    sys.exit(main())
