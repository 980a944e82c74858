"""Known torch bugs (`workers.upstream`): a compile that fails with one is retried under
the bug's Inductor configuration on the torch releases it applies to, and only there."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch._inductor.config as inductor_config

from pwdaemon.workers import upstream
from pwdaemon.workers.main import _error_header

# What torch 2.11's worker raised for GPT-2's decode step on the H200 machine's CPU
# (2026-12-05), cut to the lines the match reads.
CPP_INDEX_CHECK_FAILURE = (
    "CppCompileError: C++ compile error\n\nCommand:\ng++ k.main.cpp -O3\n\nOutput:\n"
    "k.main.cpp:20:70: error: 'tmp2' was not declared in this scope; did you mean 'tm'?\n"
    '   20 | TORCH_CHECK((tmp2 < ks1).all_masked(), "index out of bounds: tmp2 < ks1");\n'
)


class InductorError(RuntimeError):
    pass


def failing_then_compiling(seen: list[bool]) -> Callable[[], str]:
    def compile_once() -> str:
        seen.append(inductor_config.assert_indirect_indexing)
        if len(seen) == 1:
            raise InductorError(CPP_INDEX_CHECK_FAILURE)
        return "artifact"

    return compile_once


def test_a_known_bug_on_a_torch_it_applies_to_compiles_again_without_index_asserts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "_release", lambda: (2, 11))
    seen: list[bool] = []
    artifact, note = upstream.compile_past_known_bugs(failing_then_compiling(seen))
    assert artifact == "artifact"
    assert seen == [True, False]  # the retry ran under the bug's configuration
    assert inductor_config.assert_indirect_indexing is True  # and it was put back
    assert "index-bound asserts" in note and "178244" in note


def test_the_same_failure_on_a_torch_with_the_fix_is_raised_as_it_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(upstream, "_release", lambda: (2, 12))
    seen: list[bool] = []
    with pytest.raises(InductorError, match="was not declared"):
        upstream.compile_past_known_bugs(failing_then_compiling(seen))
    assert seen == [True]


def test_another_compile_failure_is_not_retried(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream, "_release", lambda: (2, 11))
    calls: list[int] = []

    def compile_once() -> str:
        calls.append(1)
        raise InductorError("CppCompileError: C++ compile error\nk.cpp:3:1: error: boom")

    with pytest.raises(InductorError, match="boom"):
        upstream.compile_past_known_bugs(compile_once)
    assert calls == [1]


def test_a_compile_that_succeeds_has_no_note() -> None:
    assert upstream.compile_past_known_bugs(lambda: 7) == (7, "")


def test_a_compiler_errors_reason_names_the_compilers_first_error() -> None:
    # Inductor's first line says only "C++ compile error": a person reading the status
    # needs the compiler's own line (the traceback, logged at INFO, has the rest).
    try:
        raise InductorError(CPP_INDEX_CHECK_FAILURE)
    except InductorError as exc:
        reason = _error_header(exc)["reason"]
    assert reason.startswith("InductorError: CppCompileError: C++ compile error: ")
    assert "'tmp2' was not declared in this scope" in reason
    assert "\n" not in reason
