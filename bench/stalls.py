"""What the process was doing during each slow call of a warm-up.

Attaches a model with a fresh store, calls its sizes round-robin (10 ms apart, as
bench/models.py's warm-up does) for `--seconds`, and arms a stall dump
(`faulthandler.dump_traceback_later`) around every call: a call slower than
`--stall-ms` leaves every thread's stack at that moment. The report lists, per slow
call, the threads that were running Python (not parked in a wait) with their top frame
and the first pwdaemon frame below it. This attributed the slow warm-up calls of
2026-12-01 (full collections, the ISA probe's and the first load's g++, imports on
threads that did not park) where timing alone could not.

    python bench/stalls.py [--model bert] [--seconds 80] [--stall-ms 40]
"""

from __future__ import annotations

import argparse
import faulthandler
import re
import tempfile
import time
from pathlib import Path
from typing import Any

# A thread whose top frame is one of these is waiting, not running Python.
_WAITING = (" in wait", " in _wait_for_tstate_lock", " in select", " in get", " in poll")
_SIZES = (1, 4, 16)


def _build(name: str) -> tuple[Any, dict[int, tuple[tuple[Any, ...], dict[str, Any]]]]:
    import torch

    cpu = torch.device("cpu")
    if name == "demo":
        from pwdaemon.models import demo_model, example_tokens

        calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {
            n: ((example_tokens(n),), {}) for n in _SIZES
        }
        return demo_model(), calls
    from pwdaemon.real_models import model_spec

    spec = model_spec(name, "tiny")
    return spec.build(cpu, torch.float32), {n: spec.inputs(n, cpu, torch.float32) for n in _SIZES}


def _report(dump_text: str, slow: list[tuple[int, int, float, float]]) -> None:
    parts = re.split(r"(=== call \d+\n)", dump_text)
    stacks: dict[int, str] = {}
    for header, body in zip(parts[1::2], parts[2::2], strict=True):
        stacks[int(header.split()[2])] = body
    for call, size, ms, at in slow:
        print(f"call {call} (size {size}) at {at:.2f} s: {ms:.1f} ms")
        for block in stacks.get(call, "").split("\n\n"):
            frames = [ln.strip() for ln in block.splitlines() if ln.strip().startswith("File")]
            if not frames or any(w in frames[0] for w in _WAITING):
                continue
            ours = next((f for f in frames if "/pwdaemon/" in f and "gate.py" not in f), "")
            top = frames[0].split("site-packages/")[-1]
            print(f"    {top[:100]}  <-  {ours.split('/pwdaemon/')[-1][:70]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="bert", help="demo, bert, gpt2, llama, ...")
    parser.add_argument("--seconds", type=float, default=80.0)
    parser.add_argument("--stall-ms", type=float, default=40.0)
    opts = parser.parse_args()

    import torch

    import pwdaemon as pwd

    model, calls = _build(opts.model)
    handle = pwd.attach(model, sizes=list(_SIZES), store=tempfile.mkdtemp())
    dump_path = Path(tempfile.mkdtemp()) / "stalls.txt"
    slow: list[tuple[int, int, float, float]] = []
    t0 = time.perf_counter()
    with dump_path.open("w") as dump, torch.inference_mode():
        i = 0
        while time.perf_counter() - t0 < opts.seconds:
            n = _SIZES[i % len(_SIZES)]
            args, kwargs = calls[n]
            dump.write(f"=== call {i}\n")
            dump.flush()
            faulthandler.dump_traceback_later(opts.stall_ms / 1e3, file=dump)
            start = time.perf_counter()
            model(*args, **kwargs)
            took = time.perf_counter() - start
            faulthandler.cancel_dump_traceback_later()
            if took * 1e3 > opts.stall_ms:
                slow.append((i, n, took * 1e3, start - t0))
            i += 1
            time.sleep(0.01)  # traffic pacing, as bench/models.py's warm-up
    handle.detach()
    print(f"{i} calls in {opts.seconds:.0f} s, {len(slow)} over {opts.stall_ms:.0f} ms")
    _report(dump_path.read_text(), slow)


if __name__ == "__main__":
    main()
