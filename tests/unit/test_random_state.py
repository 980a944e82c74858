"""A trace on pwdaemon's thread leaves other threads' random draws drawn
(`pwdaemon.serving.random_state`): real dynamo traces, held open by their backend while
the serving thread draws from torch's generator and Python's `random`."""

from __future__ import annotations

import contextlib
import random
import threading
from collections.abc import Callable
from typing import Any

import pytest
import torch

from pwdaemon.serving import strategy

WAIT_S = 30.0


def _draws() -> tuple[list[float], list[float]]:
    return [random.random() for _ in range(3)], [torch.rand(1).item() for _ in range(3)]


def _trace_while_this_thread_draws(
    around: Callable[[], contextlib.AbstractContextManager[Any]],
) -> tuple[tuple[list[float], list[float]], tuple[float, float]]:
    """A dynamo trace on another thread inside `around()`, held open by its backend
    while this thread draws; returns the draws and the next draw of each after it."""
    inside, drawn = threading.Event(), threading.Event()
    errors: list[BaseException] = []

    def backend(gm: torch.fx.GraphModule, example: Any) -> Any:
        inside.set()
        assert drawn.wait(WAIT_S)
        return gm.forward

    def trace() -> None:
        try:
            with around():
                torch._dynamo.reset()
                torch.compile(lambda x: x * 2, backend=backend)(torch.ones(3))
        except BaseException as exc:  # reported on the test's thread
            errors.append(exc)
            inside.set()

    random.seed(0)
    torch.manual_seed(0)
    thread = threading.Thread(target=trace)
    thread.start()
    assert inside.wait(WAIT_S)
    during = _draws()
    drawn.set()
    thread.join(WAIT_S)
    assert not thread.is_alive() and not errors, errors
    return during, (random.random(), torch.rand(1).item())


@pytest.mark.parametrize("around", ["kept", "tracing"])
def test_draws_made_during_a_trace_inside_it_stay_drawn(around: str) -> None:
    def block() -> contextlib.AbstractContextManager[Any]:
        if around == "kept":
            from pwdaemon.serving import random_state

            return random_state.kept()
        return strategy.tracing(strategy.ShapeStrategy.UNBACKED)  # pwdaemon's traces

    (py, tr), (py_next, tr_next) = _trace_while_this_thread_draws(block)
    random.seed(0)
    torch.manual_seed(0)
    py_all, tr_all = [random.random() for _ in range(4)], [torch.rand(1).item() for _ in range(4)]
    assert ([*py, py_next], [*tr, tr_next]) == (py_all, tr_all)  # one stream, not rewound


def test_a_trace_outside_it_still_sets_the_state_back_as_torch_does() -> None:
    from pwdaemon.serving import random_state

    random_state.install()  # the wrappers are in place, and call through here
    (py, tr), (py_next, tr_next) = _trace_while_this_thread_draws(contextlib.nullcontext)
    assert py_next == py[0] and tr_next == tr[0]  # rewound: dynamo's own behaviour
