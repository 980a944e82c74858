"""The attach-time check that torch's modules come with their bytecode cache."""

from __future__ import annotations

import logging
import os
import py_compile
from pathlib import Path

import pytest
from torch import nn

import pwdaemon as pwd
from pwdaemon.engine import bytecode_check


@pytest.fixture
def torch_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A directory laid out as torch's, with the sampled modules and no bytecode."""
    monkeypatch.setattr(bytecode_check, "_checked", False)
    monkeypatch.setattr("sys.pycache_prefix", None)
    for relative in bytecode_check._SAMPLE:
        source = tmp_path / relative
        source.parent.mkdir(parents=True, exist_ok=True)
        source.write_text("VALUE = 1\n")
    return tmp_path


def test_modules_without_bytecode_warn_once_with_the_command_that_fixes_it(
    torch_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    assert len(bytecode_check.missing_bytecode(torch_root)) == len(bytecode_check._SAMPLE)
    with caplog.at_level(logging.WARNING, logger=bytecode_check.__name__):
        bytecode_check.check_bytecode_cache(torch_root)
        bytecode_check.check_bytecode_cache(torch_root)
    assert len(caplog.records) == 1
    assert f"python -m compileall -q {torch_root}" in caplog.records[0].message


def test_compiled_modules_pass_and_a_source_newer_than_its_bytecode_does_not(
    torch_root: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for relative in bytecode_check._SAMPLE:
        py_compile.compile(str(torch_root / relative), doraise=True)
    assert bytecode_check.missing_bytecode(torch_root) == []
    with caplog.at_level(logging.WARNING, logger=bytecode_check.__name__):
        bytecode_check.check_bytecode_cache(torch_root)
    assert caplog.records == []

    edited = torch_root / bytecode_check._SAMPLE[0]
    stat = edited.stat()
    os.utime(edited, (stat.st_atime, stat.st_mtime + 10))  # edited after compileall
    assert bytecode_check.missing_bytecode(torch_root) == [edited]


def test_hash_based_bytecode_passes_whatever_the_times(torch_root: Path) -> None:
    # Reproducible builds write hash-based .pyc files; file times say nothing there.
    for relative in bytecode_check._SAMPLE:
        source = str(torch_root / relative)
        py_compile.compile(
            source, doraise=True, invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH
        )
        os.utime(source, (1, 1))
    assert bytecode_check.missing_bytecode(torch_root) == []


def test_another_layout_is_not_judged(tmp_path: Path) -> None:
    assert bytecode_check.missing_bytecode(tmp_path) == []


def test_attach_runs_the_check(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setattr(bytecode_check, "_checked", False)
    monkeypatch.setattr(bytecode_check, "missing_bytecode", lambda root: [tmp_path / "x.py"])
    model = nn.Linear(4, 4)
    with caplog.at_level(logging.WARNING, logger=bytecode_check.__name__):
        handle = pwd.attach(model, compile=False)
    handle.detach()
    assert any("no bytecode cache" in r.message for r in caplog.records)
