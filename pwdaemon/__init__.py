"""pwdaemon: background compilation for PyTorch models in production.

    import pwdaemon as pwd
    handle = pwd.attach(model)   # model keeps being called exactly as before

Every call runs at once on the best runnable ready for its size; worker processes
compile specialized versions for the sizes traffic brings and hot-swap them in.
"""

from pwdaemon.config import CompileConfig, PolicyConfig
from pwdaemon.engine.events import (
    EntryStatus,
    HandleStatus,
    PieceStatus,
    PlanCompleteEvent,
    SwapEvent,
)
from pwdaemon.engine.jobs import JobReason, JobSource, JobState
from pwdaemon.handle import AlreadyAttachedError, Handle, attach
from pwdaemon.serving.cudagraph import GraphConfig
from pwdaemon.serving.dispatch import Dispatcher
from pwdaemon.serving.range_table import Entry, Range, RangeTable, Target, Tier
from pwdaemon.version import __version__ as __version__
from pwdaemon.workers.prewarm import prewarm

__all__ = (
    "AlreadyAttachedError",
    "CompileConfig",
    "Dispatcher",
    "Entry",
    "EntryStatus",
    "GraphConfig",
    "Handle",
    "HandleStatus",
    "JobReason",
    "JobSource",
    "JobState",
    "PieceStatus",
    "PlanCompleteEvent",
    "PolicyConfig",
    "Range",
    "RangeTable",
    "SwapEvent",
    "Target",
    "Tier",
    "attach",
    "prewarm",
)
