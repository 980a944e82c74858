"""The frozen heap: objects alive while models are attached stay out of collections."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest
from torch import nn

import pwdaemon as pwd
from pwdaemon.serving.heap import FrozenHeap


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()  # an earlier test's handle may still hold it: start from nothing
    try:
        yield
    finally:
        gc.unfreeze()


def _attach(**kwargs: object) -> pwd.Handle:
    return pwd.attach(nn.Linear(4, 4), compile=False, store=False, **kwargs)  # type: ignore[arg-type]


def test_an_attached_model_freezes_the_heap_and_the_last_detach_unfreezes_it(
    unfrozen: None,
) -> None:
    first, second = _attach(), _attach()
    frozen = gc.get_freeze_count()
    # A full collection walks none of it (what a serving call waited 190-510 ms for).
    assert frozen > 10_000
    first.detach()
    assert gc.get_freeze_count() >= frozen  # the second still holds it
    second.detach()
    assert gc.get_freeze_count() == 0


def test_what_the_process_froze_itself_stays_frozen(unfrozen: None) -> None:
    gc.freeze()  # a server that froze before forking its workers
    before = gc.get_freeze_count()
    _attach().detach()
    assert gc.get_freeze_count() >= before


def test_freeze_heap_false_leaves_the_collector_alone(unfrozen: None) -> None:
    _attach(freeze_heap=False).detach()
    assert gc.get_freeze_count() == 0


def test_refreeze_freezes_only_while_held(unfrozen: None) -> None:
    heap = FrozenHeap()
    heap.refreeze()
    assert gc.get_freeze_count() == 0
    heap.hold()
    kept = [object() for _ in range(10)]  # noqa: F841 - alive across the refreeze
    before = gc.get_freeze_count()
    heap.refreeze()
    assert gc.get_freeze_count() >= before
    heap.release()
    heap.release()  # one release too many is a no-op
    assert gc.get_freeze_count() == 0
