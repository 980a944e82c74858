"""A kernel left truncated in Inductor's cache (a compile killed while g++ wrote it) is
rebuilt by the next compile that needs it: real workers, real Inductor, real g++."""

from __future__ import annotations

import copy
import ctypes
import logging
import shutil
from pathlib import Path

import pytest
import torch

import pwdaemon as pwd

pytestmark = pytest.mark.slow


def _kernels(store: Path) -> list[Path]:
    return sorted((store / "inductor").rglob("*.so"))


def test_a_kernel_left_truncated_in_the_cache_is_rebuilt_and_its_compile_goes_live(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from conftest import SmallMLP

    torch.manual_seed(0)
    model = SmallMLP().eval()
    reference = copy.deepcopy(model)
    x = torch.randn(3, 16)
    compiler = pwd.CompileConfig(workers=1)
    first = tmp_path / "first"
    with pwd.attach(model, sizes=[3], store=first, compiler=compiler) as handle:
        model(x)
        assert handle.wait(timeout=300), str(handle.status())
    kernels = _kernels(first)
    assert kernels, "CPU kernels must live in the store's Inductor cache"
    # A second store whose Inductor cache is the first's with every kernel cut short, as
    # a link step killed midway leaves it; no artifact in it, so its workers compile
    # again and Inductor finds the kernels' files there (it skips a build where the file
    # exists).
    second = tmp_path / "second"
    shutil.copytree(first / "inductor", second / "inductor")
    for path in _kernels(second):
        path.write_bytes(path.read_bytes()[:64])
    torch._dynamo.reset()
    model2 = copy.deepcopy(reference)
    caplog.set_level(logging.WARNING, logger="pwdaemon")
    with pwd.attach(model2, sizes=[3], store=second, compiler=compiler) as handle:
        model2(x)
        assert handle.wait(timeout=300), str(handle.status())
        status = handle.status()
        entries = {e.target: e for p in status.pieces for e in p.entries}
        assert entries["size:3"].state is pwd.JobState.LIVE, str(status)
        assert entries["general"].state is pwd.JobState.LIVE, str(status)
        assert handle.table(0).exact[3].tier is pwd.Tier.SIZE
        assert torch.allclose(model2(x), reference(x), atol=1e-5)  # served by size 3's
    notes = [r.getMessage() for r in caplog.records if " rebuilt " in r.getMessage()]
    assert notes, [r.getMessage() for r in caplog.records]
    rebuilt = [p for p in _kernels(second) if any(f" rebuilt {p.name}" in n for n in notes)]
    assert rebuilt, notes
    for path in rebuilt:
        ctypes.CDLL(str(path))  # whole again: it loads (the other cut files stay cut)
