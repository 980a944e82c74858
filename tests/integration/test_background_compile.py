"""End to end: real Inductor compiles in real worker subprocesses, hot-swapped in.

Every compiled runnable is checked against the eager model within atol=rtol=1e-4
(float32; Inductor may reorder the LayerNorm reduction).
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.strategy import ORDER, ShapeStrategy
from pwdaemon.testing import inject_fault
from pwdaemon.workers.compiler import JobSpec
from pwdaemon.workers.executor import ProcessExecutor

pytestmark = pytest.mark.slow

TOL: dict[str, Any] = {"atol": 1e-4, "rtol": 1e-4}
# cold_after_s: a size called a few times and then waited on must not go cold while it
# queues behind the general compile (past 60 s on a loaded machine it was dropped).
FAST = pwd.PolicyConfig(hot_calls=2, tick_s=0.02, cold_after_s=3600)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); it is gone once reaped, which join() does.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"


def _entries(h: pwd.Handle) -> dict[str, pwd.EntryStatus]:
    return {e.target: e for e in h.status().pieces[0].entries}


def _worker_children() -> list[int]:
    """pwdaemon worker processes that are children of this process (zombies included)."""
    me, found = os.getpid(), []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read()
        except OSError:
            continue
        if ppid == me and b"pwdaemon.workers.main" in cmdline:
            found.append(int(entry))
    return found


class _BoundedHangs:
    """The real worker pool; injected hangs of chosen targets get a short timeout.

    An injected hang never finishes, so its timeout fires on any machine, fast or
    loaded; every other job (real compiles, and a hang the test ends itself with a
    SIGKILL) keeps the config's generous timeout_s, so no real compile can time out
    because the machine is slow.
    """

    def __init__(self, inner: ProcessExecutor, short_for: set[str], short_s: float) -> None:
        self.inner, self.short_for, self.short_s = inner, short_for, short_s

    @property
    def restarts(self) -> int:
        return self.inner.restarts

    def start(self) -> None:
        self.inner.start()

    def run(self, spec: JobSpec, timeout: float) -> dict[str, Any]:
        if spec.fault == "hang" and spec.target.label in self.short_for:
            timeout = self.short_s
        return self.inner.run(spec, timeout)

    def pids(self) -> list[int]:
        return self.inner.pids()

    def close(self, timeout: float) -> None:
        self.inner.close(timeout)


def test_general_then_hot_sizes_swap_in_and_match_eager(
    mlp: nn.Module, reference: nn.Module
) -> None:
    events: list[pwd.SwapEvent] = []
    plans: list[pwd.PlanCompleteEvent] = []
    plan_done = threading.Event()
    h = pwd.attach(
        mlp, sizes=[4], ranges=[(32, 64)], policy=FAST, compiler=pwd.CompileConfig(workers=1)
    )
    h.on_swap(events.append)

    def on_plan(e: pwd.PlanCompleteEvent) -> None:
        plans.append(e)
        plan_done.set()

    h.on_plan_complete(on_plan)
    pids: list[int] = []
    try:
        for n in [1, 4, 8, 8, 8, 40, 1, 1]:
            x = torch.randn(n, 16)
            torch.testing.assert_close(mlp(x), reference(x), **TOL)
        assert plan_done.wait(120), str(h.status())
        assert h.wait(sizes=[1, 8], timeout=120), str(h.status())
        pids = list(h.status().worker_pids)
        assert pids

        # Every tier now serving is compiled, and each matches eager.
        table = h.table()
        expected = {
            1: pwd.Tier.SIZE,
            4: pwd.Tier.SIZE,
            8: pwd.Tier.SIZE,
            40: pwd.Tier.RANGE,
            3: pwd.Tier.GENERAL,
            100: pwd.Tier.GENERAL,
        }
        for n, tier in expected.items():
            assert table.lookup(n).tier is tier, n
            x = torch.randn(n, 16)
            torch.testing.assert_close(mlp(x), reference(x), **TOL)

        # One event per swap, fields right, versions strictly increasing.
        assert [e.version for e in events] == list(range(1, len(events) + 1))
        by_target = {(e.range, e.tier) for e in events}
        assert (None, pwd.Tier.GENERAL) in by_target
        assert (pwd.Range(32, 64), pwd.Tier.RANGE) in by_target
        for n in (1, 4, 8):
            assert (pwd.Range.of(n), pwd.Tier.SIZE) in by_target
        assert len(by_target) == len(events)
        assert all(e.compile_seconds > 0 and e.source == "compiled" for e in events)
        assert events[0].tier is pwd.Tier.GENERAL  # general is compiled first
        assert len(plans) == 1 and plans[0].live == 3 and plans[0].failed == 0

        entries = _entries(h)
        assert entries["size:8"].state == "live" and entries["size:8"].why == "hot"
        assert entries["size:4"].why == "configured"
        assert entries["general"].compile_seconds is not None
        assert h.status().pieces[0].table_version == events[-1].version
    finally:
        h.detach()
    assert _worker_children() == []
    assert not any(_alive(p) for p in pids)
    assert mlp._compiled_call_impl is None
    x = torch.randn(3, 16)
    torch.testing.assert_close(mlp(x), reference(x))


def test_a_configured_range_above_the_backed_trace_size_compiles_and_matches_eager(
    mlp: nn.Module, reference: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under the backed strategy (torch 2.11's only one) the size symbol's hint is the
    # traced size, and a range that left it out was refused by the worker's shape
    # environment ("1 not in VR[32, 64]", three attempts): the range's sizes stayed on
    # the general. The worker now moves the hint into the range.
    from conftest import trace_with

    trace_with(monkeypatch, ShapeStrategy.BACKED_OBLIVIOUS)
    compiler = pwd.CompileConfig(workers=1, general=False)
    with pwd.attach(mlp, ranges=[(32, 64)], compiler=compiler, store=False) as h:
        x1 = torch.randn(1, 16)
        torch.testing.assert_close(mlp(x1), reference(x1), **TOL)  # traced at size 1
        assert h.wait_traced(120)
        assert h.wait(timeout=300), str(h.status())
        assert h.pieces[0].strategy is ShapeStrategy.BACKED_OBLIVIOUS
        assert _entries(h)["range:32-64"].state == "live", str(h.status())
        table = h.table()
        for n in (32, 40, 64):
            assert table.lookup(n).tier is pwd.Tier.RANGE, n
            x = torch.randn(n, 16)
            torch.testing.assert_close(mlp(x), reference(x), **TOL)


def test_failed_crashed_and_hung_compiles_leave_serving_working(
    mlp: nn.Module, reference: nn.Module
) -> None:
    # timeout_s stays at its default: it bounds real compiles, which must never time out
    # here however slow the machine (nor does a fresh worker's start count against it:
    # that has start_timeout_s). Only size:3's injected hangs get a short bound.
    compiler = pwd.CompileConfig(workers=1, retries=1, backoff_s=0.05)
    executor = _BoundedHangs(ProcessExecutor(compiler), short_for={"size:3"}, short_s=2.0)
    h = pwd.attach(
        mlp,
        sizes=[2, 3, 5],
        policy=FAST,
        compiler=compiler,
        executor=executor,
        store=False,
    )
    inject_fault(h, "size:2", "raise")  # every attempt raises
    inject_fault(h, "size:3", "hang")  # every attempt hangs past its (short) timeout
    inject_fault(h, "size:5", "hang", times=1)  # hangs once, until we SIGKILL the worker
    try:
        x5 = torch.randn(5, 16)
        torch.testing.assert_close(mlp(x5), reference(x5), **TOL)
        assert h.wait_traced(120)  # the plan's jobs exist once the model is traced
        # Wait until size:5 is compiling (hung in the worker), then kill that worker. Its
        # hang has the default timeout, so the kill always comes first.
        deadline = time.monotonic() + 300
        while _entries(h)["size:5"].state != "compiling":
            assert time.monotonic() < deadline, str(h.status())
            assert not h.wait(sizes=[5], timeout=0.05)
        pid = h.status().worker_pids[0]
        os.kill(pid, signal.SIGKILL)
        # Its retry has no fault: it compiles and goes live on a fresh worker.
        assert h.wait(sizes=[5], timeout=300), str(h.status())
        assert h.wait(sizes=[2], timeout=300) is False
        assert h.wait(sizes=[3], timeout=300) is False
        entries = _entries(h)
        assert entries["size:2"].state == "failed"
        assert entries["size:2"].reason is not None
        assert entries["size:2"].reason.startswith("failed after 2 attempts")
        assert "injected compile failure" in entries["size:2"].reason
        assert entries["size:3"].state == "failed"
        assert entries["size:3"].reason is not None
        assert "timeout after 2 attempts: compile did not finish within 2 s" in (
            entries["size:3"].reason
        )
        assert entries["size:5"].state == "live" and entries["size:5"].attempts == 2
        assert h.engine.jobs_by_outcome[("size", "crashed")] == 1
        assert h.engine.jobs_by_outcome[("size", "timeout")] == 2
        assert h.engine.executor.restarts >= 3  # one kill + two hangs
        # Serving never noticed: failed sizes run on general, and right.
        for n in (2, 3, 5):
            x = torch.randn(n, 16)
            torch.testing.assert_close(mlp(x), reference(x), **TOL)
        assert h.table().lookup(2).tier is pwd.Tier.GENERAL
        assert h.table().lookup(5).tier is pwd.Tier.SIZE
        assert pid not in h.status().worker_pids
    finally:
        h.detach()
    assert _worker_children() == []


def test_serving_is_not_blocked_while_a_compile_runs(mlp: nn.Module) -> None:
    # Real compiles of configured sizes keep the worker busy; size 7 has no artifact
    # (no general tier, never hot), so it is served by tier 0 throughout. Its latency
    # while compiles run is compared with its latency once they are all done.
    compiler = pwd.CompileConfig(workers=1, general=False)
    policy = pwd.PolicyConfig(hot_calls=10**9)
    h = pwd.attach(mlp, sizes=[2, 3, 4, 5, 6, 8], policy=policy, compiler=compiler, store=False)
    x = torch.randn(7, 16)

    def timed(n: int) -> list[float]:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            mlp(x)
            out.append(time.perf_counter() - t)
        return out

    try:
        mlp(x)  # capture; the plan is queued now
        deadline = time.monotonic() + 60
        while h.status().in_flight == 0:
            assert time.monotonic() < deadline, str(h.status())
            assert not h.wait(timeout=0.02)
        busy: list[float] = []
        while h.status().in_flight > 0 and len(busy) < 20_000:
            busy.extend(timed(50))
        assert len(busy) >= 200, "compiles finished before enough calls were timed"
        assert h.wait(timeout=120), str(h.status())
        idle = timed(len(busy))
        assert h.table().lookup(7).tier is pwd.Tier.EAGER
        med_busy, med_idle = statistics.median(busy), statistics.median(idle)
        # Blocked calls would take compile-long (seconds); allow 3x for CPU contention
        # from the worker on 2 cores and loads on the engine thread.
        assert med_busy < 3 * med_idle, (med_busy, med_idle)
    finally:
        h.detach()
    assert _worker_children() == []


def test_detach_while_workers_start_is_clean(
    mlp: nn.Module, caplog: pytest.LogCaptureFixture
) -> None:
    h = pwd.attach(mlp, compiler=pwd.CompileConfig(workers=1), store=False)
    mlp(torch.randn(3, 16))
    h.detach()  # the worker is still importing torch: its start is cut short
    assert _worker_children() == []
    assert "did not stop cleanly" not in caplog.text


class ReshapesAtBatch1(nn.Module):
    """Bakes the batch size into a view at size 1 only (as GPT-2's CUDA SDPA path does)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        if x.shape[0] == 1:
            return y.reshape(1, 2, 4).sum(1) * 2
        return y.reshape(x.shape[0], 2, 4).sum(1)


def test_a_piece_guarded_to_batch_1_is_compiled_for_batch_1_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Under the backed strategy the size-1 call gets a piece of its own with the 1 baked
    # into its graph. Compiling that piece for the other configured sizes failed three
    # times each ("shape '[1, 2, 4]' is invalid for input of size 16"), and `wait()` gave
    # up on sizes the other piece served fine (GPT-2 on an H200). Each piece is now
    # planned for the sizes its guards admit.
    from conftest import trace_with

    trace_with(monkeypatch, ShapeStrategy.BACKED_OBLIVIOUS)
    torch.manual_seed(0)
    model = ReshapesAtBatch1()
    reference = ReshapesAtBatch1()
    reference.load_state_dict(model.state_dict())
    sizes = [1, 2, 8]
    inputs = {n: torch.randn(n, 8) for n in (1, 2, 5, 8)}
    with torch.inference_mode(), pwd.attach(model, sizes=sizes, store=False) as h:
        model(inputs[1])
        assert h.wait_traced(120)
        for n in (1, 2, 8, 1, 5):
            model(inputs[n])
        assert h.wait(sizes=sizes, timeout=300, tier=pwd.Tier.SIZE), str(h.status())
        assert h.wait(timeout=300), str(h.status())  # the whole plan, generals included
        assert len(h.pieces) == 2, str(h.status())
        planned = {
            s.graph: sorted(int(e.target[5:]) for e in s.entries if e.target.startswith("size:"))
            for s in h.status().pieces
        }
        one = next(p.index for p in h.pieces if 1 in p.dispatcher.counts)
        other = next(p.index for p in h.pieces if p.index != one)
        assert planned == {one: [1], other: [2, 8]}, str(h.status())
        failed = [e for s in h.status().pieces for e in s.entries if e.state == "failed"]
        assert not failed, str(h.status())
        for x in inputs.values():
            torch.testing.assert_close(model(x), reference(x), **TOL)


class FlagsItsBatch(nn.Module):
    """A size test before a graph break, as transformers' `is_causal = q_length > 1`
    before SDPA: the first piece is `gt = s0 > 1; return (gt,)`, with no tensor in it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        many = x.shape[0] > 1
        torch._dynamo.graph_break()
        return x * 2 if many else x + 1


def test_a_piece_of_size_arithmetic_alone_gets_no_compile_and_holds_no_wait() -> None:
    # Found on BERT sized on its sequence dim: such a piece's size compiles failed
    # ("CompiledArtifact.save failed to save since there's no artifact to save", three
    # attempts each), and `wait(sizes=[1])` returned False from then on.
    model, reference = FlagsItsBatch(), FlagsItsBatch()
    inputs = {n: torch.randn(n, 4) for n in (1, 3)}
    with torch.inference_mode(), pwd.attach(model, sizes=[3], store=False, policy=FAST) as h:
        for n in (3, 1, 3):
            model(inputs[n])
        assert h.wait(sizes=[3], timeout=300, tier=pwd.Tier.SIZE), str(h.status())
        assert h.wait(timeout=300), str(h.status())
        by_graph = {s.graph: s for s in h.status().pieces}
        free = [p.index for p in h.pieces if p.tensor_free]
        assert len(free) == 1 and len(h.pieces) >= 2, str(h.status())
        assert [e.target for e in by_graph[free[0]].entries] == ["eager"], str(h.status())
        assert by_graph[free[0]].on_eager_reason is None  # nothing to warn about
        assert "only size arithmetic: nothing to compile" in str(h.status())
        failed = [e for s in h.status().pieces for e in s.entries if e.state == "failed"]
        assert not failed, str(h.status())
        for x in inputs.values():
            torch.testing.assert_close(model(x), reference(x), **TOL)


class PoolsTokens(nn.Module):
    """The size is dim 1 (tokens) of a (batch, tokens, features) input, as a server that
    batches sequences of one length at a time calls an encoder."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x).relu().sum(dim=1)


def test_a_size_on_dim_1_specializes_its_input_with_the_strides_it_implies() -> None:
    # With the size on dim 1, dim 0's stride is an expression in it (8 * s0). The worker
    # built its example input for size 5 with that stride taken as the size itself (5,
    # not 40): the compile expected a (2, 5, 8) input with strides (5, 8, 1), and
    # validation rejected every size ("expected size 2==2, stride 40==5 at dim=0"), so
    # a model sized on any dim but the first never left eager.
    torch.manual_seed(0)
    model = PoolsTokens().eval()
    reference = PoolsTokens().eval()
    reference.load_state_dict(model.state_dict())
    inputs = {n: torch.randn(2, n, 8) for n in (3, 5, 7)}
    compiler = pwd.CompileConfig(workers=1, general=False, start_timeout_s=300)
    with (
        torch.inference_mode(),
        pwd.attach(model, dynamic={"x": 1}, sizes=[5], compiler=compiler, store=False) as h,
    ):
        for n in (3, 5, 7):
            model(inputs[n])
        assert h.wait(sizes=[5], timeout=300, tier=pwd.Tier.SIZE), str(h.status())
        assert h.table().lookup(5).tier is pwd.Tier.SIZE
        failed = [e for s in h.status().pieces for e in s.entries if e.state == "failed"]
        assert not failed, str(h.status())
        for x in inputs.values():
            torch.testing.assert_close(model(x), reference(x), **TOL)


class ConvolvesTime(nn.Module):
    """Sized on dim 2 (time) of a (batch, channels, time) input, as an audio model."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(4, 16, 3, padding=1)
        self.down = nn.Conv1d(16, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.down(torch.relu(self.conv(x))))
        return self.head(h.mean(dim=2))


@pytest.mark.skipif(
    ShapeStrategy.UNBACKED not in ORDER,
    reason="this torch traces under the backed strategy alone (2.11): nothing to fall back from",
)
def test_a_general_compile_failing_on_a_size_guard_makes_the_next_start_trace_backed(
    tmp_path: Path,
) -> None:
    # Traced unbacked, the conv model is one piece, but Inductor cannot lower its
    # general ("could not extract specialized integer from data-dependent expression
    # 16*Max(1, u0)"): every size without a compile of its own stayed on eager. The
    # failure is remembered in the store as the strategy's, and the next start traces
    # backed, whose general compiles.
    from pwdaemon.serving.trace_record import AttemptOutcome

    torch.manual_seed(0)
    first = ConvolvesTime().eval()
    state = first.state_dict()
    compiler = pwd.CompileConfig(workers=1, retries=0, start_timeout_s=300)
    store = str(tmp_path / "store")
    inputs = {n: torch.randn(3, 4, n) for n in (1, 37, 100)}
    with torch.inference_mode():
        with pwd.attach(first, dynamic={"x": 2}, compiler=compiler, store=store) as h:
            first(inputs[100])
            assert h.wait_traced(120)
            assert h.wait(timeout=300), str(h.status())
            assert h.pieces[0].strategy is ShapeStrategy.UNBACKED
            general = _entries(h)["general"]
            assert general.state == "failed" and "data-dependent" in (general.reason or ""), general
        second = ConvolvesTime().eval()
        second.load_state_dict(state)
        reference = ConvolvesTime().eval()
        reference.load_state_dict(state)
        with pwd.attach(second, dynamic={"x": 2}, compiler=compiler, store=store) as h:
            second(inputs[100])
            assert h.wait_traced(120)
            tracer = h._tracer
            assert tracer.attempts[0].strategy is ShapeStrategy.UNBACKED
            assert tracer.attempts[0].outcome is AttemptOutcome.SKIPPED
            assert h.pieces[0].strategy is ShapeStrategy.BACKED_OBLIVIOUS
            assert h.wait(timeout=300), str(h.status())
            assert _entries(h)["general"].state == "live", str(h.status())
            for x in inputs.values():  # 1 and 37 on the general tier
                torch.testing.assert_close(second(x), reference(x), **TOL)


_EXIT_WITH_JOBS_QUEUED = """
import torch
from torch import nn
import pwdaemon as pwd

model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 16)).eval()
handle = pwd.attach(
    model, sizes=(2, 3, 4, 5, 6, 7, 8, 9), compiler=pwd.CompileConfig(workers=1), store=False
)
with torch.inference_mode():
    model(torch.randn(2, 16))
    assert handle.wait(sizes=[2], timeout=300), handle.status()
print("exiting with compiles under way", flush=True)
"""


def test_a_script_that_exits_with_compiles_under_way_prints_no_traceback(tmp_path: Path) -> None:
    # A script that ends without detach while the engine still compiles (7 sizes
    # queued): the gate's exit handler raises GateClosed in the runner's gated work, and
    # asyncio printed the task group's tracebacks (~150 lines) at 2 of 3 such exits.
    script = tmp_path / "exit_with_jobs.py"
    script.write_text(_EXIT_WITH_JOBS_QUEUED)
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=600, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exiting with compiles under way" in proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
