"""The lowest CPU priority for pwdaemon's own threads in the serving process.

Linux keeps a niceness per thread, so a thread of pwdaemon's can give way to the serving
threads of its own process. On a 2-core box a BERT call's OpenMP team shares both cores;
the gate (`gate.py`) parks pwdaemon's threads at Python's next event while a call runs,
but not inside a long C call (an import's unmarshalling, a dlopen, dynamo's C++), and a
warm BERT restart's calls before the trace ended waited 12-31 ms for a CPU each while the
trace and pre-warm threads ran 30-67 ms beside them (`bench/stalls.py`).
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator

# The lowest CFS weight: 1.5 % of a nice-0 thread's share when they compete for a CPU,
# all of it when serving leaves the CPU idle. Not SCHED_IDLE: on a host that serving
# keeps busy that starves outright, and every artifact load waits for the pre-warm.
LOWEST_NICENESS = 19


@contextlib.contextmanager
def lowest_niceness() -> Iterator[None]:
    """This thread, and the processes it starts, at `LOWEST_NICENESS` (Linux).

    For threads of pwdaemon's only: the pre-warm and trace threads for their whole life,
    artifact loads (Inductor's header precompile, g++ and openssl at serving's priority,
    took a core from BERT's OpenMP team: a 181 ms call beside them). A child inherits the
    niceness of the thread that starts it, so no thread lowered here may start compile
    workers (they set their own priority relative to it). Going back up needs a
    privilege Linux may deny, so lowered work is the last a thread does.
    """
    tid = threading.get_native_id()
    try:
        before = os.getpriority(os.PRIO_PROCESS, tid)
        os.setpriority(os.PRIO_PROCESS, tid, max(before, LOWEST_NICENESS))
    except (OSError, AttributeError):
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, tid, before)
