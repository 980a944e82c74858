"""Whether this thread is inside a block: a per-thread, reentrant flag.

pwdaemon changes some of torch's behaviour for its own tracing calls only, on their
thread, while serving threads and the user's own `torch.compile` keep torch's: the guard
latency measured without its cache flush (`guard_latency`), the random state left as
the serving threads drew it (`random_state`). Each wraps a function of torch's once per
process, and the wrapper asks its `ThreadBlock` whether the calling thread is inside.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


class ThreadBlock:
    """A block a thread enters and leaves; nested entries count."""

    def __init__(self) -> None:
        self._local = threading.local()

    def active(self) -> bool:
        """Whether the calling thread is inside the block."""
        return bool(getattr(self._local, "depth", 0))

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread is inside the block until it leaves this one."""
        self._local.depth = getattr(self._local, "depth", 0) + 1
        try:
            yield
        finally:
            self._local.depth -= 1
