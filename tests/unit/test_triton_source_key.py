"""Triton's source key replayed from the store's record (`pwdaemon.workers.triton_source_key`),
on a stand-in Triton: a real directory of files and a real lru_cache'd key function."""

from __future__ import annotations

import functools
import os
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from pwdaemon.workers import prewarm, triton_source_key
from pwdaemon.workers.setup_record import SetupRecord

VERSION = "9.9.0"


def _triton_dir(tmp_path: Path) -> Path:
    root = tmp_path / "triton"
    (root / "compiler").mkdir(parents=True)
    (root / "_C").mkdir()
    (root / "__init__.py").write_text(f"__version__ = {VERSION!r}\n")
    (root / "compiler" / "compiler.py").write_text("def compile(): ...\n")
    (root / "_C" / "libtriton.so").write_bytes(b"\x7fELF" + b"\0" * 64)
    return root


# The stand-in key function's state: module globals, not a closure (Triton's own
# `triton_key` has none, and a function with one is left alone).
_root = Path()
_computed: list[str] = []


def _hash_files() -> str:
    _computed.append("hashed")
    sizes = sorted(str(p.stat().st_size) for p in _root.rglob("*") if p.is_file())
    return VERSION + "-" + "-".join(sizes)


def _key_function(root: Path, computed: list[str]) -> Callable[[], object]:
    """A fresh `triton_key` (Triton's shape: a zero-argument function behind an
    lru_cache), as in a new process, hashing `root`'s files and noting it in `computed`."""
    global _root, _computed
    _root, _computed = root, computed
    return functools.lru_cache(_hash_files)


def _record(tmp_path: Path) -> SetupRecord:
    return SetupRecord(tmp_path / "inductor" / "pwdaemon-setup" / "triton-key.json")


def test_a_recorded_key_is_replayed_in_the_next_process_without_hashing(tmp_path: Path) -> None:
    root = _triton_dir(tmp_path)
    first: list[str] = []
    key = triton_source_key.prime(_key_function(root, first), str(root), VERSION, _record(tmp_path))
    assert first == ["hashed"]
    # The next process: a fresh function (an empty cache), the same files and record.
    computed: list[str] = []
    key_fn = _key_function(root, computed)
    replayed = triton_source_key.prime(key_fn, str(root), VERSION, _record(tmp_path))
    assert replayed == key and computed == []
    assert key_fn() == key and computed == []  # Triton's own later calls: the cached key
    # The function's real body is back: with its cache cleared it hashes again.
    key_fn.cache_clear()  # type: ignore[attr-defined]
    assert key_fn() == key and computed == ["hashed"]


def test_a_changed_triton_file_is_hashed_again(tmp_path: Path) -> None:
    root = _triton_dir(tmp_path)
    triton_source_key.prime(_key_function(root, []), str(root), VERSION, _record(tmp_path))
    library = root / "_C" / "libtriton.so"
    library.write_bytes(library.read_bytes() + b"\0")  # another Triton build, same name
    computed: list[str] = []
    key_fn = _key_function(root, computed)
    key = triton_source_key.prime(key_fn, str(root), VERSION, _record(tmp_path))
    assert computed == ["hashed"] and key == key_fn.__wrapped__()  # type: ignore[attr-defined]


def test_an_upgraded_triton_with_the_same_files_is_hashed_again(tmp_path: Path) -> None:
    root = _triton_dir(tmp_path)
    triton_source_key.prime(_key_function(root, []), str(root), VERSION, _record(tmp_path))
    computed: list[str] = []
    triton_source_key.prime(_key_function(root, computed), str(root), "10.0.0", _record(tmp_path))
    assert computed == ["hashed"]


def test_without_a_record_the_key_is_computed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert triton_source_key.record_for_environment() is None
    root = _triton_dir(tmp_path)
    computed: list[str] = []
    triton_source_key.prime(_key_function(root, computed), str(root), VERSION, None)
    assert computed == ["hashed"]
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    record = triton_source_key.record_for_environment()
    assert record is not None and record.path == _record(tmp_path).path


def test_a_key_function_of_another_shape_is_left_as_it_is(tmp_path: Path) -> None:
    # No lru_cache (nothing to fill), or arguments (not Triton's zero-argument key).
    computed: list[str] = []

    def uncached() -> str:
        computed.append("hashed")
        return "key"

    @functools.lru_cache
    def with_argument(salt: str = "") -> str:
        return "key" + salt

    assert not triton_source_key.fill_cache(uncached, "recorded")
    assert not triton_source_key.fill_cache(with_argument, "recorded")
    assert with_argument() == "key" and computed == []


def test_a_recorded_key_is_kept_in_a_file_readable_by_other_users(tmp_path: Path) -> None:
    root = _triton_dir(tmp_path)
    record = _record(tmp_path)
    triton_source_key.prime(_key_function(root, []), str(root), VERSION, record)
    assert os.stat(record.path).st_mode & 0o777 == 0o644


def test_on_a_gpu_the_pre_warm_replays_the_key_its_store_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wiring: the pre-warm's thread finds Triton's directory and version and the
    # record beside the Inductor cache that attach() named in the environment.
    root = _triton_dir(tmp_path)
    package = types.ModuleType("triton")
    package.__file__ = str(root / "__init__.py")
    package.__version__ = VERSION  # type: ignore[attr-defined]
    cache = types.ModuleType("triton.runtime.cache")
    for name, module in (
        ("triton", package),
        ("triton.runtime", types.ModuleType("triton.runtime")),
        ("triton.runtime.cache", cache),
    ):
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    runs: list[list[str]] = []
    for _ in range(2):  # two processes, one after the other
        computed: list[str] = []
        key_fn = _key_function(root, computed)
        cache.triton_key = key_fn  # type: ignore[attr-defined]
        thread = prewarm.start_triton_key()
        assert thread is not None
        thread.join(30)
        assert key_fn.cache_info().currsize == 1  # type: ignore[attr-defined]
        runs.append(computed)
    assert runs == [["hashed"], []]
