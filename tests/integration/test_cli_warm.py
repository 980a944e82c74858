"""`pwdaemon warm` compiles into the store ahead of time; a later attach only loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import pwdaemon as pwd
from pwdaemon.cli.warm import load_object

pytestmark = pytest.mark.slow
HERE = Path(__file__).resolve().parent.parent  # factories.py lives in tests/


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "pwdaemon", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def test_warm_then_attach_serves_specialized_without_compiling(tmp_path: Path) -> None:
    # For a server on another torch thread count than torch's default: CPU artifacts
    # are compiled and keyed for the count (`--threads`), so the attach below, on that
    # count, finds them.
    store = tmp_path / "store"
    threads = torch.get_num_threads() + 1
    r = _cli(
        "warm",
        "factories:small_mlp",
        "--sizes",
        "2,3",
        "--inputs",
        "factories:small_inputs",
        "--dir",
        str(store),
        "--threads",
        str(threads),
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "general" in r.stdout and "compiled" in r.stdout
    ls = _cli("cache", "ls", "--dir", str(store), "--json")
    assert ls.returncode == 0, ls.stderr
    targets = sorted(e["target"] for e in json.loads(ls.stdout)["artifacts"])
    assert targets == ["general", "size:2", "size:3"]

    sys.path.insert(0, str(HERE))
    from factories import small_inputs, small_mlp

    model, ref = small_mlp(), small_mlp()
    default_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    h = pwd.attach(model, store=store, policy=pwd.PolicyConfig(hot_calls=10**9))
    try:
        model(small_inputs(2))  # capture; 3 is never called
        assert h.wait(sizes=[2, 3], timeout=60), str(h.status())
        assert dict(h.engine.loads_by_source) == {"store": 3}
        for n in (2, 3, 5):
            x = small_inputs(n)
            torch.testing.assert_close(model(x), ref(x), atol=1e-4, rtol=1e-4)
    finally:
        h.detach()
        torch.set_num_threads(default_threads)


def test_warm_reports_bad_factories() -> None:
    with pytest.raises(ValueError, match="expected MODULE:NAME"):
        load_object("no_colon")
    with pytest.raises(ValueError, match="cannot import"):
        load_object("no_such_module_xyz:f")
    r = _cli("warm", "factories:small_mlp", "--sizes", "2")
    assert r.returncode == 2 and "example_inputs" in r.stdout
