"""One serving system of `bench/peers.py`, run in a fresh process: serve the trace, print JSON.

    python bench/_systems.py --spec SPEC.json --result RESULT.json

`peers.py` writes SPEC.json (system, model, device, dtype, the trace, what to measure)
and starts one process per system, with the environment that system needs (its own
Inductor cache directory; `TORCHINDUCTOR_FX_COMPILE_MODE` for the async peer). This
process:

1. imports torch, builds the model and one input per size (not timed);
2. `t0`: the serving code starts. Set-up (compiling every size for `upfront`, `attach`
   for pwdaemon) counts from here, so time to first response includes it;
3. replays the trace at its scheduled arrival times, timing every call (latency = the
   call itself, synchronized on CUDA; a call that starts late is not charged the delay)
   and, in idle gaps every `probe_every_s`, a *probe window*: back-to-back calls of one
   fixed, already-seen size for `probe_window_s`, with the CPU the process's descendants
   (compile workers) burnt meanwhile;
4. settles (pwdaemon: until nothing is queued or compiling; async: until its compile
   subprocesses go idle), then measures steady-state throughput of the hot sizes, idle
   probe windows, and a steady-state latency per distinct size (the baseline);
5. writes everything as JSON to RESULT.json and prints it as the last stdout line.

CPU seconds spent compiling (`compile_cpu`): the process's own CPU time during calls in
which dynamo compiled a frame (for `upfront`: the whole set-up), plus the CPU time of
every descendant process (Inductor's compile workers, the async subprocesses, pwdaemon's
workers, the C++ compiler they run): read from /proc while they live and from
`getrusage(RUSAGE_CHILDREN)` once reaped (`_system_kinds.py`, with the systems themselves).
psutil is not needed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _system_kinds import (
    Context,
    PwdaemonSystem,
    System,
    compiled_runs,
    descendant_cpu,
    eager_runs,
    make_system,
)


def ab_against_static(
    system: System,
    reference: Any,
    inputs: dict[int, Any],
    hot: list[int],
    sync: Callable[[], None],
    pairs: int = 25,
    round_s: float = 0.1,
) -> dict[str, Any]:
    """pwdaemon against torch.compile(dynamic=False) of the same weights, in this process.

    Rounds of the two alternate (and alternate which goes first), so load from other
    processes hits both alike; the ratio is the median over pairs of adjacent rounds of
    static's seconds per call / ours (our throughput relative to static's). Run after
    every other measurement: the static compiles happen here, in this process.
    """
    import torch
    import torch._dynamo.config as dynamo_config

    for knob in ("recompile_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo_config, knob):
            setattr(dynamo_config, knob, 1 << 20)
    static = torch.compile(copy.deepcopy(reference), dynamic=False)
    out: dict[str, Any] = {}
    for size in hot:
        x = inputs[size]
        t = time.perf_counter()
        static(x)  # compiles
        sync()
        compile_s = time.perf_counter() - t
        for _ in range(3):
            static(x)
            system(x)
        sync()
        t = time.perf_counter()
        system(x)
        sync()
        k = max(3, int(round_s / max(time.perf_counter() - t, 1e-6)))
        ours: list[float] = []
        theirs: list[float] = []
        for i in range(pairs):
            order = ((system, ours), (static, theirs))
            for fn, times in order if i % 2 == 0 else order[::-1]:
                t = time.perf_counter()
                for _ in range(k):
                    fn(x)
                sync()
                times.append((time.perf_counter() - t) / k)
        out[str(size)] = {
            "tier": system.tier(size),
            "ours_s": statistics.median(ours),
            "static_s": statistics.median(theirs),
            "ratio": statistics.median(t / o for t, o in zip(theirs, ours, strict=True)),
            "ratio_of_medians": statistics.median(theirs) / statistics.median(ours),
            "static_compile_s": compile_s,
        }
    return out


def _frames() -> int:
    from torch._dynamo.utils import counters

    return int(counters["frames"]["ok"])


def _guard_failures() -> list[str]:
    """Why dynamo compiled a frame again, per recompile (its own record of them)."""
    from torch._dynamo.utils import guard_failures

    return [
        f"{code.co_name}: {reason}"
        for code, reasons in guard_failures.items()
        for reason in reasons
    ]


def run(spec: dict[str, Any], result: dict[str, Any]) -> None:
    t_start = time.perf_counter()
    import torch

    result["import_s"] = time.perf_counter() - t_start
    result["torch"] = torch.__version__
    from pwdaemon.models import DEMO_CONFIG, LARGER_CONFIG, demo_model, example_tokens, larger

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    result["threads"] = torch.get_num_threads()
    device = torch.device(spec["device"])
    dtype = getattr(torch, spec["dtype"])
    cuda = device.type == "cuda"

    def sync() -> None:
        if cuda:  # the call's stream, as bench/models.py waits for it
            torch.cuda.current_stream(device).synchronize()

    builders = {"demo": (demo_model, DEMO_CONFIG), "larger": (larger, LARGER_CONFIG)}
    build, config = builders[spec["model"]]
    model = build(spec["seed"]).to(device=device, dtype=dtype)
    reference = copy.deepcopy(model) if spec.get("check", True) else None
    trace: list[tuple[int, float]] = [(int(s), float(at)) for s, at in spec["trace"]]
    sizes = sorted({s for s, _ in trace})
    hot: list[int] = list(spec["hot_sizes"])
    probe_size = int(spec["probe_size"])
    gen = torch.Generator().manual_seed(spec["seed"])
    inputs = {
        s: example_tokens(s, config, generator=gen).to(device)
        for s in sorted(set(sizes) | set(hot) | {probe_size})
    }
    sync()
    ctx = Context({**spec, "trace_sizes": sizes}, sync)
    system = make_system(spec["system"], model, ctx)
    system.prepare_inputs(inputs)
    result["build_s"] = time.perf_counter() - t_start - result["import_s"]

    requests: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    compile_self_cpu = 0.0
    seen: dict[int, int] = {}

    def probe(phase: str) -> None:
        x = inputs[probe_size]
        before = system.tier(probe_size)
        frames0, eager0 = _frames(), eager_runs()
        cpu0 = descendant_cpu()
        window = float(spec["probe_window_s"])
        n = 0
        t = time.perf_counter()
        while n < 3 or time.perf_counter() - t < window:
            system(x)
            sync()
            n += 1
        dt = time.perf_counter() - t
        probes.append(
            {
                "at": ctx.now(),
                "phase": phase,
                "calls_per_s": n / dt,
                "tier": system.label(before, _frames() > frames0, eager_runs() - eager0),
                "busy": (descendant_cpu() - cpu0) / dt,
            }
        )

    with torch.no_grad():
        ctx.t0 = time.perf_counter()
        # ---- set-up and trace replay (time to first response counts from t0) ----------
        system.setup(inputs)
        result["setup_s"] = ctx.now()
        trace_start = time.perf_counter()
        probe_every = float(spec["probe_every_s"])
        next_probe = trace_start + probe_every
        for index, (size, at) in enumerate(trace):
            target = trace_start + at
            while True:
                now = time.perf_counter()
                if probe_every > 0 and now >= next_probe and seen.get(probe_size):
                    probe("trace")
                    next_probe = time.perf_counter() + probe_every
                    continue
                if now >= target:
                    break
                time.sleep(max(0.0, min(target, next_probe) - now))
            x = inputs[size]
            before = system.tier(size)
            frames0, eager0 = _frames(), eager_runs()
            cpu0 = time.process_time()
            t = time.perf_counter()
            system(x)
            sync()
            dt = time.perf_counter() - t
            cpu = time.process_time() - cpu0
            label = system.label(before, _frames() > frames0, eager_runs() - eager0)
            if label in ("compile", "trace"):
                compile_self_cpu += cpu
            requests.append(
                {
                    "i": index,
                    "size": size,
                    "at": t - ctx.t0,
                    "lat": dt,
                    "late": max(0.0, t - target),
                    "tier": label,
                }
            )
            seen[size] = seen.get(size, 0) + 1
            if index == 0:
                result["ttfr_s"] = ctx.now()
        result["trace_wall_s"] = time.perf_counter() - trace_start

        # ---- settle -------------------------------------------------------------------
        result["settle"] = system.settle(float(spec["settle_timeout_s"]))
        if spec["system"] == "async":
            for size in sizes:  # switch every size's graph over to its finished compile
                system(inputs[size])
            sync()
        result["compile_cpu_settled"] = {
            "self_s": compile_self_cpu + system.setup_self_cpu,
            "descendants_s": descendant_cpu(),
        }

        # ---- steady state: throughput of the hot sizes --------------------------------
        # Rounds of the system alternate with rounds of an eager copy of the model in this
        # process, so a ratio between runs can be corrected for load that differed
        # between their processes (other users of the machine).
        eager_copy = reference if reference is not None else copy.deepcopy(model)
        throughput: dict[str, Any] = {}
        for size in hot:
            x = inputs[size]
            for _ in range(2):
                system(x)
                eager_copy(x)
            sync()
            t = time.perf_counter()
            system(x)
            sync()
            one = max(time.perf_counter() - t, 1e-6)
            k = max(3, int(float(spec["throughput_round_s"]) / one))
            rounds: list[float] = []
            eager_rounds: list[float] = []
            tier = system.tier(size)
            for _ in range(int(spec["throughput_rounds"])):
                for fn, out in ((system, rounds), (eager_copy, eager_rounds)):
                    t = time.perf_counter()
                    for _ in range(k):
                        fn(x)
                    sync()
                    out.append(k / (time.perf_counter() - t))
            throughput[str(size)] = {
                "calls_per_s": statistics.median(rounds),
                "eager_calls_per_s": statistics.median(eager_rounds),
                "rounds": rounds,
                "eager_rounds": eager_rounds,
                "calls_per_round": k,
                "tier": tier,
            }
        result["throughput"] = throughput

        # ---- idle probe windows -------------------------------------------------------
        for _ in range(int(spec["idle_probes"])):
            probe("idle")

        # ---- steady-state latency per distinct size (baseline) ------------------------
        baseline: dict[str, float] = {}
        baseline_tier: dict[str, str] = {}
        hot_calls = int(spec.get("pwdaemon", {}).get("hot_calls") or 3)
        for size in sorted(sizes, key=lambda s: (-seen.get(s, 0), s)):
            calls = int(spec["baseline_calls"])
            if isinstance(system, PwdaemonSystem) and seen.get(size, 0) < hot_calls:
                # Stay under the policy's threshold: a size the trace left cold must not
                # turn hot here (its compile would load the machine, and the size profile
                # saved at detach, which primes the warm run, would no longer be the
                # trace's).
                calls = max(1, min(calls, hot_calls - 1 - seen.get(size, 0)))
            x = inputs[size]
            baseline_tier[str(size)] = system.tier(size)
            times = []
            for _ in range(calls):
                t = time.perf_counter()
                system(x)
                sync()
                times.append(time.perf_counter() - t)
            baseline[str(size)] = statistics.median(times)
        result["baseline"] = baseline
        result["baseline_tier"] = baseline_tier

        # ---- correctness: the hot sizes and the largest against eager -----------------
        if reference is not None:
            check: dict[str, float] = {}
            for size in sorted(set(hot) | {max(sizes)}):
                got = system(inputs[size]).float()
                want = reference(inputs[size]).float()
                check[str(size)] = float((got - want).abs().max())
            result["check_max_abs"] = check

        result["dynamo_frames"] = _frames()
        result["guard_failures"] = _guard_failures()
        if spec.get("ab_static") and isinstance(system, PwdaemonSystem) and reference is not None:
            result["ab_static"] = ab_against_static(system, reference, inputs, hot, sync)

    result["async_eager_runs"] = eager_runs()
    result["async_compiled_runs"] = compiled_runs()
    extra = system.close()
    with contextlib.suppress(Exception):
        import torch._inductor.async_compile as async_compile

        async_compile.shutdown_compile_workers()
    result.update(extra)
    result["compile_cpu_end"] = {
        "self_s": compile_self_cpu + system.setup_self_cpu,
        "descendants_s": descendant_cpu(),
    }
    result["notes"] = system.notes
    result["requests"] = requests
    result["probes"] = probes
    result["total_s"] = time.perf_counter() - ctx.t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--spec", required=True, help="the run spec (JSON) peers.py wrote")
    parser.add_argument("--result", required=True, help="where to write the result (JSON)")
    args = parser.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text())
    result: dict[str, Any] = {
        "system": spec["system"],
        "model": spec["model"],
        "device": spec["device"],
        "dtype": spec["dtype"],
        "error": None,
    }
    try:
        run(spec, result)
    except BaseException as exc:  # reported in the table; the run goes on
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc(limit=20)
    text = json.dumps(result)
    Path(args.result).write_text(text)
    sys.stdout.write(text + "\n")
    sys.stdout.flush()
    return 0 if result["error"] is None else 1


if __name__ == "__main__":
    raise SystemExit(main())
