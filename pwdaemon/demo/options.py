"""What a demo run does: `DemoOptions` (one field per `pwdaemon demo` flag) and its limits."""

from __future__ import annotations

import os
from dataclasses import dataclass

from pwdaemon.demo.traffic import TrafficConfig

__all__ = (
    "ATOL",
    "DEFAULT_DURATION_S",
    "LATENCY_WINDOW_S",
    "QUICK_SWAPS",
    "RTOL",
    "SHORT_RUN_S",
    "STOP_GRACE_S",
    "DemoOptions",
    "default_threads",
)

# The demo's own correctness check against an eager reference copy (float32): tight
# enough that a wrong kernel shows, loose enough for Inductor's reordered reductions.
ATOL = 1e-4
RTOL = 1e-4
DEFAULT_DURATION_S = 60.0
# --quick ends a few seconds after this many sizes went live, within the duration: a
# fixed 20 s run specialized nothing on a fresh store on a 2-core machine (its worker
# started under the demo's traffic at ~19 s, the general went live at 28 s, the first
# two sizes at 36 and 43 s); on a warm store they load within seconds.
QUICK_SWAPS = 2
# A run this short has three traffic phases instead of four, so each stays long enough
# for its sizes to get hot.
SHORT_RUN_S = 20.0
# The latency figures shown during the run cover this many recent seconds: long enough
# for a stable p99 at the demo's rate, short enough to show a swap's effect.
LATENCY_WINDOW_S = 3.0
# After `stop_after_swaps` swaps, serve this much longer so that calls run (and are
# checked) on what just went live.
STOP_GRACE_S = 3.0


def default_threads() -> int:
    """Half the CPUs for serving, at least one."""
    return max(1, (os.cpu_count() or 2) // 2)


@dataclass(frozen=True)
class DemoOptions:
    """What `pwdaemon demo` does; the CLI flags map one to one."""

    duration: float = DEFAULT_DURATION_S
    seed: int = 0
    plain: bool = False
    rate: float = 100.0
    """Mean calls per second the traffic asks for (the loop serves as fast as it can)."""
    decode_max: int = 128
    prefill_max: int = 512
    """Sizes stay small on a CPU; the benchmarks use the full 1..2048."""
    phases: int = 4
    """How many times the popular sizes shift during the run."""
    check_every: int = 10
    workers: int | None = None
    hot_calls: int | None = None
    store: str | None = None
    """Artifact store directory (None: pwdaemon's default store)."""
    fresh: bool = False
    """Use a new, empty store (and Inductor cache) for this run, removed at the end."""
    general: bool = True
    """Compile the general (dynamic-shape) runnable first, as `attach()` does by default."""
    stop_after_swaps: int = 0
    """End early, a few seconds after this many specialized swaps (0: run the duration)."""
    threads: int | None = None
    """Serving's intra-op threads (None: half the CPUs; the rest is the compilers')."""

    def traffic_config(self) -> TrafficConfig:
        """The traffic for this run: `rate * duration` calls split evenly over the phases."""
        expected_calls = max(1, int(self.rate * self.duration))
        return TrafficConfig(
            seed=self.seed,
            decode_max=self.decode_max,
            prefill_max=self.prefill_max,
            phase_calls=max(1, expected_calls // max(1, self.phases)),
            rate=self.rate,
        )
