"""Tests for `pwdaemon cache ls | verify | gc | clear`, run through argparse against a
real store in a temporary directory."""

from __future__ import annotations

import argparse
import functools
import io
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest

from pwdaemon.cli.cache import add_cache_parser, format_size, parse_duration, parse_size
from pwdaemon.store import ArtifactKey, ArtifactStore, make_key

DAY = 86400.0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pwdaemon")
    add_cache_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    args = build_parser().parse_args(list(argv))
    rc = args.func(args)
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    rc, out, _err = run(capsys, *argv, "--json")
    return rc, json.loads(out)


def key_for(target: str) -> ArtifactKey:
    return make_key("graph", target, device="cpu", torch_version="2.13.0", triton_version="none")


def populate(
    root: Path, tmp_path: Path, targets: list[str], *, ages_days: list[float] | None = None
) -> list[ArtifactKey]:
    """Publish one random artifact per target, last used `ages_days` ago (default: now)."""
    keys = []
    for i, target in enumerate(targets):
        when = time.time() - (ages_days[i] if ages_days else 0.0) * DAY
        store = ArtifactStore(root, clock=functools.partial(float, when))
        src = tmp_path / f"src-{i}"
        src.write_bytes(os.urandom(1000 * (i + 1)))
        key = key_for(target)
        assert store.publish(key, src, compile_seconds=1.5 + i) is not None
        keys.append(key)
    return keys


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "store"


# --------------------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("0", 0),
        ("10k", 10 * 1024),
        ("10KB", 10 * 1024),
        ("500M", 500 << 20),
        ("1G", 1 << 30),
        ("1.5GiB", 3 << 29),
        ("2 T", 2 << 40),
    ],
)
def test_parse_size(text: str, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("90", 90.0),
        ("45s", 45.0),
        ("30m", 1800.0),
        ("12h", 43200.0),
        ("7d", 7 * DAY),
        ("1w", 7 * DAY),
        ("1d12h", 1.5 * DAY),
        ("1.5h", 5400.0),
        ("1h 30m", 5400.0),
    ],
)
def test_parse_duration(text: str, expected: float) -> None:
    assert parse_duration(text) == expected


@pytest.mark.parametrize("text", ["", "lots", "1X", "-1G", "G"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size(text)


@pytest.mark.parametrize("text", ["", "soon", "7x", "d", "1d-2h"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        parse_duration(text)


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(1023) == "1023 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(5 << 30) == "5.0 GiB"


def test_bad_arguments_exit_2(capsys: pytest.CaptureFixture[str], root: Path) -> None:
    for argv in (
        ["cache"],
        ["cache", "gc", "--dir", str(root), "--max-bytes", "lots"],
        ["cache", "gc", "--dir", str(root), "--max-age", "soon"],
    ):
        with pytest.raises(SystemExit) as exc:
            build_parser().parse_args(argv)
        assert exc.value.code == 2
    assert "not a size" in capsys.readouterr().err


# --------------------------------------------------------------------------- ls


def test_ls_json(capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path) -> None:
    keys = populate(root, tmp_path, ["size:8", "range:1-16"])
    rc, doc = run_json(capsys, "cache", "ls", "--dir", str(root))
    assert rc == 0
    assert doc["root"] == str(root) and doc["count"] == 2
    assert doc["total_bytes"] == ArtifactStore(root).stats()[0]
    rows = {row["digest"]: row for row in doc["artifacts"]}
    assert set(rows) == {k.digest for k in keys}
    first = rows[keys[0].digest]
    assert first["target"] == "size:8" and first["device"] == "cpu"
    assert first["size"] == 1000 and first["compile_seconds"] == 1.5
    assert first["torch_version"] == "2.13.0"
    assert rows[keys[1].digest]["size"] == 2000
    assert Path(first["path"]).read_bytes() == (tmp_path / "src-0").read_bytes()


def test_ls_table(capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path) -> None:
    keys = populate(root, tmp_path, ["size:8", "general"])
    rc, out, _ = run(capsys, "cache", "ls", "--dir", str(root))
    assert rc == 0
    for key in keys:
        assert key.digest[:12] in out
    assert "size:8" in out and "general" in out and "1000 B" in out
    assert "2 artifacts" in out


def test_ls_of_missing_store_is_empty_and_creates_nothing(
    capsys: pytest.CaptureFixture[str], root: Path
) -> None:
    rc, doc = run_json(capsys, "cache", "ls", "--dir", str(root))
    assert rc == 0 and doc["count"] == 0 and doc["artifacts"] == []
    assert not root.exists()


def test_default_dir_comes_from_environment(
    capsys: pytest.CaptureFixture[str],
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    populate(root, tmp_path, ["size:1"])
    monkeypatch.setenv("PWDAEMON_CACHE_DIR", str(root))
    rc, doc = run_json(capsys, "cache", "ls")
    assert rc == 0 and doc["root"] == str(root) and doc["count"] == 1


def test_unsafe_store_is_refused(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    populate(root, tmp_path, ["size:1"])
    os.chmod(root, 0o777)
    for command in ("ls", "verify", "gc", "clear"):
        extra = ["--yes"] if command == "clear" else []
        rc, _out, err = run(capsys, "cache", command, "--dir", str(root), *extra)
        assert rc == 2, command
        assert f"chmod go-w {root}" in err
    os.chmod(root, 0o700)
    assert ArtifactStore(root).stats()[1] == 1  # nothing was removed


# --------------------------------------------------------------------------- verify


def test_verify(capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path) -> None:
    keys = populate(root, tmp_path, ["size:1", "size:2", "size:3"])
    rc, doc = run_json(capsys, "cache", "verify", "--dir", str(root))
    assert rc == 0 and doc["ok"] == 3 and doc["bad"] == 0

    store = ArtifactStore(root)
    bad = store.artifact_path(keys[1])
    bad.write_bytes(bad.read_bytes()[:-1] + b"!")
    rc, doc = run_json(capsys, "cache", "verify", "--dir", str(root))
    assert rc == 1 and doc["ok"] == 2 and doc["bad"] == 1
    [row] = [r for r in doc["results"] if not r["ok"]]
    assert row["digest"] == keys[1].digest and row["reason"] == "checksum mismatch"
    assert row["target"] == "size:2"
    assert not bad.exists() and any(store.quarantine_dir.iterdir())

    # Quarantined, so the store is clean again.
    rc, out, _ = run(capsys, "cache", "verify", "--dir", str(root))
    assert rc == 0 and "2 ok, 0 quarantined" in out


def test_verify_table_shows_quarantined(
    capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path
) -> None:
    [key] = populate(root, tmp_path, ["size:4"])
    ArtifactStore(root).artifact_path(key).write_bytes(b"short")
    rc, out, _ = run(capsys, "cache", "verify", "--dir", str(root))
    assert rc == 1
    assert key.digest[:12] in out and "quarantined" in out and "truncated" in out


# --------------------------------------------------------------------------- gc


def test_gc_max_age(capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path) -> None:
    keys = populate(root, tmp_path, ["size:1", "size:2", "size:3"], ages_days=[10, 8, 1])
    rc, doc = run_json(capsys, "cache", "gc", "--dir", str(root), "--max-age", "7d")
    assert rc == 0
    assert [r["digest"] for r in doc["removed"]] == [keys[0].digest, keys[1].digest]
    assert doc["count"] == 1 and doc["freed_bytes"] > 3000
    assert [m.digest for m in ArtifactStore(root).entries()] == [keys[2].digest]


def test_gc_max_bytes(capsys: pytest.CaptureFixture[str], root: Path, tmp_path: Path) -> None:
    # Sizes 1000, 2000, 3000 bytes (+ manifests); oldest used first goes first.
    keys = populate(root, tmp_path, ["size:1", "size:2", "size:3"], ages_days=[1, 3, 2])
    rc, doc = run_json(capsys, "cache", "gc", "--dir", str(root), "--max-bytes", "5.5k")
    assert rc == 0
    assert [r["digest"] for r in doc["removed"]] == [keys[1].digest]
    assert doc["total_bytes"] <= 5632 and doc["count"] == 2
    rc, out, _ = run(capsys, "cache", "gc", "--dir", str(root), "--max-bytes", "1K")
    assert rc == 0 and "removed 2 artifacts" in out and "0 artifacts" in out


# --------------------------------------------------------------------------- clear


def test_clear_needs_yes(
    capsys: pytest.CaptureFixture[str],
    root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    populate(root, tmp_path, ["size:1", "size:2"])
    inductor_file = root / "inductor" / "kernel.so"
    inductor_file.write_bytes(b"so")
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))  # not a terminal: never asks
    rc, _out, err = run(capsys, "cache", "clear", "--dir", str(root))
    assert rc == 2 and "--yes" in err
    assert ArtifactStore(root).stats()[1] == 2

    rc, doc = run_json(capsys, "cache", "clear", "--dir", str(root), "--yes", "--keep-inductor")
    assert rc == 0 and doc["removed"] == 2
    assert ArtifactStore(root).stats() == (0, 0)
    assert inductor_file.exists()
    rc, out, _ = run(capsys, "cache", "clear", "--dir", str(root), "-y")
    assert rc == 0 and "removed 0 artifacts" in out
    assert not inductor_file.exists() and (root / "artifacts").is_dir()
