"""Direct calls (`attach(guards="rechecked")`): a signature served before skips dynamo.

Proves, with real dynamo on this CPU: a signature one piece served goes on the direct
path and its outputs equal eager's (plain module and transformers' BERT, two sizes each);
a change to the module's Python state is seen at the next guard recheck (the entry is
dropped, the call goes through dynamo, outputs follow the change); a direct call that
raises is made again through dynamo; a graph break keeps the signature on dynamo's path;
calls with grad on, one tensor passed twice or an argument of another type get no key;
a detach clears the direct path; status() shows signatures, calls and what left.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from conftest import Broken, Plain
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.direct import DirectEntry, DropReason, call_key

TOL: dict[str, Any] = {"atol": 1e-5, "rtol": 1e-5}


def _attach(model: nn.Module) -> pwd.Handle:
    return pwd.attach(model, compile=False, trace="inline", store=False, guards="rechecked")


def _registered(h: pwd.Handle, model: nn.Module, x: torch.Tensor) -> DirectEntry:
    """Call `model` on `x` until its signature is on the direct path; its one entry."""
    for _ in range(3):  # trace, settle, then registered
        model(x)
    direct = h._tracer.direct
    assert direct is not None
    (entry,) = direct.entries.values()
    return entry


class Scaled(nn.Module):
    """A Python attribute the forward reads: dynamo guards on its value."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_a_signature_served_before_runs_without_dynamo_and_equals_eager() -> None:
    torch.manual_seed(0)
    model = Plain()
    ref = copy.deepcopy(model)
    with torch.inference_mode(), _attach(model) as h:
        direct = h._tracer.direct
        assert direct is not None
        model(torch.randn(4, 8))
        model(torch.randn(4, 8))  # settled: this call captured nothing new
        for n in (4, 4, 4, 7, 7, 7):
            x = torch.randn(n, 8)
            torch.testing.assert_close(model(x), ref(x), **TOL)
        assert len(direct.entries) == 2  # one per size: shapes are part of the key
        # After settling, the first call of each size went through dynamo; 2 more each
        assert sum(e.calls for e in direct.entries.values()) == 4
        assert h.pieces[0].dispatcher.counts[7] == 3  # the piece served every call
        st = h.status()
        assert st.trace.direct_signatures == 2 and st.trace.direct_calls == 4
        assert "direct calls: 2 signature(s), 4 call(s)" in str(st)
    assert not direct.entries  # a detach clears the direct path


def test_a_changed_module_attribute_reaches_direct_calls_at_the_recheck() -> None:
    torch.manual_seed(0)
    model = Scaled()
    ref = copy.deepcopy(model)
    x = torch.randn(4, 8)
    with torch.inference_mode(), _attach(model) as h:
        entry = _registered(h, model, x)
        direct = h._tracer.direct
        assert direct is not None
        model.scale = ref.scale = 3.0
        entry.recheck_at = 0.0  # the recheck is due (instead of waiting 0.5 s)
        torch.testing.assert_close(model(x), ref(x), **TOL)
        assert direct.dropped == {DropReason.GUARDS_FAILED: 1}
        assert f"left it ({DropReason.GUARDS_FAILED.value}) x1" in str(h.status())
        torch.testing.assert_close(model(x), ref(x), **TOL)  # registered again, new code


def test_a_direct_call_that_raises_is_made_again_through_dynamo() -> None:
    torch.manual_seed(0)
    model = Plain()
    ref = copy.deepcopy(model)
    x = torch.randn(3, 8)
    with torch.inference_mode(), _attach(model) as h:
        entry = _registered(h, model, x)
        direct = h._tracer.direct
        assert direct is not None

        def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("injected")

        entry.fn = broken
        torch.testing.assert_close(model(x), ref(x), **TOL)
        assert direct.dropped == {DropReason.RAISED: 1}


def test_a_graph_break_keeps_the_call_on_dynamos_path() -> None:
    torch.manual_seed(0)
    model = Broken()
    ref = copy.deepcopy(model)
    x = torch.randn(5, 8)
    with torch.inference_mode(), _attach(model) as h:
        for _ in range(3):
            torch.testing.assert_close(model(x), ref(x), **TOL)
        direct = h._tracer.direct
        assert direct is not None
        assert not direct.entries
        assert len(direct.refused) == 1
        assert "graph break" in next(iter(direct.refused.values()))


def test_calls_the_direct_path_cannot_tell_apart_get_no_key() -> None:
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    with torch.no_grad():
        assert call_key((x, y), {}) is not None
        assert call_key((x, x), {}) is None  # dynamo dedups a tensor passed twice
        assert call_key((x, [1]), {}) is None  # a list: compared by value by dynamo
        assert call_key((x,), {"k": 1}) != call_key((x,), {"k": 2})
        assert call_key((x,), {}) != call_key((x.t().contiguous().t(),), {})  # strides
    with torch.inference_mode():
        assert call_key((x,), {}) != call_key((torch.randn(2, 8),), {})  # inference tensor
    with torch.enable_grad():
        assert call_key((x,), {}) is None  # grad on: the call goes through dynamo


@pytest.mark.parametrize("name", ["bert"])
def test_a_transformers_model_on_the_direct_path_equals_eager(name: str) -> None:
    pytest.importorskip("transformers")
    from pwdaemon.real_models import model_spec

    spec = model_spec(name)
    model = spec.build(torch.device("cpu"), torch.float32)
    ref = copy.deepcopy(model)
    with torch.inference_mode(), _attach(model) as h:
        # Torch < 2.13 traces BERT's size 1 as a piece of its own (strategy.py): it
        # settles a call later, and its signatures reach the direct path a call later.
        for n in (1, 4) * 4:
            args, kwargs = spec.inputs(n, torch.device("cpu"), torch.float32)
            out, want = model(*args, **kwargs), ref(*args, **kwargs)
            assert type(out) is type(want)
            torch.testing.assert_close(out.last_hidden_state, want.last_hidden_state, **TOL)
        direct = h._tracer.direct
        assert direct is not None
        assert len(direct.entries) == 2  # sizes 1 and 4
        assert sum(e.calls for e in direct.entries.values()) >= 2
