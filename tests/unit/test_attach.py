"""attach()/detach() end to end, with compile=False (no engine, no workers).

Proves: attach routes `model(...)` through pwdaemon with outputs equal to an unwrapped
copy's; detach restores `_compiled_call_impl` exactly and leaves `forward` the same
function; attaching twice, or attaching a module compiled with `model.compile()`, raises
AlreadyAttachedError with a clear message; threads calling the model while the main
thread attaches and detaches it never fail and always get the reference output.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest
import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon import AlreadyAttachedError
from pwdaemon.engine.options import AttachOptions, TraceMode

TIMEOUT = 30.0


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.norm(self.lin(x)))


@pytest.fixture
def pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    model = Net().eval()
    reference = Net().eval()
    reference.load_state_dict(model.state_dict())
    return model, reference


def check(model: nn.Module, reference: nn.Module, sizes: list[int]) -> None:
    for n in sizes:
        x = torch.randn(n, 8)
        torch.testing.assert_close(model(x), reference(x))


def test_attach_detach_round_trip(pair: tuple[nn.Module, nn.Module]) -> None:
    model, reference = pair
    impl_before = model._compiled_call_impl
    forward_before = model.forward
    func_before = type(model).forward
    keys_before = list(model.state_dict())

    handle = pwd.attach(model, compile=False)
    assert model._compiled_call_impl is not None
    assert model._pwdaemon_handle is handle  # type: ignore[attr-defined]
    check(model, reference, [3, 1, 17])
    assert len(handle.pieces) == 1
    assert handle.dispatchers[0].histogram() == {3: 1, 1: 1, 17: 1}  # served by pwdaemon
    assert "attached" in repr(handle) and handle.name in repr(handle)

    handle.detach()
    assert model._compiled_call_impl is impl_before
    assert model.forward == forward_before
    assert model.forward.__func__ is func_before  # type: ignore[attr-defined]
    assert "forward" not in vars(model)
    assert not hasattr(model, "_pwdaemon_handle")
    assert list(model.state_dict()) == keys_before
    assert handle.detached and "detached" in repr(handle)
    check(model, reference, [3, 5])
    assert handle.dispatchers[0].histogram() == {3: 1, 1: 1, 17: 1}  # no longer called
    handle.detach()  # a second detach is a no-op
    assert model._compiled_call_impl is impl_before

    # attach again after detach: a fresh capture
    with pwd.attach(model, compile=False) as again:
        check(model, reference, [4])
        assert again is not handle and len(again.pieces) == 1
        assert again.dispatchers[0].histogram() == {4: 1}
    assert again.detached and model._compiled_call_impl is impl_before


def test_attach_twice_raises(pair: tuple[nn.Module, nn.Module]) -> None:
    model, reference = pair
    with pwd.attach(model, compile=False) as handle:
        check(model, reference, [2])
        impl = model._compiled_call_impl
        with pytest.raises(AlreadyAttachedError, match=r"Net is already attached.*detach\(\)"):
            pwd.attach(model, compile=False)
        # the failed attach left the first one in place and working
        assert model._compiled_call_impl is impl
        assert model._pwdaemon_handle is handle  # type: ignore[attr-defined]
        check(model, reference, [2])
        assert handle.dispatchers[0].histogram() == {2: 2}
    assert model._compiled_call_impl is None


def test_attach_a_compiled_module_raises(pair: tuple[nn.Module, nn.Module]) -> None:
    model, _ = pair
    model.compile(backend="eager")
    impl = model._compiled_call_impl
    with pytest.raises(AlreadyAttachedError, match=r"compiled with torch\.compile"):
        pwd.attach(model, compile=False)
    assert model._compiled_call_impl is impl
    assert not hasattr(model, "_pwdaemon_handle")


def test_attach_an_optimized_module_raises(pair: tuple[nn.Module, nn.Module]) -> None:
    model, _ = pair
    wrapped = torch.compile(model, backend="eager")
    try:
        handle = pwd.attach(wrapped, compile=False)  # type: ignore[arg-type]
    except AlreadyAttachedError:
        return
    try:
        wrapped(torch.randn(2, 8))
        raise AssertionError(f"attached an OptimizedModule; pieces: {len(handle.pieces)}")
    finally:
        handle.detach()


def test_threads_keep_serving_while_attach_and_detach_happen(
    pair: tuple[nn.Module, nn.Module],
) -> None:
    model, reference = pair
    n_threads = 4
    cycles = 3
    calls = [0]
    progress = threading.Condition()
    stop = threading.Event()
    start = threading.Barrier(n_threads + 1, timeout=TIMEOUT)
    errors: list[BaseException] = []
    mismatches: list[tuple[int, int]] = []

    # Each thread has its own inputs of varying sizes and their reference outputs.
    work = []
    for t in range(n_threads):
        gen = torch.Generator().manual_seed(t)
        inputs = [torch.randn(n, 8, generator=gen) for n in (1, 2, 3 + t, 9, 16 + t)]
        work.append([(x, reference(x)) for x in inputs])

    def hammer(t: int) -> None:
        try:
            with torch.no_grad():
                start.wait()
                i = 0
                while not stop.is_set():
                    x, expected = work[t][i % len(work[t])]
                    out = model(x)
                    if not torch.allclose(out, expected, rtol=1e-5, atol=1e-6):
                        mismatches.append((t, i))
                    i += 1
                    with progress:
                        calls[0] += 1
                        progress.notify_all()
        except BaseException as exc:
            errors.append(exc)
            with progress:
                progress.notify_all()

    def wait_for_calls(more: int) -> None:
        with progress:
            target = calls[0] + more
            assert progress.wait_for(lambda: errors or calls[0] >= target, timeout=TIMEOUT), (
                "the serving threads stalled"
            )

    threads = [threading.Thread(target=hammer, args=(t,), daemon=True) for t in range(n_threads)]
    for th in threads:
        th.start()
    start.wait()
    served = []
    try:
        for _ in range(cycles):
            wait_for_calls(20)  # served plain
            handle = pwd.attach(model, compile=False)
            try:
                wait_for_calls(40)  # served through pwdaemon (the first call traces)
            finally:
                handle.detach()
            served.append(sum(sum(d.histogram().values()) for d in handle.dispatchers))
            assert model._compiled_call_impl is None
        wait_for_calls(20)
    finally:
        stop.set()
        for th in threads:
            th.join(TIMEOUT)
    assert not errors, errors[0]
    assert not mismatches
    assert not any(th.is_alive() for th in threads)
    # every attach really served calls from the threads
    assert all(s > 0 for s in served), served


def test_background_trace_serves_eagerly_until_dynamo_has_traced(
    pair: tuple[nn.Module, nn.Module],
) -> None:
    model, ref = pair
    torch._dynamo.reset()
    handle = pwd.attach(model, compile=False, trace="background")
    try:
        x = torch.randn(3, 8)
        torch.testing.assert_close(model(x), ref(x))  # served by the plain module
        assert handle.wait_traced(60)
        assert handle._tracer.trace_error is None
        assert len(handle.pieces) == 1
        calls_before = sum(handle.pieces[0].dispatcher.counts.values())
        for n in (1, 3, 7):
            x = torch.randn(n, 8)
            torch.testing.assert_close(model(x), ref(x))
        # Now every call goes through the captured piece's dispatcher.
        assert sum(handle.pieces[0].dispatcher.counts.values()) == calls_before + 3
        assert 3 in handle.pieces[0].dispatcher.samples  # the background call's copy
    finally:
        handle.detach()


def test_background_trace_settles_off_the_serving_thread_for_tensors_made_outside_inference(
    pair: tuple[nn.Module, nn.Module],
) -> None:
    # Servers make inputs outside inference_mode and call inside it: the background
    # copy must be the same kind of tensor, or the traced piece never serves a call
    # (each a miss) and the serving thread traces again.
    from torch._dynamo.utils import counters

    model, ref = pair
    torch._dynamo.reset()
    xs = {n: torch.randn(n, 8) for n in (1, 3, 7)}
    handle = pwd.attach(model, compile=False, trace="background")
    try:
        with torch.inference_mode():
            model(xs[3])
            assert handle.wait_traced(60)
            assert handle._tracer.settled  # settled on the trace thread, not by a call
            frames = counters["frames"]["ok"]
            for x in xs.values():
                torch.testing.assert_close(model(x), ref(x))
        assert counters["frames"]["ok"] == frames  # no call traced anything
        assert handle._tracer.miss_calls == 0
        assert sum(handle.pieces[0].dispatcher.counts.values()) >= len(xs)
    finally:
        handle.detach()


def test_detach_waits_for_a_background_trace_under_way(pair: tuple[nn.Module, nn.Module]) -> None:
    model, ref = pair
    torch._dynamo.reset()
    handle = pwd.attach(model, compile=False, trace="background")
    x = torch.randn(5, 8)
    torch.testing.assert_close(model(x), ref(x))
    assert handle._tracer.background is not None
    thread = handle._tracer.background.thread
    assert thread is not None
    handle.detach()
    assert not thread.is_alive()
    torch.testing.assert_close(model(x), ref(x))  # the plain module again


def test_trace_mode_is_validated(pair: tuple[nn.Module, nn.Module]) -> None:
    model, _ = pair
    with pytest.raises(ValueError, match="trace must be 'inline' or 'background'"):
        pwd.attach(model, trace="lazy")


def test_attach_checks_everything_into_one_frozen_options_object(
    pair: tuple[nn.Module, nn.Module],
) -> None:
    model, _ = pair
    with pwd.attach(model, compile=False, sizes=[4, 2, 4], ranges=[(10, 20)], store=False) as h:
        options = h.options
        assert options.compile is False
        assert options.sizes == (4, 2) and options.ranges == (pwd.Range(10, 20),)
        assert options.trace is TraceMode.INLINE and options.store is None
        assert h.engine.options is options  # Handle and Engine share the one object
        with pytest.raises(dataclasses.FrozenInstanceError):
            options.compile = True  # type: ignore[misc]
    # Built directly, the options object checks itself the same way attach() does.
    with pytest.raises(ValueError, match="size_cap must be >= 1, got 0"):
        AttachOptions(name="m", size_cap=0)
    with pytest.raises(ValueError, match="3 sizes configured but the specialization budget is 2"):
        AttachOptions(name="m", sizes=(1, 2, 3), policy=pwd.PolicyConfig(budget=2))
