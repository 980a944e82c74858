"""Tier 3 (CUDA graphs) on a real GPU; skipped cleanly where there is none (CI).

Compares tier 3 with tier 2 and eager within float32 tolerance (TF32 off), proves a
caller's output is not overwritten by a later replay, and captures while other threads
keep calling the model.
"""

from __future__ import annotations

import copy
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.cudagraph import CudaGraphRunnable

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
TOL: dict[str, Any] = {"atol": 1e-4, "rtol": 1e-4}


class Block(nn.Module):
    def __init__(self, width: int = 256) -> None:
        super().__init__()
        self.a = nn.Linear(width, width)
        self.b = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.b(torch.nn.functional.gelu(self.a(x))))


@pytest.fixture
def gpu_model() -> tuple[nn.Module, nn.Module]:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    m = Block().cuda().eval()
    return m, copy.deepcopy(m)


def _attach_and_wait_for_graph(model: nn.Module, sizes: list[int], **kw: Any) -> pwd.Handle:
    got: dict[int, threading.Event] = {n: threading.Event() for n in sizes}
    h = pwd.attach(
        model,
        sizes=sizes,
        store=False,
        policy=pwd.PolicyConfig(hot_calls=10**9, tick_s=0.02),
        compiler=pwd.CompileConfig(workers=1),
        **kw,
    )  # type: ignore[arg-type]
    h.on_swap(lambda e: got[e.size].set() if e.tier is pwd.Tier.GRAPH and e.size in got else None)
    # Keep serving, as traffic would: a capture runs at the start of a serving call.
    deadline = time.monotonic() + 240
    while not all(ev.is_set() for ev in got.values()):
        assert time.monotonic() < deadline, str(h.status())
        for n in sizes:
            model(torch.randn(n, 256, device="cuda"))
        got[sizes[0]].wait(0.005)
    return h


def test_tier3_matches_tier2_and_outputs_are_not_overwritten(
    gpu_model: tuple[nn.Module, nn.Module],
) -> None:
    model, ref = gpu_model
    h = _attach_and_wait_for_graph(model, [8])
    try:
        entry = h.table().lookup(8)
        assert entry.tier is pwd.Tier.GRAPH
        graph = entry.runnable
        tier2 = graph.fallback  # type: ignore[attr-defined]
        x1, x2 = torch.randn(8, 256, device="cuda"), torch.randn(8, 256, device="cuda")
        out1 = model(x1)
        out2 = model(x2)
        torch.cuda.synchronize()
        torch.testing.assert_close(out1, ref(x1), **TOL)  # not overwritten by replay 2
        torch.testing.assert_close(out2, ref(x2), **TOL)
        assert graph.replays >= 2  # type: ignore[attr-defined]
        args = h.pieces[0].dispatcher.samples[8]
        torch.testing.assert_close(graph(*args), tier2(*args), **TOL)
    finally:
        h.detach()


def test_capture_while_other_threads_call_the_model(
    gpu_model: tuple[nn.Module, nn.Module],
) -> None:
    model, ref = gpu_model
    stop = threading.Event()
    errors: list[BaseException] = []
    calls = [0]
    live: dict[int, threading.Event] = {4: threading.Event(), 16: threading.Event()}

    def serve(n: int) -> None:
        # Inputs come from the CPU, as requests do: while a graph is being captured any
        # other use of the CUDA RNG in the process fails (torch's capture registers the
        # default generator), so the capture runs on a serving thread, and these
        # threads must not draw CUDA random numbers (documented in GraphConfig).
        gen = torch.Generator().manual_seed(n)
        try:
            with torch.no_grad():  # grad mode is per thread
                while not stop.is_set():
                    x = torch.randn(n, 256, generator=gen).cuda()
                    torch.testing.assert_close(model(x), ref(x), **TOL)
                    calls[0] += 1
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    h = pwd.attach(
        model,
        sizes=[4, 16],
        store=False,
        policy=pwd.PolicyConfig(hot_calls=10**9, tick_s=0.02),
        compiler=pwd.CompileConfig(workers=1),
    )
    h.on_swap(lambda e: live[e.size].set() if e.tier is pwd.Tier.GRAPH and e.size in live else None)
    # Dynamo's trace of the model happens before the threads start, as after a server's
    # warm-up request: the CUDA-graph captures then happen while they run. Under
    # no_grad as the threads call (grad mode is in dynamo's guards: another mode would
    # be another piece), and waited for (the trace runs in the background).
    with torch.no_grad():
        for n in (4, 16):
            model(torch.randn(n, 256, generator=torch.Generator().manual_seed(0)).cuda())
    assert h.wait_traced(60)
    assert len(h.pieces) == 1
    threads = [threading.Thread(target=serve, args=(n,)) for n in (4, 4, 16)]
    for t in threads:
        t.start()
    try:
        for n, ev in live.items():
            assert ev.wait(120), (n, [str(p) for p in h.status().pieces])
        # Keep serving through and after the captures, then look at what happened.
        settled, deadline = calls[0] + 300, time.monotonic() + 60
        while calls[0] < settled and not errors and time.monotonic() < deadline:
            stop.wait(0.01)
        assert calls[0] >= settled or errors
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        h.detach()
    assert not errors, errors[0]
    assert len(h.pieces) == 1, str(h.status())
    assert h.table().lookup(4).tier is pwd.Tier.GRAPH
    assert h.table().lookup(16).tier is pwd.Tier.GRAPH
    # The capture ran on a serving thread: its pause, for the record.
    assert len(h.engine.capture_pauses) == 2
    print("capture pauses (s):", [round(p, 4) for p in h.engine.capture_pauses])


def test_padding_serves_smaller_sizes_with_a_captured_graph(
    gpu_model: tuple[nn.Module, nn.Module],
) -> None:
    model, ref = gpu_model
    h = _attach_and_wait_for_graph(model, [8], graphs=pwd.GraphConfig(pad=True))
    try:
        entry = h.table().lookup(5)
        assert entry.tier is pwd.Tier.GRAPH and entry.info.get("padded")
        x = torch.randn(5, 256, device="cuda")
        out = model(x)
        assert out.shape == (5, 256)
        torch.testing.assert_close(out, ref(x), **TOL)
    finally:
        h.detach()


def _flat(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    if isinstance(out, tuple | list):
        return [t for o in out for t in _flat(o)]
    return []


@pytest.mark.parametrize(
    ("name", "guards"),
    [
        ("bert", "every_call"),
        ("llama", "every_call"),
        ("bert", "rechecked"),
        ("llama", "rechecked"),
    ],
)
def test_transformers_models_reach_tier3_under_inference_mode(name: str, guards: str) -> None:
    # The case: weights and inputs made under inference_mode, as servers do;
    # every hot size reaches tier 3 and matches tier 2 (and eager) within fp16 tolerance,
    # and a caller's output is not overwritten by a later replay. With guards="rechecked"
    # the same calls take the direct path (serving.direct) once their signature was served.
    pytest.importorskip("transformers")
    from pwdaemon.real_models import model_spec

    spec = model_spec(name, "tiny")
    dev, dtype = torch.device("cuda"), torch.float16
    fp16: dict[str, Any] = {"atol": 1e-2, "rtol": 1e-2}
    sizes = [1, 4, 16]
    with torch.inference_mode():
        model = spec.build(dev, dtype)
        ref = copy.deepcopy(model)
        calls = {n: spec.inputs(n, dev, dtype) for n in sizes}
        h = pwd.attach(
            model,
            sizes=sizes,
            store=False,
            policy=pwd.PolicyConfig(hot_calls=10**9, tick_s=0.02),
            compiler=pwd.CompileConfig(workers=1),
            guards=guards,
        )
        try:
            done = threading.Event()

            def wait_then_set() -> None:
                if h.wait(sizes=sizes, timeout=300):
                    done.set()

            waiter = threading.Thread(target=wait_then_set)
            waiter.start()
            deadline = time.monotonic() + 300
            while not done.is_set() and waiter.is_alive():  # serve: captures run on calls
                assert time.monotonic() < deadline, str(h.status())
                for n in sizes:
                    model(*calls[n][0], **calls[n][1])
                done.wait(0.005)
            waiter.join()
            assert done.is_set(), str(h.status())  # wait() gave up: a size failed
            for n in sizes:
                # The pieces that serve n: under the backed strategy (what these models
                # end on with CUDA's SDPA) size 1 has a piece of its own.
                serving = [p for p in h.pieces if n in p.dispatcher.counts]
                assert serving, (n, str(h.status()))
                for p in serving:
                    assert p.dispatcher.table.lookup(n).tier is pwd.Tier.GRAPH, (
                        n,
                        str(h.status()),
                    )
            status = h.status()
            graph_mem = {e.target: e.graph_bytes for p in status.pieces for e in p.entries}
            assert status.graph_memory_bytes > 0, str(status)  # the pool grew for them
            first = model(*calls[4][0], **calls[4][1])
            kept = [t.clone() for t in _flat(first)]
            model(*calls[16][0], **calls[16][1])  # another replay of the shared pool
            model(*calls[4][0], **calls[4][1])  # the same graph again
            for a, b in zip(_flat(first), kept, strict=True):
                torch.testing.assert_close(a, b, atol=0, rtol=0)  # caller's output intact
            for n in sizes:
                got = _flat(model(*calls[n][0], **calls[n][1]))
                want = _flat(ref(*calls[n][0], **calls[n][1]))
                for a, b in zip(got, want, strict=True):
                    torch.testing.assert_close(a, b, **fp16)
            direct = h._tracer.direct
            if guards == "rechecked":
                assert direct is not None and len(direct.entries) >= len(sizes), direct
                assert sum(e.calls for e in direct.entries.values()) > 0
            print(name, "capture pauses (s):", [round(p, 4) for p in h.engine.capture_pauses])
            print(name, "graph memory (bytes):", graph_mem)
        finally:
            h.detach()


def test_a_failed_capture_is_retried_and_later_captures_still_work(
    gpu_model: tuple[nn.Module, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A capture that fails midway (a device sync inside the captured region, which CUDA
    # refuses) must not break the allocator for the captures after it.
    import pwdaemon.engine.graphs as graphs

    real = graphs.capture_graph
    failures = [0]

    def flaky(runnable: Any, *args: Any, **kwargs: Any) -> Any:
        if failures[0] == 0:
            failures[0] += 1

            def syncs_while_capturing(*a: Any) -> Any:
                out = runnable(*a)
                if torch.cuda.is_current_stream_capturing():
                    torch.cuda.synchronize()  # illegal during capture: the capture fails
                return out

            return real(syncs_while_capturing, *args, **kwargs)
        return real(runnable, *args, **kwargs)

    monkeypatch.setattr(graphs, "capture_graph", flaky)
    model, ref = gpu_model
    h = _attach_and_wait_for_graph(model, [8, 32])
    try:
        assert failures[0] == 1
        for n in (8, 32):
            assert h.table().lookup(n).tier is pwd.Tier.GRAPH
            x = torch.randn(n, 256, device="cuda")
            torch.testing.assert_close(model(x), ref(x), **TOL)
        failed = [e for p in h.status().pieces for e in p.entries if e.target.startswith("graph:")]
        assert all(e.state == "live" for e in failed), [str(e) for e in failed]
        assert any(e.attempts == 2 for e in failed)  # the one that failed, retried once
    finally:
        h.detach()


def test_a_captures_warm_up_and_instantiation_run_off_the_serving_call_but_its_last_run(
    gpu_model: tuple[nn.Module, nn.Module], monkeypatch: pytest.MonkeyPatch
) -> None:
    import pwdaemon.engine.graphs as graphs

    real_warm_up, real_capture = graphs.warm_up, graphs.capture_graph
    warm_ups: list[tuple[str, int]] = []
    captures: list[tuple[str, int]] = []

    def warm_up(
        runnable: Any, sample: Any, copy_indices: Any, iters: int, written: Any = ()
    ) -> None:
        warm_ups.append((threading.current_thread().name, iters))
        real_warm_up(runnable, sample, copy_indices, iters, written)

    def capture(*args: Any, **kwargs: Any) -> Any:
        captures.append((threading.current_thread().name, kwargs["warmup_iters"]))
        assert kwargs["instantiate"] is False
        return real_capture(*args, **kwargs)

    real_instantiate = CudaGraphRunnable.instantiate
    instantiated_on: list[str] = []

    def instantiate(self: CudaGraphRunnable) -> None:
        instantiated_on.append(threading.current_thread().name)
        real_instantiate(self)

    monkeypatch.setattr(graphs, "warm_up", warm_up)
    monkeypatch.setattr(graphs, "capture_graph", capture)
    monkeypatch.setattr(CudaGraphRunnable, "instantiate", instantiate)
    model, ref = gpu_model
    h = _attach_and_wait_for_graph(model, [8])
    try:
        assert h.table().lookup(8).tier is pwd.Tier.GRAPH
        x = torch.randn(8, 256, device="cuda")
        torch.testing.assert_close(model(x), ref(x), **TOL)
        warmup_iters = pwd.GraphConfig().warmup_iters
        assert warm_ups == [("pwdaemon-torch-work", warmup_iters - 1)]
        assert captures == [(threading.main_thread().name, 1)]  # the serving thread's call
        assert instantiated_on == ["pwdaemon-torch-work"]  # not the call's: the engine's
        print("capture pauses (s):", [round(p, 4) for p in h.engine.capture_pauses])
    finally:
        h.detach()


def test_a_capture_leaves_the_cached_memory_of_other_sizes_in_place(
    gpu_model: tuple[nn.Module, nn.Module],
) -> None:
    # torch.cuda.graph empties the caching allocator on entry: every size's calls after a
    # capture would allocate from the driver again (cudaMalloc, a device sync each).
    from pwdaemon.serving.cudagraph import GraphPool, capture

    model, ref = gpu_model
    freed = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
    del freed  # 64 MiB back in the cache, as a finished call of another size leaves it
    reserved = torch.cuda.memory_reserved()
    segments_freed = torch.cuda.memory_stats()["segment.all.freed"]
    x = torch.randn(8, 256, device="cuda")
    with torch.no_grad():
        graph = capture(lambda _n, t: model(t), [8, x], 8, 0, [1], GraphPool(x.device))
        assert torch.cuda.memory_stats()["segment.all.freed"] == segments_freed
        assert torch.cuda.memory_reserved() >= reserved
        y = torch.randn(8, 256, device="cuda")
        torch.testing.assert_close(graph(8, y), ref(y), **TOL)


# Matmuls with few rows and columns and a long inner dimension, which cuBLAS splits
# over the inner dimension with a workspace; the script exits non-zero on a CUDA error.
_WORKSPACE_SCRIPT = """
import torch
from pwdaemon.serving.cudagraph import GraphPool, capture

torch.backends.cuda.matmul.allow_tf32 = False
torch.manual_seed(0)
ws = [torch.randn(k, n, device="cuda") for k, n in ((8192, 64), (16384, 32), (4096, 256))]
xs = [torch.randn(8, w.shape[0], device="cuda") for w in ws]


def run(_n, *x):
    return tuple(a @ w for a, w in zip(x, ws))


with torch.no_grad():
    graph = capture(run, [8, *xs], 8, 0, [1, 2, 3], GraphPool(xs[0].device))
    # What cudagraph trees do around every recording, then an emptied cache: memory
    # that only cuBLAS's map of workspaces held goes back to the driver.
    torch._C._cuda_clearCublasWorkspaces()
    torch.cuda.empty_cache()
    for _ in range(3):
        new = [torch.randn_like(x) for x in xs]
        got = graph(8, *new)
        torch.cuda.synchronize()
        for g, a, w in zip(got, new, ws):
            torch.testing.assert_close(g, a @ w, atol=1e-3, rtol=1e-3)
print("replayed")
"""


def test_a_graph_keeps_its_cublas_workspace_when_torch_clears_the_workspaces() -> None:
    # cudagraph trees (torch.compile mode="reduce-overhead") clear cuBLAS's workspaces
    # before and after every recording; a graph whose matmuls captured a workspace held
    # only by that map then replays into freed memory (on an H200, beside trees:
    # "unspecified launch failure"). In a child process: a CUDA error is sticky.
    done = subprocess.run(
        [sys.executable, "-c", _WORKSPACE_SCRIPT], capture_output=True, text=True, timeout=180
    )
    assert done.returncode == 0 and "replayed" in done.stdout, done.stderr[-3000:]
