"""The engine's validation before a swap, with the in-process FakeExecutor: what is
checked against eager, on which inputs, and what a rejection keeps serving."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
from scheduling import FAST, call_sizes, compiler_config
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.range_table import Target, TargetKind
from pwdaemon.testing import FakeExecutor


def test_validation_rejects_wrong_runnable_and_keeps_old_tier(mlp: nn.Module) -> None:
    def off_by_one(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        if target.kind is not TargetKind.SIZE:
            return fn
        return lambda *a: tuple(o + 1 for o in fn(*a))

    ex = FakeExecutor(transform=off_by_one)
    h = pwd.attach(mlp, policy=FAST, compiler=compiler_config(retries=0), executor=ex, store=False)
    try:
        call_sizes(mlp, [6, 6, 6])
        assert h.wait(sizes=[6], timeout=20) is False
        entry = next(e for e in h.status().pieces[0].entries if e.target == "size:6")
        assert entry.state == "failed"
        assert "validation on size 6" in (entry.reason or "")
        assert "differs beyond" in (entry.reason or "")
        assert h.table().lookup(6).tier is pwd.Tier.GENERAL
        assert h.engine.rejects_by_reason["mismatch"] == 1
    finally:
        h.detach()


def test_a_size_no_call_has_brought_yet_is_validated_on_a_recorded_input_tiled_to_it(
    mlp: nn.Module, reference: nn.Module
) -> None:
    # Configured (or loaded from the store on a warm restart) before any call of its
    # size: it went live unchecked, and its first serving call paid the compiled code's
    # first-invocation costs. Checked now on size 2's recorded rows, repeated to 5.
    def off_by_one_at_5(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        if target.label != "size:5":
            return fn
        return lambda *a: tuple(o + 1 for o in fn(*a))

    gate = threading.Event()
    ex = FakeExecutor(transform=off_by_one_at_5, gate=gate)
    h = pwd.attach(
        mlp,
        sizes=[3, 5],
        policy=FAST,
        compiler=compiler_config(retries=0),
        executor=ex,
        store=False,
    )
    events: list[pwd.SwapEvent] = []
    h.on_swap(events.append)
    try:
        call_sizes(mlp, [2])
        gate.set()
        assert h.wait(sizes=[3], timeout=20)
        assert h.wait(timeout=20)  # the plan ended: size 5 given up
        entry = next(e for e in h.status().pieces[0].entries if e.target == "size:5")
        assert entry.state == "failed", str(entry)
        reason = entry.reason or ""
        assert "validation on size 5, an input tiled from a recorded one of size 2" in reason
        assert "differs beyond" in reason
        assert h.engine.rejects_by_reason["mismatch"] == 1
        (size_3,) = [e for e in events if e.range == pwd.Range.of(3)]
        assert size_3.validated
        assert h.table().lookup(5).tier is pwd.Tier.GENERAL
        x = torch.randn(5, 16)
        torch.testing.assert_close(mlp(x), reference(x))
    finally:
        h.detach()


def test_a_general_runnable_is_validated_at_its_smallest_and_largest_sizes(
    mlp: nn.Module, reference: nn.Module
) -> None:
    # Right at small sizes, wrong past 2 (as a general compile that kept one size as a
    # constant was): checked at the first size recorded alone, it went live and served
    # wrong outputs at the others.
    def wrong_past_2(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        if target.kind is not TargetKind.GENERAL:
            return fn
        return lambda *a: tuple(o + (o.shape[0] > 2) for o in fn(*a))

    gate = threading.Event()
    ex = FakeExecutor(transform=wrong_past_2, gate=gate)
    h = pwd.attach(mlp, policy=FAST, compiler=compiler_config(retries=0), executor=ex, store=False)
    try:
        call_sizes(mlp, [2, 7])  # both recorded before the general compile finishes
        gate.set()
        assert h.wait(timeout=20)  # the plan (the general) ended
        entry = next(e for e in h.status().pieces[0].entries if e.target == "general")
        assert entry.state == "failed", str(entry)
        assert "validation on size 7" in (entry.reason or "")
        x = torch.randn(7, 16)
        torch.testing.assert_close(mlp(x), reference(x))
    finally:
        h.detach()


def test_a_serving_runnable_that_raises_is_replaced_after_checking_against_eager(
    mlp: nn.Module, reference: nn.Module
) -> None:
    # Seen on an H200: a general compile's cuDNN attention raised at one size, so the
    # size's own compile could not be compared with it, and the job failed as an
    # internal error on every retry while that size kept raising into eager.
    def general_raises_at_6(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        if target.kind is not TargetKind.GENERAL:
            return fn

        def run(*a: Any) -> Any:
            out = fn(*a)
            if out[0].shape[0] == 6:
                raise RuntimeError("mha_graph.execute(...) is_good() was false")
            return out

        return run

    ex = FakeExecutor(transform=general_raises_at_6)
    h = pwd.attach(mlp, policy=FAST, compiler=compiler_config(retries=0), executor=ex, store=False)
    try:
        call_sizes(mlp, [2, 2])
        assert h.wait(sizes=[2], timeout=20)  # the general went live first, checked at 2
        x = torch.randn(6, 16)
        torch.testing.assert_close(mlp(x), reference(x))  # the general raised: eager
        call_sizes(mlp, [6, 6])
        assert h.wait(sizes=[6], timeout=20), str(h.status().pieces[0].entries)
        assert h.table().lookup(6).tier is pwd.Tier.SIZE
        torch.testing.assert_close(mlp(x), reference(x))
        assert sum(h.engine.rejects_by_reason.values()) == 0
    finally:
        h.detach()


def test_validation_can_be_turned_off(mlp: nn.Module) -> None:
    def off_by_one(target: Target, fn: Callable[..., Any]) -> Callable[..., Any]:
        return (lambda *a: tuple(o + 1 for o in fn(*a))) if target.kind is TargetKind.SIZE else fn

    ex = FakeExecutor(transform=off_by_one)
    h = pwd.attach(
        mlp, policy=FAST, compiler=compiler_config(validate=False), executor=ex, store=False
    )
    try:
        call_sizes(mlp, [6, 6, 6])
        assert h.wait(sizes=[6], timeout=20)
        assert h.pieces[0].dispatcher.samples == {}  # nothing recorded either
    finally:
        h.detach()
