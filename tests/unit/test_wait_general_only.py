"""`handle.wait(sizes=...)` counts the pieces without a size of their own that serve a size.

Such a piece (pinned to the size it was captured at, or sized by other symbols as well)
serves that size on its general compile, the best it gets. A wait ignored it: GPT-2
sized on its sequence dim serves length 1 with pieces pinned to it, and a wait for length
1 ran to its timeout; and a size was reported served while a piece its calls run
through had failed. Fake executor: compiles are the graph run eagerly, in-process.
"""

from __future__ import annotations

import copy

import torch
from conftest import Tokens
from torch import nn

import pwdaemon as pwd
from pwdaemon.testing import FakeExecutor

TIMEOUT = 60.0


def _attach(executor: FakeExecutor) -> tuple[nn.Module, nn.Module, pwd.Handle]:
    torch.manual_seed(0)
    model = Tokens().eval()
    reference = copy.deepcopy(model)
    handle = pwd.attach(model, sizes=[2], executor=executor, store=False, trace="inline")
    with torch.inference_mode():
        for length in (3, 4, 5):  # batch 2 throughout: the lengths get a symbol too
            model(input_ids=torch.randint(0, 50, (2, length)))
    return model, reference, handle


def _general_only(handle: pwd.Handle) -> int:
    (index,) = (p.index for p in handle.pieces if not p.specializable)
    return index


def test_a_wait_for_a_size_waits_for_the_general_of_a_piece_without_its_own_size() -> None:
    model, reference, handle = _attach(FakeExecutor())
    try:
        assert handle.wait(sizes=[2], timeout=TIMEOUT, tier=pwd.Tier.SIZE), str(handle.status())
        other = _general_only(handle)
        (status,) = (s for s in handle.status().pieces if s.graph == other)
        general = next(e for e in status.entries if e.target == "general")
        assert general.state == "live", str(handle.status())
        with torch.inference_mode():
            ids = torch.randint(0, 50, (2, 6))
            torch.testing.assert_close(model(input_ids=ids), reference(ids))
    finally:
        handle.detach()


def test_a_size_whose_general_only_piece_failed_is_not_reported_served() -> None:
    # Every general fails: the batch-sized piece still gets size 2, the other has nothing.
    _, _, handle = _attach(FakeExecutor(fail={"general": "failed"}))
    try:
        assert not handle.wait(sizes=[2], timeout=TIMEOUT, tier=pwd.Tier.SIZE)
        assert handle.wait(timeout=TIMEOUT)  # the plan itself ends
        sized = [p for p in handle.pieces if p.specializable]
        assert sized and all(p.dispatcher.table.lookup(2).tier.value == "size" for p in sized)
    finally:
        handle.detach()
