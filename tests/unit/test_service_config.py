"""Service config: file < flags, validation naming the key, hot reload that keeps the old
config on a bad file and counts it, and a real watchdog observer seeing edits."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest

from pwdaemon.service.config import (
    ConfigError,
    ConfigManager,
    ConfigWatcher,
    ReloadOutcome,
    ServiceConfig,
    from_mapping,
    read_file,
)


def test_defaults_file_and_overrides(tmp_path: Path) -> None:
    path = tmp_path / "pwdaemon.toml"
    path.write_text('[service]\nworkers = 3\nsocket = "/tmp/a.sock"\nmetrics_port = -1\n')
    mgr = ConfigManager(path, {"workers": 5})
    assert mgr.current.workers == 5  # the flag wins
    assert mgr.current.socket == "/tmp/a.sock"
    assert mgr.current.metrics_port is None
    assert ConfigManager(tmp_path / "missing.toml", {}).current == ServiceConfig()


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("workers = 0\n", "workers"),
        ('workers = "2"\n', "workers"),
        ("bogus = 1\n", "bogus"),
        ("allow_uids = 5\n", "allow_uids"),
        ("allow_uids = [-1]\n", "allow_uids"),
        ('log_level = "LOUD"\n', "log_level"),
        ("metrics_port = 70000\n", "metrics_port"),
        ("workers = \n", "not valid TOML"),
    ],
)
def test_invalid_files_name_the_problem(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        from_mapping(read_file(path))


def test_reload_applies_and_an_invalid_file_keeps_the_old_config(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "c.toml"
    path.write_text("workers = 2\n")
    mgr = ConfigManager(path, {})
    assert mgr.reload()[0] is ReloadOutcome.UNCHANGED
    path.write_text("workers = 4\n")
    outcome, config = mgr.reload()
    assert outcome is ReloadOutcome.APPLIED and config.workers == 4
    path.write_text("workers = -1\n")
    outcome, config = mgr.reload()
    assert outcome is ReloadOutcome.INVALID and config.workers == 4
    assert mgr.current.workers == 4
    assert "workers" in (mgr.last_error or "") and "keeping the running" in caplog.text
    assert mgr.reloads[ReloadOutcome.INVALID] == 1
    # The same broken bytes again are not a second error.
    assert mgr.reload()[0] is ReloadOutcome.UNCHANGED
    path.write_text("workers = 1\n")
    assert mgr.reload()[1].workers == 1 and mgr.last_error is None


def test_watcher_sees_writes_and_renames(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("workers = 1\n")
    seen = threading.Event()
    watcher = ConfigWatcher(path, seen.set).start()
    try:
        (tmp_path / "other.toml").write_text("x")  # another file: ignored
        tmp = tmp_path / ".c.toml.new"
        tmp.write_text("workers = 2\n")
        os.replace(tmp, path)  # how editors and config management save
        assert seen.wait(10.0)
    finally:
        watcher.stop()
