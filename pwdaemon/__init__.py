"""pwdaemon: background compilation for PyTorch models in production.

    import pwdaemon as pwd
    handle = pwd.attach(model)   # model keeps being called exactly as before

Every call runs at once on the best runnable ready for its size; worker processes
compile specialized versions for the sizes traffic brings and hot-swap them in.
"""

from ._compiler import Target
from ._config import CompileConfig, PolicyConfig
from ._cudagraph import GraphConfig
from ._dispatch import Dispatcher
from ._events import (
    EntryStatus,
    HandleStatus,
    PieceStatus,
    PlanCompleteEvent,
    SwapEvent,
)
from ._handle import AlreadyAttachedError, Handle, attach
from ._prewarm import prewarm
from ._range_table import Entry, Range, RangeTable, Tier

__version__ = "0.1.0"

__all__ = (
    "AlreadyAttachedError",
    "CompileConfig",
    "Dispatcher",
    "Entry",
    "EntryStatus",
    "GraphConfig",
    "Handle",
    "HandleStatus",
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
