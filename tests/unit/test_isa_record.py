"""The ISA probe's record: successes replayed by the next process, failures probed again."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from torch._inductor import config

from pwdaemon.workers import isa_record
from pwdaemon.workers.isa_record import IsaProbeRecord, machine_fingerprint


class FakeIsa:
    def build_arch_flags(self) -> str:
        return "-mfake"


class CountingProbe:
    def __init__(self, answer: bool) -> None:
        self.answer = answer
        self.calls = 0

    def __call__(self, isa: object, code: str) -> bool:
        self.calls += 1
        return self.answer


def test_a_success_is_replayed_by_a_later_record_of_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    probe = CountingProbe(answer=True)
    first = isa_record._recorded(probe, IsaProbeRecord(path))
    assert first(FakeIsa(), "int main() {}")
    later = isa_record._recorded(probe, IsaProbeRecord(path))  # the next process
    assert later(FakeIsa(), "int main() {}")
    assert probe.calls == 1
    assert later(FakeIsa(), "other code") and probe.calls == 2  # another question: probed


def test_a_failure_is_probed_again_every_time(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    probe = CountingProbe(answer=False)
    for _ in range(2):
        assert not isa_record._recorded(probe, IsaProbeRecord(path))(FakeIsa(), "x")
    assert probe.calls == 2
    assert not path.exists()


def test_a_corrupt_record_is_read_as_empty_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    path.write_text("{not json")
    probe = CountingProbe(answer=True)
    assert isa_record._recorded(probe, IsaProbeRecord(path))(FakeIsa(), "x")
    assert probe.calls == 1
    assert list(json.loads(path.read_text()).values()) == [True]


def test_the_fingerprint_changes_when_the_compiler_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    compiler = tmp_path / "g++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    monkeypatch.setattr(config.cpp, "cxx", (None, str(compiler)))
    before = machine_fingerprint()
    assert machine_fingerprint() == before
    compiler.write_text("#!/bin/sh\n# a newer build\n")
    assert machine_fingerprint() != before
    monkeypatch.setattr(config.cpp, "cxx", (None, "no-such-compiler-here"))
    assert machine_fingerprint() != before
