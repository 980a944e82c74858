"""workers/kernel_cache.py: which files a failed compile may remove, and its one retry
(the real rebuild: tests/integration/test_truncated_kernel.py)."""

from __future__ import annotations

import _ctypes
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pwdaemon.workers import kernel_cache


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "inductor"
    (root / "o5").mkdir(parents=True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(root))
    return root.resolve()


def _cut_kernel(cache: Path, name: str = "co55x.main.so") -> Path:
    path = cache / "o5" / name
    path.write_bytes(b"\x7fELF\x02\x01\x01")  # an ELF header cut short
    return path


def _failing(times: int, error: Callable[[], Exception]) -> Callable[[], tuple[Any, str]]:
    calls = {"n": 0}

    def compile_once() -> tuple[Any, str]:
        calls["n"] += 1
        if calls["n"] <= times:
            raise error()
        return "artifact", ""

    return compile_once


def test_a_truncated_kernel_the_failure_names_is_removed_and_the_compile_tried_again(
    cache: Path,
) -> None:
    kernel = _cut_kernel(cache)

    def inductor_error() -> Exception:
        try:
            raise ImportError(f"{kernel}: file too short")
        except ImportError as inner:
            return RuntimeError(f"InductorError: {inner!r}")  # chained as Inductor does

    artifact, note = kernel_cache.compile_past_broken_kernels(_failing(1, inductor_error))
    assert artifact == "artifact"
    assert not kernel.exists()
    assert note.startswith(f"rebuilt {kernel.name}: ")


def test_the_retry_is_tried_once_and_its_failure_is_the_compiles(cache: Path) -> None:
    kernel = _cut_kernel(cache)
    with pytest.raises(ImportError, match="file too short"):
        kernel_cache.compile_past_broken_kernels(
            _failing(2, lambda: ImportError(f"{kernel}: file too short"))
        )


def test_a_file_outside_the_cache_is_never_removed(cache: Path, tmp_path: Path) -> None:
    outside = tmp_path / "user.so"
    outside.write_bytes(b"\x7fELF")
    with pytest.raises(ImportError):
        kernel_cache.compile_past_broken_kernels(
            _failing(1, lambda: ImportError(f"{outside}: file too short"))
        )
    assert outside.exists()


def test_a_named_kernel_that_loads_is_kept_and_the_compile_tried_again(cache: Path) -> None:
    # Another worker rebuilt it since this compile failed on it: it loads, so it stays.
    whole = cache / "o5" / "whole.so"
    shutil.copy(_ctypes.__file__, whole)  # a real shared object
    failing = _failing(1, lambda: ImportError(f"{whole}: undefined symbol: f"))
    assert kernel_cache.compile_past_broken_kernels(failing) == ("artifact", "")
    assert whole.exists()


def test_an_error_naming_no_kernel_is_raised_as_it_was(cache: Path) -> None:
    with pytest.raises(ValueError, match="no kernel here"):
        kernel_cache.compile_past_broken_kernels(_failing(1, lambda: ValueError("no kernel here")))


def test_the_upstream_note_is_kept_beside_the_rebuilds(cache: Path) -> None:
    kernel = _cut_kernel(cache)
    calls = {"n": 0}

    def compile_once() -> tuple[Any, str]:
        calls["n"] += 1
        if calls["n"] == 1:
            raise ImportError(f"{kernel}: invalid ELF header")
        return "artifact", "compiled without asserts"

    _, note = kernel_cache.compile_past_broken_kernels(compile_once)
    assert note.startswith(f"compiled without asserts; rebuilt {kernel.name}")
