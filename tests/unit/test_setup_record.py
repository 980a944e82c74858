"""Inductor's set-up record: ISA probe successes and preprocessed headers replayed by the
next process; failures, and headers whose precompiled file is gone, asked again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from torch._inductor import config

from pwdaemon.workers import setup_record
from pwdaemon.workers.setup_record import SetupRecord, machine_fingerprint


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


def test_a_probe_success_is_replayed_by_a_later_record_of_the_same_file(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    probe = CountingProbe(answer=True)
    first = setup_record._recorded_probe(probe, SetupRecord(path))
    assert first(FakeIsa(), "int main() {}")
    later = setup_record._recorded_probe(probe, SetupRecord(path))  # the next process
    assert later(FakeIsa(), "int main() {}")
    assert probe.calls == 1
    assert later(FakeIsa(), "other code") and probe.calls == 2  # another question: probed


def test_a_probe_failure_is_probed_again_every_time(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    probe = CountingProbe(answer=False)
    for _ in range(2):
        assert not setup_record._recorded_probe(probe, SetupRecord(path))(FakeIsa(), "x")
    assert probe.calls == 2
    assert not path.exists()


def test_a_corrupt_record_is_read_as_empty_and_replaced(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    path.write_text("{not json")
    probe = CountingProbe(answer=True)
    assert setup_record._recorded_probe(probe, SetupRecord(path))(FakeIsa(), "x")
    assert probe.calls == 1
    assert list(json.loads(path.read_text()).values()) == [True]


def test_the_fingerprint_changes_when_the_compiler_is_rebuilt(tmp_path: Path) -> None:
    compiler = tmp_path / "g++"
    compiler.write_text("#!/bin/sh\n")
    compiler.chmod(0o755)
    # config.patch, not monkeypatch: monkeypatch's undo deleted torch's `cpp.cxx` option,
    # and every later compiler lookup in the process failed (`cxx does not exist`).
    with config.patch({"cpp.cxx": (None, str(compiler))}):
        before = machine_fingerprint()
        assert machine_fingerprint() == before
        compiler.write_text("#!/bin/sh\n# a newer build\n")
        assert machine_fingerprint() != before
    with config.patch({"cpp.cxx": (None, "no-such-compiler-here")}):
        assert machine_fingerprint() != before


class CountingPrecompile:
    """Stands in for `codecache._precompile_header`: makes the header and its .gch."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.calls = 0

    def __call__(self, header: str, hashable_cmd_line: str, **compile_command: object) -> str:
        self.calls += 1
        path = self.directory / f"h{self.calls}.h"
        path.write_text(f"#include <{header}>\n")
        Path(f"{path}.gch").write_text("compiled")
        return str(path)


def test_a_preprocessed_header_is_replayed_while_its_precompiled_file_exists(
    tmp_path: Path,
) -> None:
    record_path = tmp_path / "record.json"
    precompile = CountingPrecompile(tmp_path)
    args = ("torch/csrc/inductor/cpp_prefix.h", "g++ -O3 -march=native")
    first = setup_record._recorded_header(precompile, SetupRecord(record_path))(
        *args, min_optimize=False
    )
    later = setup_record._recorded_header(precompile, SetupRecord(record_path))  # next process
    assert later(*args, min_optimize=False) == first
    assert precompile.calls == 1
    # Another command line (or options) is another question.
    later(args[0], "g++ -O2", min_optimize=False)
    later(*args, min_optimize=True)
    assert precompile.calls == 3
    # A cleared precompiled header is built again, and that answer recorded.
    Path(f"{first}.gch").unlink()
    again = setup_record._recorded_header(precompile, SetupRecord(record_path))
    rebuilt = again(*args, min_optimize=False)
    assert rebuilt != first and precompile.calls == 4
    assert (
        setup_record._recorded_header(precompile, SetupRecord(record_path))(
            *args, min_optimize=False
        )
        == rebuilt
    )
    assert precompile.calls == 4


def test_a_header_question_carries_no_memory_address() -> None:
    # The command carries the vector ISA object, whose repr shows a function's address:
    # in a question, that made every process ask anew (the integration test's failure).
    from torch._inductor import cpu_vec_isa

    assert "0x" in repr(cpu_vec_isa.VecAVX2())
    stable = setup_record._stable(cpu_vec_isa.VecAVX2())
    assert stable == ["VecAVX2", "avx2", cpu_vec_isa.VecAVX2().build_arch_flags()]
    assert "0x" not in str(setup_record._stable(lambda: 0))

    def question(isa: object) -> str:
        return setup_record.header_question("h.h", "g++", {"vec_isa": isa, "shared": True})

    assert question(cpu_vec_isa.VecAVX2()) != question(cpu_vec_isa.VecAVX512())


def test_the_torch_source_question_changes_with_a_module_file_only(tmp_path: Path) -> None:
    package = tmp_path / "torch"
    (package / "sub" / "__pycache__").mkdir(parents=True)
    module = package / "sub" / "mod.py"
    module.write_text("x = 1\n")
    before = setup_record.torch_source_question(str(package))
    assert setup_record.torch_source_question(str(package)) == before
    # Bytecode caches and headers are not what torch's key reads.
    (package / "sub" / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"\0")
    (package / "sub" / "notes.h").write_text("// a header\n")
    assert setup_record.torch_source_question(str(package)) == before
    module.write_text("x = 22\n")  # another size
    after_edit = setup_record.torch_source_question(str(package))
    assert after_edit != before
    stat = module.stat()
    os.utime(module, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # same size
    assert setup_record.torch_source_question(str(package)) != after_edit
    (package / "sub" / "new.py").write_text("")
    assert setup_record.torch_source_question(str(package)) not in (before, after_edit)


class CountingTorchKey:
    """Stands in for `codecache.torch_key` in one process: computed once, or set."""

    def __init__(self, value: bytes) -> None:
        self.value = value
        self.computed = 0
        self.known: bytes | None = None

    def __call__(self) -> bytes:
        if self.known is None:
            self.computed += 1
            self.known = self.value
        return self.known

    def set(self, value: bytes) -> None:
        if self.known is not None:
            raise RuntimeError("prefetchable_cache value already set")
        self.known = value


def test_torchs_source_key_is_replayed_by_the_next_process_while_its_files_are_unchanged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from torch._inductor import codecache

    record_path = tmp_path / "record.json"
    first = CountingTorchKey(b"\x01\x02key")
    monkeypatch.setattr(codecache, "torch_key", first)
    monkeypatch.setattr(setup_record, "_record", SetupRecord(record_path))
    assert setup_record.torch_key() == b"\x01\x02key" and first.computed == 1
    # The next process (a fresh record object, a fresh key) sets the recorded key.
    later = CountingTorchKey(b"would be computed")
    monkeypatch.setattr(codecache, "torch_key", later)
    monkeypatch.setattr(setup_record, "_record", SetupRecord(record_path))
    assert setup_record.torch_key() == b"\x01\x02key" and later.computed == 0
    # Another torch installation (here: its files' question changes) computes again.
    monkeypatch.setattr(setup_record, "torch_source_question", lambda root: "torch_key|other")
    other = CountingTorchKey(b"another torch")
    monkeypatch.setattr(codecache, "torch_key", other)
    monkeypatch.setattr(setup_record, "_record", SetupRecord(record_path))
    assert setup_record.torch_key() == b"another torch" and other.computed == 1


def test_torchs_source_key_is_computed_as_inductor_would_without_a_record(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch._inductor import codecache

    key = CountingTorchKey(b"computed")
    monkeypatch.setattr(codecache, "torch_key", key)
    monkeypatch.setattr(setup_record, "_record", None)  # install() failed or not called
    assert setup_record.torch_key() == b"computed" and key.computed == 1


def test_a_miss_reads_the_record_again_for_an_answer_another_process_added(
    tmp_path: Path,
) -> None:
    path = tmp_path / "record.json"
    serving, worker = SetupRecord(path), SetupRecord(path)
    assert serving.lookup("isa|x") is None  # read before the worker probed
    worker.add("isa|x", True)
    assert serving.lookup("isa|x") is True


def test_replay_only_answers_from_the_record_and_never_probes(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    probe = CountingProbe(answer=True)
    check = setup_record._recorded_probe(probe, SetupRecord(path))
    with setup_record.replay_only(), pytest.raises(setup_record.NotRecorded):
        check(FakeIsa(), "x")
    assert probe.calls == 0
    assert check(FakeIsa(), "x") and probe.calls == 1  # outside: probed and recorded
    with setup_record.replay_only():
        assert check(FakeIsa(), "x")
    assert probe.calls == 1


class FlagIsa:
    _arch_flags = "-mbase"


def test_an_unrecorded_isa_is_left_for_later_with_its_flags_unchanged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from torch._inductor import cpu_vec_isa

    from pwdaemon.workers import prewarm

    isa = FlagIsa()
    monkeypatch.setattr(cpu_vec_isa, "supported_vec_isa_list", [isa])

    def unrecorded() -> None:
        # As VecAVX512 probes bf16: flags changed around a check_build that finds no
        # recorded answer.
        isa._arch_flags += " -mavx512bf16"
        raise setup_record.NotRecorded("no answer")

    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", unrecorded)
    assert prewarm.pick_recorded_isa() is False
    assert isa._arch_flags == "-mbase" and "_arch_flags" not in isa.__dict__
    monkeypatch.setattr(cpu_vec_isa, "pick_vec_isa", lambda: isa)
    assert prewarm.pick_recorded_isa() is True
