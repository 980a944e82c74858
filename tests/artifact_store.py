"""Shared by the artifact store's tests (tests/unit/test_artifacts.py,
test_store_claims_and_watch.py): keys with fixed versions, random artifacts, a settable
clock, a spawn context for the tests that race real processes."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from pwdaemon.store import ArtifactKey, make_key

WAIT_S = 20.0  # upper bound for anything asynchronous; a pass takes far less


def key_for(graph: str = "graph-code", target: str = "size:8", **kw: object) -> ArtifactKey:
    """A key with explicit versions so tests do not depend on the environment."""
    params: dict[str, object] = {
        "device": "cpu",
        "options": {"max_autotune": False},
        "torch_version": "2.13.0+cpu",
        "triton_version": "none",
    }
    params.update(kw)
    return make_key(graph, target, **params)  # type: ignore[arg-type]


def fake_artifact(tmp_path: Path, size: int = 4096, name: str = "src.bin") -> Path:
    path = tmp_path / name
    path.write_bytes(os.urandom(size))
    return path


class Clock:
    """A settable clock for created/last-used times."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def spawn() -> multiprocessing.context.SpawnContext:
    return multiprocessing.get_context("spawn")


def corrupt_flip(path: Path) -> None:
    """Flip one byte in the middle of `path` (a stored artifact's checksum then fails)."""
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
