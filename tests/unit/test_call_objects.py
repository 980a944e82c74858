"""Calls that pass objects holding tensors, as transformers' generate() passes its cache.

Proves: a trace that runs after its call (trace="background", a hot input's trace) runs
on a deep copy of the call's objects, so it neither sees nor touches what the call filled
in place; the tensors inside a call's objects carry the size, so a decode step's piece is
sized on the batch; an input that misses again after its trace (a cache length that its
signature does not show) is traced again until a piece serves it, and one that still
misses after `MAX_TRACES_PER_SIGNATURE` traces stays eager with a reason; the copy keeps
what dynamo guards on and shares what it must.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn
from tracing import WIDTH, fresh_counters, make

import pwdaemon as pwd
from pwdaemon.serving.inputs import copy_call, copy_small_call
from pwdaemon.serving.misses import MAX_TRACES_PER_SIGNATURE
from pwdaemon.serving.trace_record import MissState

PROMPT = 5  # the prefill's length
STEPS = 6  # decode steps per generation
TOLERANCE = 1e-5  # float32, the same ops in another order at most


@dataclass
class Layer:
    keys: torch.Tensor


@dataclass
class Cache:
    """A KV cache as transformers' DynamicCache holds one: filled in place by the model."""

    layers: list[Layer] = field(default_factory=list)
    tag: str = "plain"  # read by the model: a value dynamo guards on

    def length(self) -> int:
        return int(self.layers[0].keys.shape[1]) if self.layers else 0


class Decoder(nn.Module):
    """Appends each call's keys to its cache and attends over all of them."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        h = self.lin(x)
        if cache.layers:
            cache.layers[0].keys = torch.cat([cache.layers[0].keys, h], dim=1)
        else:
            cache.layers.append(Layer(h))
        keys = cache.layers[0].keys
        out = h + keys.mean(dim=1, keepdim=True)
        return out * 2 if cache.tag == "twice" else out


def _generate(model: nn.Module, batch: int, *, tag: str = "plain") -> list[torch.Tensor]:
    """A prefill and `STEPS` decode steps on one new cache, as generate() makes them."""
    # A generator of its own: the inputs must not depend on who else draws from the
    # global one (before `random_state`, a background trace's end rewound it).
    rng = torch.Generator().manual_seed(batch)
    cache = Cache(tag=tag)
    outs = [model(torch.randn(batch, PROMPT, WIDTH, generator=rng), cache)]
    for _ in range(STEPS):
        outs.append(model(torch.randn(batch, 1, WIDTH, generator=rng), cache))
    assert cache.length() == PROMPT + STEPS  # no trace wrote into the caller's cache
    return outs


def _assert_same(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=TOLERANCE, atol=TOLERANCE)


def test_a_background_trace_runs_on_a_copy_of_the_cache_the_call_fills() -> None:
    # The first call (a prefill on an empty cache) is traced after it returned, while
    # its caller goes on with the cache it filled. With only top-level tensors copied,
    # the trace ran on that filled cache and appended to it: the caller's cache grew
    # by a second prompt, and the piece guarded on a full cache served no prefill.
    fresh_counters()
    model, reference = make(Decoder)
    with pwd.attach(model, compile=False, store=False, trace="background") as handle:
        with torch.inference_mode():
            cache = Cache()
            x = torch.randn(2, PROMPT, WIDTH)
            model(x, cache)
            assert handle.wait_traced(60), handle.status()
            assert cache.length() == PROMPT
            _assert_same(_generate(model, 3), _generate(reference, 3))
        tracer = handle._tracer
        prefills = [r for r in tracer.misses.values() if f",{PROMPT},{WIDTH}]" in r.signature]
        assert prefills == [], tracer.misses  # the first piece serves every prefill
        assert handle.pieces[0].dispatcher.histogram().get(3) == 1  # (2: the trace's)


@pytest.mark.parametrize("trace", ["background", "inline"])
def test_a_decode_step_missed_again_after_its_trace_is_traced_until_served(trace: str) -> None:
    # The decode step's signature does not show the cache's length. Its first trace
    # pins the length it saw; later lengths miss, the signature goes hot again, and the
    # first of its calls that misses is traced: dynamo's automatic dynamic then makes the
    # length dynamic. Its piece is sized on the batch (the cache's keys carry the size
    # mark), so it serves every batch.
    fresh_counters()
    model, reference = make(Decoder)
    with pwd.attach(model, compile=False, store=False, trace=trace) as handle:
        tracer = handle._tracer
        misses: list[int] = []
        with torch.inference_mode():
            for _ in range(6):
                before = tracer.miss_calls
                _assert_same(_generate(model, 2), _generate(reference, 2))
                assert handle.wait_traced(60) and tracer.miss.traced.wait(60)
                misses.append(tracer.miss_calls - before)
            assert misses[-2:] == [0, 0], (misses, tracer.misses)
            for batch in (1, 5):  # other batches: no miss either
                _assert_same(_generate(model, batch), _generate(reference, batch))
        assert tracer.miss_calls == sum(misses), tracer.misses
        if trace == "inline":
            # Settling traced the real calls, the first decode steps among them, until
            # one captured nothing new: dynamo's automatic dynamic saw the length change.
            assert misses == [0] * len(misses), tracer.misses
        else:
            (record,) = tracer.misses.values()
            assert 2 <= record.traces <= MAX_TRACES_PER_SIGNATURE, record
            assert record.state in (MissState.TRACED, MissState.SERVED), record
        assert all(p.facts.size_symbols for p in handle.pieces), [p.facts for p in handle.pieces]
        sizes = set().union(*(p.dispatcher.histogram() for p in handle.pieces))
        assert {1, 5} <= sizes


def test_an_input_that_still_misses_after_its_traces_stays_eager_with_a_reason(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Each generation passes a cache whose tag differs: dynamo guards on the string, no
    # trace makes it dynamic, and the signature (which does not show it) misses for
    # good. After MAX_TRACES_PER_SIGNATURE traces it is given up, with a warning.
    fresh_counters()
    model, reference = make(Decoder)
    with pwd.attach(model, compile=False, store=False, trace="inline") as handle:
        tracer = handle._tracer
        with torch.inference_mode(), caplog.at_level(logging.INFO, logger="pwdaemon"):
            _generate(model, 2)
            for i in range(3 * (tracer.miss.hot_calls + 1) * MAX_TRACES_PER_SIGNATURE):
                tag = f"tag{i}"
                _assert_same(_generate(model, 2, tag=tag), _generate(reference, 2, tag=tag))
        states = {r.state for r in tracer.misses.values()}
        assert MissState.STILL_MISSED in states, tracer.misses
        given_up = [r for r in tracer.misses.values() if r.state is MissState.STILL_MISSED]
        assert all(r.traces == MAX_TRACES_PER_SIGNATURE for r in given_up)
        assert "still misses after 3 traces" in caplog.text


def test_a_calls_copy_keeps_what_dynamo_guards_on_and_shares_modules() -> None:
    module = nn.Linear(2, 2)
    with torch.inference_mode():
        inference = torch.ones(2, 3)
    grad = torch.ones(2, 3, requires_grad=True)
    cache = Cache([Layer(inference), Layer(grad)])
    shared = torch.zeros(2, 3)
    args, kwargs = copy_call((shared, [shared]), {"cache": cache, "module": module})
    copied = kwargs["cache"]
    assert copied is not cache and copied.layers[0] is not cache.layers[0]
    assert copied.layers[0].keys.is_inference() and not copied.layers[1].keys.is_inference()
    assert copied.layers[1].keys.requires_grad
    assert all(
        c.data_ptr() != o.data_ptr()
        for c, o in zip(
            (copied.layers[0].keys, copied.layers[1].keys, args[0]),
            (inference, grad, shared),
            strict=True,
        )
    )
    assert args[1][0] is args[0]  # one tensor referenced twice stays one tensor
    assert kwargs["module"] is module  # module state is live, never copied


def test_a_call_that_cannot_be_deep_copied_is_copied_at_the_top_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    lock = threading.Lock()  # deepcopy refuses a lock
    x = torch.ones(2)
    with caplog.at_level(logging.WARNING, logger="pwdaemon"):
        args, kwargs = copy_call((x,), {"lock": lock}, "Model")
    assert kwargs["lock"] is lock and args[0] is not x and torch.equal(args[0], x)
    assert "Model: a call's inputs could not be copied for tracing" in caplog.text


def test_a_call_holding_more_than_the_limit_is_not_copied() -> None:
    cache = Cache([Layer(torch.ones(64, 64))])  # 16 KiB
    assert copy_small_call((), {"cache": cache}, "Model", max_bytes=8 * 2**10) is None
    copied = copy_small_call((), {"cache": cache}, "Model", max_bytes=32 * 2**10)
    assert copied is not None and copied[1]["cache"] is not cache


class DictInput(nn.Module):
    """Called with one dict of tensors and no tensor argument."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(WIDTH, WIDTH)
        self.b = nn.Linear(WIDTH, WIDTH)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.a(batch["x"]) + self.b(batch["y"])


def test_a_model_called_with_a_dict_of_tensors_is_sized_on_its_batch() -> None:
    # No tensor argument set the size, so nothing was marked: the piece was pinned to
    # the first call's batch (no size symbol) and every other batch missed.
    fresh_counters()
    model, reference = make(DictInput)
    with pwd.attach(model, compile=False, store=False) as handle, torch.inference_mode():
        for n in (2, 3, 1, 7):
            batch = {"x": torch.randn(n, WIDTH), "y": torch.randn(n, WIDTH)}
            torch.testing.assert_close(model(batch), reference(batch))
        tracer = handle._tracer
        assert tracer.miss_calls == 0, tracer.misses
        (piece,) = handle.pieces
        assert piece.facts.size_symbols and piece.specializable, piece.facts
        assert piece.dispatcher.histogram() == {2: 1, 3: 1, 1: 1, 7: 1}


def test_a_signature_shows_the_items_of_a_calls_dicts_and_lists() -> None:
    fresh_counters()
    model, _ = make(DictInput)
    with pwd.attach(model, compile=False, store=False) as handle:
        marks = handle._tracer.marks
        x, y = torch.randn(3, WIDTH), torch.randn(3, WIDTH, dtype=torch.float64)
        sig = marks.signature(({"x": x, "y": [y, 2]},), {})
    assert sig.startswith("n>1 "), sig
    assert f"0.x:torch.float32:cpu:[n,{WIDTH}]:c" in sig
    assert f"0.y.0:torch.float64:cpu:[n,{WIDTH}]:c" in sig and "0.y.1=2" in sig


@pytest.mark.parametrize("before_2_12", [True, False])
def test_before_torch_2_12_a_calls_other_dims_of_size_1_are_traced_static(
    before_2_12: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    # torch 2.11 handed attention a SymBool `is_causal` once automatic dynamic made a
    # decode step's length 1 a symbol (marks.py says how); there the tensor arguments'
    # other size-1 dims stay static. Not the size dim (a call of size 1), not a tensor
    # inside the call's objects, and on torch 2.12 and later nothing.
    from pwdaemon.serving import marks
    from pwdaemon.serving.strategy import ShapeStrategy

    monkeypatch.setattr(marks, "_ONES_STATIC", before_2_12)
    sizes = marks.SizeMarks(Decoder(), None, "test")
    x, one = torch.randn(3, 1, WIDTH), torch.randn(1, 1, WIDTH)
    cache = Cache([Layer(torch.randn(3, 1, WIDTH))])
    for t in (x, one):
        sizes.mark((t,), {"cache": cache}, ShapeStrategy.BACKED_OBLIVIOUS)
    want = {1} if before_2_12 else set()
    assert getattr(x, "_dynamo_static_indices", set()) == want
    assert getattr(one, "_dynamo_static_indices", set()) == want  # dim 0 is the size
    assert getattr(cache.layers[0].keys, "_dynamo_static_indices", set()) == set()
