"""Bytecode beside Inductor's generated modules: a second load of a module reads it
instead of compiling; another source, another Python or a damaged file compile again."""

from __future__ import annotations

import builtins
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from pwdaemon.workers import files
from pwdaemon.workers.module_bytecode import bytecode_path, cached_compile

_SOURCE = "def double(x):\n    return 2 * x\n\nRESULT = double(21)\n"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    (tmp_path / "inductor" / "ab").mkdir(parents=True)
    return tmp_path / "inductor"


class CountingCompile:
    def __init__(self) -> None:
        self.calls = 0
        self.real = builtins.compile

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.real(*args, **kwargs)


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> Iterator[CountingCompile]:
    counting = CountingCompile()
    monkeypatch.setattr(builtins, "compile", counting)
    yield counting


def _run(code: Any) -> Any:
    scope: dict[str, Any] = {}
    exec(code, scope, scope)
    return scope["RESULT"]


def test_a_module_loaded_again_is_read_from_its_bytecode_not_compiled(
    cache: Path, compiles: CountingCompile
) -> None:
    module = cache / "ab" / "cabc.py"
    module.write_text(_SOURCE)
    first = cached_compile(_SOURCE, str(module), "exec", dont_inherit=True)
    assert compiles.calls == 1 and bytecode_path(str(module)).is_file()
    again = cached_compile(_SOURCE, str(module), "exec", dont_inherit=True)
    assert compiles.calls == 1  # read back
    assert _run(first) == _run(again) == 42
    assert again.co_filename == str(module)


def test_another_source_at_the_same_path_is_compiled_again(
    cache: Path, compiles: CountingCompile
) -> None:
    module = str(cache / "ab" / "cabc.py")
    cached_compile(_SOURCE, module, "exec", dont_inherit=True)
    changed = _SOURCE.replace("21", "4")
    assert _run(cached_compile(changed, module, "exec", dont_inherit=True)) == 8
    assert compiles.calls == 2
    assert _run(cached_compile(changed, module, "exec", dont_inherit=True)) == 8
    assert compiles.calls == 2  # the new source's bytecode replaced the old


@pytest.mark.parametrize("damage", ["cut", "garbage", "other python"])
def test_a_damaged_or_foreign_bytecode_file_is_compiled_again_and_replaced(
    cache: Path, compiles: CountingCompile, damage: str
) -> None:
    module = str(cache / "ab" / "cabc.py")
    cached_compile(_SOURCE, module, "exec", dont_inherit=True)
    path = bytecode_path(module)
    data = path.read_bytes()
    if damage == "cut":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        path.write_bytes(data[:21] + os.urandom(64))  # its header whole, then noise
    else:
        path.write_bytes(b"\x00\x00" + data[2:])  # another magic number
    assert _run(cached_compile(_SOURCE, module, "exec", dont_inherit=True)) == 42
    assert compiles.calls == 2
    assert _run(cached_compile(_SOURCE, module, "exec", dont_inherit=True)) == 42
    assert compiles.calls == 2  # rewritten whole


def test_files_outside_inductors_cache_and_other_modes_are_compiled_as_before(
    cache: Path, tmp_path: Path, compiles: CountingCompile
) -> None:
    outside = str(tmp_path / "mine.py")
    for _ in range(2):
        cached_compile(_SOURCE, outside, "exec", dont_inherit=True)
        cached_compile("1 + 1", str(cache / "ab" / "cabc.py"), "eval")
    assert compiles.calls == 4
    assert not list(tmp_path.rglob("*.pwdaemon.pyc"))


def test_a_read_only_cache_still_compiles(
    cache: Path, compiles: CountingCompile, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError("read-only")

    monkeypatch.setattr(files.tempfile, "mkstemp", refuse)
    module = str(cache / "ab" / "cabc.py")
    for _ in range(2):
        assert _run(cached_compile(_SOURCE, module, "exec", dont_inherit=True)) == 42
    assert compiles.calls == 2
