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
`getrusage(RUSAGE_CHILDREN)` once reaped. psutil is not needed.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import json
import os
import resource
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

SYSTEMS: dict[str, str] = {
    "eager": "eager PyTorch, no compiler",
    "dynamic": "torch.compile, size dim marked dynamic (mark_dynamic, backed)",
    "static": "torch.compile(dynamic=False), each new size compiled on the request that brings it",
    "async": "torch.compile(dynamic=False) with TORCHINDUCTOR_FX_COMPILE_MODE=async+SUBPROCESS",
    "upfront": "torch.compile(dynamic=False), every size of the trace compiled before serving",
    "pwdaemon-cold": "pwdaemon.attach, fresh artifact store",
    "pwdaemon-warm": "pwdaemon.attach, the store run pwdaemon-cold left",
}
"""Every system, in run order (pwdaemon-warm needs the store pwdaemon-cold leaves)."""

IN_PROCESS_COMPILERS = ("dynamic", "static", "upfront")
"""Systems whose compiles run on the serving thread: nothing is served while they run."""

_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


# ---- CPU accounting --------------------------------------------------------------------


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, CPU seconds of it and its reaped children), from /proc (Linux)."""
    out: dict[int, tuple[int, float]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        rest = raw[raw.rfind(")") + 2 :].split()
        try:
            ppid = int(rest[1])
            ticks = int(rest[11]) + int(rest[12]) + int(rest[13]) + int(rest[14])
        except (IndexError, ValueError):
            continue
        out[int(name)] = (ppid, ticks / _CLK_TCK)
    return out


def descendant_pids() -> list[int]:
    stats = _proc_stats()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    found: list[int] = []
    todo = [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def descendant_cpu() -> float:
    """CPU seconds of every descendant process so far: live ones (/proc) plus reaped."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = usage.ru_utime + usage.ru_stime
    stats = _proc_stats()
    if not stats:
        return total
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    todo = [os.getpid()]
    while todo:
        for child in children.get(todo.pop(), []):
            total += stats[child][1]
            todo.append(child)
    return total


def pid_cpu(pids: list[int]) -> float:
    stats = _proc_stats()
    return sum(stats[p][1] for p in pids if p in stats)


# ---- systems ---------------------------------------------------------------------------


class Context:
    """What a system needs from the runner: the clock, the device sync, the spec."""

    def __init__(self, spec: dict[str, Any], sync: Callable[[], None]) -> None:
        self.spec = spec
        self.sync = sync
        self.t0 = 0.0

    def now(self) -> float:
        return time.perf_counter() - self.t0


class System:
    """Eager: the model itself. Subclasses wrap it."""

    name = "eager"

    def __init__(self, model: Any, ctx: Context) -> None:
        self.model = model
        self.ctx = ctx
        self.fn: Callable[[Any], Any] = model
        self.setup_self_cpu = 0.0
        self.notes: list[str] = []

    def prepare_inputs(self, inputs: dict[int, Any]) -> None:
        """Called before t0 (mark dims dynamic, say)."""

    def setup(self, inputs: dict[int, Any]) -> None:
        """Called after t0: counts towards time to first response."""

    def __call__(self, x: Any) -> Any:
        return self.fn(x)

    def tier(self, size: int) -> str:
        """The tier a call of `size` will run on, asked just before the call."""
        return "eager"

    def label(self, before: str, compiled: bool, eager_runs: int) -> str:
        """The label of a finished call (`compiled`: dynamo compiled a frame in it)."""
        return "compile" if compiled else before

    def settle(self, timeout: float) -> dict[str, Any]:
        return {"seconds": 0.0, "complete": True}

    def close(self) -> dict[str, Any]:
        return {}


class CompiledSystem(System):
    name = "static"

    def __init__(self, model: Any, ctx: Context) -> None:
        super().__init__(model, ctx)
        import torch
        import torch._dynamo.config as dynamo_config

        # One entry per size: lift every recompile limit (names differ across versions).
        for knob in (
            "recompile_limit",
            "cache_size_limit",
            "accumulated_recompile_limit",
            "accumulated_cache_size_limit",
        ):
            if hasattr(dynamo_config, knob):
                setattr(dynamo_config, knob, 1 << 20)
        self.fn = torch.compile(model, dynamic=False)

    def tier(self, size: int) -> str:
        return "compiled"


class DynamicSystem(System):
    name = "dynamic"

    def __init__(self, model: Any, ctx: Context) -> None:
        super().__init__(model, ctx)
        import torch

        self.mark = ctx.spec.get("dynamic_mark", "backed")
        self.fn = torch.compile(model)
        self.notes.append(
            "size dim marked with "
            + (
                "torch._dynamo.mark_dynamic(x, 0) (backed: size 1 is its own graph)"
                if self.mark == "backed"
                else "torch._dynamo.decorators.mark_unbacked(x, 0)"
            )
        )

    def prepare_inputs(self, inputs: dict[int, Any]) -> None:
        import torch

        for x in inputs.values():
            if self.mark == "backed":
                torch._dynamo.mark_dynamic(x, 0)
            else:
                torch._dynamo.decorators.mark_unbacked(x, 0)

    def tier(self, size: int) -> str:
        return "compiled"


class UpfrontSystem(CompiledSystem):
    name = "upfront"

    def setup(self, inputs: dict[int, Any]) -> None:
        import torch

        cpu0 = time.process_time()
        with torch.no_grad():
            for size in sorted(set(self.ctx.spec["trace_sizes"])):
                self.fn(inputs[size])
        self.ctx.sync()
        self.setup_self_cpu = time.process_time() - cpu0


class AsyncSystem(CompiledSystem):
    name = "async"

    def __init__(self, model: Any, ctx: Context) -> None:
        super().__init__(model, ctx)
        mode = os.environ.get("TORCHINDUCTOR_FX_COMPILE_MODE")
        self.notes.append(f"TORCHINDUCTOR_FX_COMPILE_MODE={mode}")
        if os.environ.get("TORCHINDUCTOR_FX_GRAPH_CACHE") == "0":
            self.notes.append(
                "TORCHINDUCTOR_FX_GRAPH_CACHE=0 (async mode fails with the FX graph cache on)"
            )
        import torch._inductor.compile_fx as compile_fx

        if not getattr(compile_fx, "fx_compile_async", False):
            self.notes.append("async FX compile mode NOT active in this torch")

    def label(self, before: str, compiled: bool, eager_runs: int) -> str:
        # torch 2.13's _AsyncFxCompile compiles the graph in-process first (a full
        # Inductor compile, on the request) and serves that output - its "eager" runs -
        # until the subprocess's compile of the same graph arrives.
        if compiled:
            return "compile"
        return "fallback" if eager_runs else "compiled"

    def settle(self, timeout: float) -> dict[str, Any]:
        """Until the compile subprocesses stop burning CPU, then one call per size."""
        start = time.perf_counter()
        last = descendant_cpu()
        quiet = 0
        while time.perf_counter() - start < timeout and quiet < 2:
            time.sleep(1.0)
            cpu = descendant_cpu()
            quiet = quiet + 1 if cpu - last < 0.05 else 0
            last = cpu
        return {"seconds": time.perf_counter() - start, "complete": quiet >= 2}


def eager_runs() -> int:
    mod = sys.modules.get("torch._inductor.compile_fx_async")
    cls = getattr(mod, "_AsyncFxCompile", None)
    return int(getattr(cls, "_stat_eager_runs", 0)) if cls is not None else 0


def compiled_runs() -> int:
    mod = sys.modules.get("torch._inductor.compile_fx_async")
    cls = getattr(mod, "_AsyncFxCompile", None)
    return int(getattr(cls, "_stat_compiled_runs", 0)) if cls is not None else 0


class PwdaemonSystem(System):
    name = "pwdaemon"

    def __init__(self, model: Any, ctx: Context) -> None:
        super().__init__(model, ctx)
        self.handle: Any = None
        self.trace_mode: str | None = ctx.spec.get("pwdaemon", {}).get("trace")
        self.swaps: list[dict[str, Any]] = []
        self.worker_cpu_seen: dict[int, float] = {}

    def setup(self, inputs: dict[int, Any]) -> None:
        import pwdaemon

        opts = self.ctx.spec.get("pwdaemon", {})
        policy_kwargs = {k: opts[k] for k in ("hot_calls", "budget") if opts.get(k) is not None}
        compile_kwargs = {k: opts[k] for k in ("workers",) if opts.get(k) is not None}
        extra: dict[str, Any] = {}
        if self.trace_mode is not None:
            if "trace" not in inspect.signature(pwdaemon.attach).parameters:
                raise RuntimeError("this pwdaemon's attach() has no trace= option")
            extra["trace"] = self.trace_mode
        self.notes.append(f"attach(trace={self.trace_mode or 'default'!r})")
        self.handle = pwdaemon.attach(
            self.model,
            store=self.ctx.spec["store"],
            policy=pwdaemon.PolicyConfig(**policy_kwargs),
            compiler=pwdaemon.CompileConfig(**compile_kwargs),
            **extra,
        )
        self.handle.on_swap(self._on_swap)

    def _on_swap(self, event: Any) -> None:
        self.swaps.append(
            {
                "at": self.ctx.now(),
                "size": event.size,
                "range": None if event.range is None else str(event.range),
                "tier": event.tier.value,
                "source": event.source,
                "compile_s": event.compile_seconds,
                "validated": event.validated,
            }
        )

    def _dispatcher(self) -> Any:
        pieces = self.handle.pieces if self.handle is not None else ()
        if not pieces:
            return None
        piece = next((p for p in pieces if p.specializable), pieces[0])
        return piece.dispatcher

    def tier(self, size: int) -> str:
        dispatcher = self._dispatcher()
        if dispatcher is None:
            return "untraced"
        return str(dispatcher.table.lookup(size).tier.value)

    def label(self, before: str, compiled: bool, eager_runs: int) -> str:
        if before != "untraced":
            return before
        # Not traced yet. Inline trace: this call traced the model with dynamo (on the
        # request path) and ran it eagerly. Background trace: the plain module served
        # it while another thread traces (its dynamo frame may land during this call).
        if self.trace_mode == "background":
            return "eager"
        return "trace" if compiled else "eager"

    def _sample_workers(self) -> None:
        with contextlib.suppress(Exception):
            pids = list(self.handle.status().worker_pids)
            stats = _proc_stats()
            for pid in pids:
                if pid in stats:
                    self.worker_cpu_seen[pid] = stats[pid][1]

    def busy(self) -> bool:
        status = self.handle.status()
        for piece in status.pieces:
            for e in piece.entries:
                if e.state in ("queued", "compiling"):
                    return True
        return not status.plan_complete

    def settle(self, timeout: float) -> dict[str, Any]:
        start = time.perf_counter()
        complete = False
        while time.perf_counter() - start < timeout:
            self._sample_workers()
            if not self.busy():
                complete = True
                break
            time.sleep(0.25)
        return {"seconds": time.perf_counter() - start, "complete": complete}

    def close(self) -> dict[str, Any]:
        self._sample_workers()
        out: dict[str, Any] = {"swaps": self.swaps}
        with contextlib.suppress(Exception):
            out["status"] = str(self.handle.status())
        with contextlib.suppress(Exception):
            status = self.handle.status()
            out["entries"] = [
                {
                    "target": e.target,
                    "tier": e.tier.value,
                    "state": e.state,
                    "why": e.why,
                    "hits": e.hits,
                    "compile_s": e.compile_seconds,
                    "source": e.source,
                    "reason": e.reason,
                }
                for p in status.pieces
                for e in p.entries
            ]
            out["pieces"] = len(status.pieces)
        out["worker_cpu_live_s"] = sum(self.worker_cpu_seen.values())
        if self.handle is not None:
            self.handle.detach()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        out["children_cpu_after_detach_s"] = usage.ru_utime + usage.ru_stime
        return out


def make_system(name: str, model: Any, ctx: Context) -> System:
    if name == "eager":
        return System(model, ctx)
    if name == "dynamic":
        return DynamicSystem(model, ctx)
    if name == "static":
        return CompiledSystem(model, ctx)
    if name == "async":
        return AsyncSystem(model, ctx)
    if name == "upfront":
        return UpfrontSystem(model, ctx)
    if name in ("pwdaemon-cold", "pwdaemon-warm"):
        return PwdaemonSystem(model, ctx)
    raise ValueError(f"unknown system {name!r}; one of {', '.join(SYSTEMS)}")


# ---- the run ---------------------------------------------------------------------------


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
        if cuda:
            torch.cuda.synchronize(device)

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
