"""`AttachOptions`: everything `attach()` was told, parsed and checked once.

`attach()` builds one frozen `AttachOptions` from its keyword arguments; `Handle` and
`Engine` take it whole instead of a dozen loose keywords each. It lives in the engine
package (not `pwdaemon.config`) because it holds engine-side objects: the executor and
the store link.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

from pwdaemon.config import CompileConfig, PolicyConfig
from pwdaemon.engine.store_link import StoreLink
from pwdaemon.serving.cudagraph import GraphConfig
from pwdaemon.serving.direct import GuardMode
from pwdaemon.serving.dispatch import DEFAULT_SAMPLE_BYTES, DEFAULT_SIZE_CAP
from pwdaemon.serving.range_table import Range
from pwdaemon.workers.executor import Executor


class TraceMode(enum.StrEnum):
    """When dynamo traces the model (`attach(trace=...)`)."""

    BACKGROUND = "background"  # on a copy of the first call's inputs, on a gated thread
    INLINE = "inline"  # on the first call, which waits for it

    @classmethod
    def parse(cls, value: str) -> TraceMode:
        """The mode named `value` ("inline" or "background"); ValueError otherwise."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"trace must be 'inline' or 'background', got {value!r}") from None


@dataclass(frozen=True)
class AttachOptions:
    """The options of one attached model (see `attach()` for what each one means)."""

    name: str
    sizes: tuple[int, ...] = ()
    ranges: tuple[Range, ...] = ()
    dynamic: Mapping[str, int] | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    compiler: CompileConfig = field(default_factory=CompileConfig)
    compile: bool = True
    """Run the engine (background compiles); False serves eager plus what is installed."""
    executor: Executor | None = None
    size_cap: int = DEFAULT_SIZE_CAP
    sample_bytes: int = DEFAULT_SAMPLE_BYTES
    store: StoreLink | None = None
    watch_store: bool = True
    watch_polling: bool = False
    """Watch the store by polling instead of inotify (for file systems without it)."""
    graphs: GraphConfig = field(default_factory=GraphConfig)
    trace: TraceMode = TraceMode.BACKGROUND
    guards: GuardMode = GuardMode.EVERY_CALL
    saved_trace: bool = True
    """With a store and a background trace: load the trace an earlier run saved instead
    of tracing, and save this run's (`pwdaemon.serving.saved_trace`)."""
    freeze_heap: bool = True
    """Keep objects alive at attach, after set-up and after traces out of the garbage
    collector's walks while attached (`pwdaemon.serving.heap`)."""

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ValueError/TypeError naming the first bad value.

        Runs again on every construction (the configs are frozen, but a value can be
        forced past that with `object.__setattr__`; attach time is when it must hold).
        """
        self.policy.check()
        self.compiler.check()
        self.graphs.check()
        if not isinstance(self.trace, TraceMode):
            raise TypeError(f"trace must be a TraceMode, got {self.trace!r}")
        if not isinstance(self.freeze_heap, bool):
            raise TypeError(f"freeze_heap must be a bool, got {self.freeze_heap!r}")
        if not isinstance(self.saved_trace, bool):
            raise TypeError(f"saved_trace must be a bool, got {self.saved_trace!r}")
        if self.size_cap < 1:
            raise ValueError(f"size_cap must be >= 1, got {self.size_cap}")
        if len(self.sizes) > self.policy.budget:
            raise ValueError(
                f"{len(self.sizes)} sizes configured but the specialization budget is "
                f"{self.policy.budget}; raise PolicyConfig(budget=...) or list fewer sizes"
            )
