"""The serving systems `bench/_systems.py` runs, one per process, and the CPU accounting
of their compiles: eager, torch.compile's dynamic, static, async and up-front peers, and
pwdaemon cold or warm. Each wraps the model as that system serves it and says which
tier a call ran on."""

from __future__ import annotations

import contextlib
import inspect
import os
import resource
import sys
import time
from collections.abc import Callable
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
