"""Bad input gets what eager gives (issue 11), and serving carries on afterwards.

Proves, for each odd request after the model settled under `torch.inference_mode()`: a
wrong dtype, wrong rank, wrong feature size, size 0, a size past every configured range,
a non-contiguous tensor, grad enabled after capture, weights changed in place and by
`load_state_dict` after attach: pwdaemon raises the exception type eager raises (never
one of dynamo's wrappers or pwdaemon's own), or returns what eager returns (values,
dtype, shape, requires_grad; float32 within 1e-5). No piece is captured for it (it runs
eager as a miss, or through the piece where its guards hold), and a normal call
afterwards is still served by the compiled runnables installed before (tagged, so the
test sees which one ran).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon import Range, Tier
from pwdaemon.serving.piece import wrap_compiled

WIDTH = 8
RANGE = Range(1, 8)  # the configured range; the general entry serves the rest


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(WIDTH, 16)
        self.b = nn.Linear(16, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _in_place(model: nn.Module) -> None:
    assert isinstance(model, Net)
    with torch.no_grad():
        model.a.weight.mul_(-2)


def _loaded(model: nn.Module) -> None:
    torch.manual_seed(123)
    model.load_state_dict(Net().state_dict())


@dataclass(frozen=True)
class Case:
    make_input: Callable[[], torch.Tensor]
    grad: bool = False  # call with grad enabled (outside inference mode)
    change: Callable[[nn.Module], None] | None = None  # applied to model and reference


CASES = {
    "wrong dtype": Case(lambda: torch.randn(4, WIDTH, dtype=torch.float64)),
    "wrong rank": Case(lambda: torch.randn(2, 4, WIDTH)),
    "rank 1": Case(lambda: torch.randn(WIDTH)),
    "wrong feature size": Case(lambda: torch.randn(4, WIDTH + 1)),
    "size 0": Case(lambda: torch.randn(0, WIDTH)),
    "size past every range": Case(lambda: torch.randn(50, WIDTH)),
    "non-contiguous": Case(lambda: torch.randn(WIDTH, 5).t()),
    "grad enabled after capture": Case(lambda: torch.randn(4, WIDTH), grad=True),
    "weights changed in place": Case(lambda: torch.randn(4, WIDTH), change=_in_place),
    "weights loaded by load_state_dict": Case(lambda: torch.randn(4, WIDTH), change=_loaded),
}


@pytest.fixture
def served() -> Iterator[tuple[nn.Module, nn.Module, pwd.Handle, dict[str, int]]]:
    torch.manual_seed(0)
    model = Net().eval()
    reference = copy.deepcopy(model)
    handle = pwd.attach(model, compile=False, store=False)
    for n in (2, 3):  # tensors made outside inference mode, like every input below
        x = torch.randn(n, WIDTH)
        with torch.inference_mode():
            model(x)
    assert len(handle.pieces) == 1 and handle._tracer.settled
    piece = handle.pieces[0]
    hits = {"range": 0, "general": 0}

    def tagged(label: str) -> Callable[..., Any]:
        eager = piece.gm.forward

        def run(*args: Any) -> Any:
            hits[label] += 1
            return eager(*args)

        return wrap_compiled(run, piece)

    # Stand-ins for compiled runnables: the piece's own graph, counting its calls.
    handle.install(0, RANGE, Tier.RANGE, tagged("range"))
    handle.install(0, None, Tier.GENERAL, tagged("general"))
    try:
        yield model, reference, handle, hits
    finally:
        handle.detach()


def _outcome(fn: Callable[[], torch.Tensor]) -> torch.Tensor | BaseException:
    try:
        return fn()
    except Exception as exc:
        return exc


def _call(model: nn.Module, x: torch.Tensor, grad: bool) -> torch.Tensor:
    if grad:
        with torch.enable_grad():
            out: torch.Tensor = model(x)
            return out
    with torch.inference_mode():
        out = model(x)
        return out


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gets_what_eager_gives(
    name: str, served: tuple[nn.Module, nn.Module, pwd.Handle, dict[str, int]]
) -> None:
    model, reference, handle, hits = served
    case = CASES[name]
    if case.change is not None:
        case.change(model)
        case.change(reference)
    x = case.make_input()
    got = _outcome(lambda: _call(model, x, case.grad))
    want = _outcome(lambda: _call(reference, x, case.grad))
    if isinstance(want, BaseException):
        assert type(got) is type(want), f"eager raised {want!r}, pwdaemon gave {got!r}"
    else:
        assert isinstance(got, torch.Tensor), f"eager returned, pwdaemon raised {got!r}"
        assert got.shape == want.shape and got.dtype == want.dtype
        assert got.requires_grad == want.requires_grad
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    tracer = handle._tracer
    assert len(handle.pieces) == 1, f"{name} captured a piece"
    for exc_type in tracer.errors.by_type:
        assert "dynamo" not in exc_type and "pwdaemon" not in exc_type
    # serving carries on, on the runnables installed before
    before = dict(hits)
    for n, label in ((4, "range"), (20, "general")):
        y = torch.randn(n, WIDTH)
        with torch.inference_mode():
            torch.testing.assert_close(model(y), reference(y), rtol=1e-5, atol=1e-5)
        assert hits[label] == before[label] + 1, f"size {n} not served by {label}"


def test_bad_input_type_is_what_eager_raises_not_dynamos() -> None:
    # The case issue 11 saw: dynamo's TorchRuntimeError where eager raises RuntimeError.
    torch.manual_seed(0)
    model = Net().eval()
    with pwd.attach(model, compile=False, store=False), torch.inference_mode():
        model(torch.randn(3, WIDTH))
        model(torch.randn(5, WIDTH))
        with pytest.raises(RuntimeError) as info:
            model(torch.randn(3, WIDTH + 1))
        assert type(info.value) is RuntimeError
