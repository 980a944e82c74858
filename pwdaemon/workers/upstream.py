"""Known bugs of the torch releases pwdaemon supports, and how a compile gets past them.

A compile that fails with one of these is tried once more, in the same worker, under
the Inductor configuration the entry names; the result carries a note that the serving
process logs (a person should know the artifact was built differently). Each entry
names the torch releases it applies to, so that a later torch failing alike is reported
as it fails, not patched over.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

# Looked up at each match (tests put another release in its place).
from pwdaemon.serving.strategy import torch_release as _release

__all__ = ("UPSTREAM_BUGS", "UpstreamBug", "compile_past_known_bugs")


@dataclass(frozen=True)
class UpstreamBug:
    name: str  # where it is tracked upstream
    before: tuple[int, int]  # the first torch release (major, minor) that has the fix
    markers: tuple[str, ...]  # every one appears in the failure's message
    config: dict[str, Any] = field(default_factory=dict)  # Inductor's, for the retry
    note: str = ""

    def matches(self, exc: BaseException) -> bool:
        text = str(exc)
        return _release() < self.before and all(m in text for m in self.markers)


UPSTREAM_BUGS = (
    # Inductor's C++ backend placed an indirect index's bounds check before the line that
    # declares the index (`TORCH_CHECK(tmp2 < ks1, "index out of bounds: tmp2 < ks1")`
    # ahead of `auto tmp2 = ...`): g++ refused the kernel, and on torch 2.11 the general
    # of every GPT-2 and Llama decode step failed on the CPU (generate() served eager).
    # Without the asserts the kernel compiles; validation against eager still runs, but
    # an index out of range reads memory instead of raising as eager does.
    UpstreamBug(
        name="pytorch/pytorch#178244",
        before=(2, 12),
        markers=("CppCompileError", "was not declared in this scope", "index out of bounds"),
        config={"assert_indirect_indexing": False},
        note=(
            "compiled without Inductor's index-bound asserts: torch < 2.12 generates C++ "
            "that does not compile with them (pytorch/pytorch#178244)"
        ),
    ),
)


def compile_past_known_bugs(compile_once: Callable[[], Any]) -> tuple[Any, str]:
    """`compile_once()`, or where it fails with a bug of `UPSTREAM_BUGS`, once more under
    that bug's configuration; returns the result and the bug's note ("" when none)."""
    try:
        return compile_once(), ""
    except Exception as exc:
        bug = next((b for b in UPSTREAM_BUGS if b.matches(exc)), None)
        if bug is None:
            raise
    import torch._inductor.config as inductor_config  # here: the serving side loads only

    with inductor_config.patch(bug.config):
        return compile_once(), bug.note
