"""The entry frame: a function of pwdaemon's own that dynamo traces instead of the module.

Dynamo does not trace a frame whose code lives in torch when it is the frame compiled
directly: `torch.compile(model._call_impl)` (and `nn.Sequential(...).compile()`)
captures nothing for torch.nn classes, and with hooks it catches `forward` and each hook
as separate frames. A plain function outside torch that calls `model._call_impl` is
traced whole, hooks included (checked on torch 2.13 for BERT, GPT-2, Llama,
nn.Sequential and nn.TransformerEncoder).

Every entry gets a fresh code object, compiled from source: dynamo keeps its cache and
its recompile limit per code object, so entries of different attaches (or of different
shape strategies of one attach) never share a bucket, and a detached model's entries
die with its code object.
"""

from __future__ import annotations

import itertools
import types
from typing import Any

import torch

_SOURCE = "def {name}(*args, **kwargs):\n    return model._call_impl(*args, **kwargs)\n"
# The entry's globals name this module: not torch's (dynamo's skip rules look at the
# module name), and importable (torch 2.11's dynamo imports the module a traced frame's
# globals name; a made-up name raised ModuleNotFoundError there and every call ran eager).
_MODULE = __name__
_ids = itertools.count()


def make_entry(model: torch.nn.Module, tag: str = "") -> types.FunctionType:
    """A new function (with its own code object) that calls `model` with its hooks."""
    name = f"pwdaemon_entry_{next(_ids)}{'_' + tag if tag else ''}"
    namespace: dict[str, Any] = {"model": model, "__name__": _MODULE}
    code = compile(_SOURCE.format(name=name), f"<pwdaemon entry {name}>", "exec")
    exec(code, namespace)  # our own constant source, never user input
    fn: types.FunctionType = namespace[name]
    return fn


def call_eager(model: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What `model(*args, **kwargs)` does without pwdaemon: `_call_impl`, hooks included."""
    return model._call_impl(*args, **kwargs)
