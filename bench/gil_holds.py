"""The longest stretches pwdaemon's one-time background steps keep the GIL.

The serving gate (`pwdaemon.serving.gate`) parks a background thread at its next Python
call or return while a serving call runs, and lowers the switch interval so that the
serving thread gets the GIL back within half a millisecond of Python. What it cannot
park is a single C call that keeps the GIL: a garbage collection (it walks every object
created since the heap was last frozen), a `dlopen` of a large extension, a C++ routine
that never calls back into Python. A serving call that arrives meanwhile waits for all
of it.

This builds the model (the server's, before `attach()`), freezes the heap as `attach()`
does, then runs each one-time step of a serving process in turn on the main thread, in
the order pwdaemon meets them, gated as pwdaemon runs them (`GATE.background()`). A
ticker thread asks for the GIL every 0.2 ms and makes a serving call (`GATE.call()`)
every ~10 ms, as paced traffic; the gap between two ticks is how long it waited. Per
step: its wall time, the longest wait, how many waits exceeded 10 ms, and the longest
collection. `--ungated` runs the steps bare (no freeze, no gate, no calls). The trace
times its guard check without torch's cache flush, as pwdaemon's traces do
(`pwdaemon.serving.guard_latency`); `--flushed` traces as torch does.

    python bench/gil_holds.py [--device cuda] [--model bert] [--ungated] [--flushed]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import threading
import time
from collections.abc import Callable

from torch import nn

from pwdaemon.real_models import Inputs
from pwdaemon.serving.gate import GATE, GATED_SWITCH_INTERVAL_S
from pwdaemon.serving.heap import HEAP

TICK_S = 0.0002
LONG_S = 0.010
CALL_EVERY = 50  # a serving call every ~10 ms of ticks (bench/models.py's pacing)


class Ticker:
    """Wakes every TICK_S; records the gaps between wake-ups (GIL waits, mostly).

    With `traffic`, every CALL_EVERY-th tick is a serving call (`GATE.call()`), as a
    server's paced requests: the gated step parks during it, and the gate keeps its
    traffic settings (hook, lowered interval, deferred full collections) meanwhile."""

    def __init__(self, traffic: bool) -> None:
        self.traffic = traffic
        self.gaps: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="ticker")

    def _run(self) -> None:
        last = time.perf_counter()
        ticks = 0
        while not self._stop.wait(TICK_S):
            now = time.perf_counter()
            self.gaps.append(now - last)
            last = now
            ticks += 1
            if self.traffic and ticks % CALL_EVERY == 0 and GATE.working:
                with GATE.call():
                    pass

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _steps(
    device: str, model: str, flushed: bool
) -> tuple[Callable[[], object], list[tuple[str, Callable[[], object]]]]:
    """The model's build (before attach) and the steps pwdaemon then takes, in order."""

    def inductor() -> object:
        import torch._inductor.compile_fx
        import torch._inductor.standalone_compile

        return torch._inductor.standalone_compile

    def torch_key() -> object:
        from pwdaemon.workers import setup_record

        setup_record.install()
        return setup_record.torch_key()

    def vec_isa() -> object:
        from torch._inductor import cpu_vec_isa

        return cpu_vec_isa.pick_vec_isa()

    def triton() -> object:
        import triton._C.libtriton as lib  # triton itself first, then its C++ library

        return lib

    built: list[tuple[nn.Module, Inputs]] = []

    def build() -> object:
        import torch

        from pwdaemon.real_models import model_spec

        dev, dtype = torch.device(device), torch.float16 if device == "cuda" else torch.float32
        spec = model_spec(model, "issue")
        built.append((spec.build(dev, dtype), spec.inputs(4, dev, dtype)))
        return built

    def trace() -> object:
        import torch

        from pwdaemon.serving import guard_latency

        module, (args, kwargs) = built[0]
        compiled = torch.compile(module, backend="eager", dynamic=True)
        # As pwdaemon's tracing calls run it: the guard check timed without torch's
        # cache flush (`--flushed`: as torch runs it).
        unflushed = contextlib.nullcontext() if flushed else guard_latency.unflushed()
        with torch.inference_mode(), unflushed:
            return compiled(*args, **kwargs)

    # Dynamo itself is imported with pwdaemon, on the importing thread, before attach().
    steps = [("import inductor", inductor)]
    if device == "cuda":
        steps.append(("import triton", triton))
    steps += [("torch source key", torch_key), ("vector-ISA probe", vec_isa)]
    steps.append((f"dynamo trace ({model}, eager backend)", trace))
    return build, steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="bert")
    parser.add_argument("--ungated", action="store_true", help="steps without the gate")
    parser.add_argument(
        "--flushed",
        action="store_true",
        help="trace with torch's guard profiling (a CPU-cache flush holding the GIL)",
    )
    args = parser.parse_args()
    import torch

    if args.device == "cuda":
        torch.zeros(1, device="cuda")  # CUDA's context is the serving thread's, not a step
    sys.setswitchinterval(GATED_SWITCH_INTERVAL_S)  # as while gated work runs
    collections: list[float] = []
    started = [0.0]

    def timed(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            collections.append(time.perf_counter() - started[0])

    gc.callbacks.append(timed)
    build, steps = _steps(args.device, args.model, args.flushed)
    build()  # the server's model, built before attach()
    if not args.ungated:
        HEAP.hold()  # as attach() does: what is alive now is out of collections' walks
    mode = "bare" if args.ungated else "gated"
    print(f"torch {torch.__version__}, {args.device}, {mode}")
    print("| step | wall s | longest GIL wait ms | waits over 10 ms | longest collection ms |")
    print("|---|---|---|---|---|")
    for name, step in steps:
        collections.clear()
        gate = contextlib.nullcontext() if args.ungated else GATE.background()
        with gate, Ticker(traffic=not args.ungated) as ticker:
            start = time.perf_counter()
            try:
                step()
            except Exception as exc:  # a step a machine lacks (no compiler, no triton)
                print(f"| {name} | failed: {type(exc).__name__}: {exc} | | | |")
                continue
            wall = time.perf_counter() - start
        if not args.ungated:
            HEAP.refreeze()  # as pwdaemon does after its set-up and after a trace
        gaps = ticker.gaps or [0.0]
        long = sum(1 for g in gaps if g > LONG_S)
        gc_ms = max(collections, default=0.0) * 1e3
        print(f"| {name} | {wall:.2f} | {max(gaps) * 1e3:.1f} | {long} | {gc_ms:.1f} |")


if __name__ == "__main__":
    main()
