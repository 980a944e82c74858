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


def _frozen(canary: list[object]) -> bool:
    """Whether `canary` sits in the permanent generation: every other tracked object is in
    `gc.get_objects()`. (Counts are no proof: frozen objects are still freed when their
    last reference goes, so the count can drop by a few while nothing was unfrozen.)"""
    assert gc.is_tracked(canary)
    return all(o is not canary for o in gc.get_objects())


def _attach(**kwargs: object) -> pwd.Handle:
    return pwd.attach(nn.Linear(4, 4), compile=False, store=False, **kwargs)  # type: ignore[arg-type]


def test_an_attached_model_freezes_the_heap_and_the_last_detach_unfreezes_it(
    unfrozen: None,
) -> None:
    canary: list[object] = []
    assert not _frozen(canary)
    first, second = _attach(), _attach()
    # A full collection walks none of it (what a serving call waited 190-510 ms for).
    assert gc.get_freeze_count() > 10_000
    assert _frozen(canary)
    first.detach()
    assert _frozen(canary)  # the second still holds it
    second.detach()
    assert gc.get_freeze_count() == 0
    assert not _frozen(canary)


def test_what_the_process_froze_itself_stays_frozen(unfrozen: None) -> None:
    canary: list[object] = []
    gc.freeze()  # a server that froze before forking its workers
    _attach().detach()
    assert _frozen(canary)


def test_freeze_heap_false_leaves_the_collector_alone(unfrozen: None) -> None:
    _attach(freeze_heap=False).detach()
    assert gc.get_freeze_count() == 0


def test_refreeze_freezes_only_while_held(unfrozen: None) -> None:
    heap = FrozenHeap()
    heap.refreeze()
    assert gc.get_freeze_count() == 0
    heap.hold()
    canary: list[object] = []  # made after the hold's freeze
    assert not _frozen(canary)
    heap.refreeze()
    assert _frozen(canary)
    heap.release()
    heap.release()  # one release too many is a no-op
    assert gc.get_freeze_count() == 0
