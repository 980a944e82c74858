"""Code that dynamo must run as it is, never convert: the serving gate's hook and all
it calls (`pwdaemon.serving.gate`).

CPython runs a profile hook and a `gc.callbacks` entry as ordinary frames, on whatever
thread fires them. On a thread where dynamo's frame callback is installed (the trace
thread's traced call, a serving thread inside the model's compiled call) dynamo would
convert each Python function they call the first time it runs there: its per-frame
work inside the hook, while a serving call may be waiting for the GIL, and a frame
counted among the model's in torch's `counters["frames"]` (the gate's
`_serving_went_quiet` and `_serving_active` showed up there in about one run in six of
`bench/peers.py --quick`). Marking the code skipped up front is what dynamo would decide
for it anyway (no tensor work in it), made before the first call instead of in it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from types import CodeType


def codes_of(namespaces: Iterable[object], files: frozenset[str]) -> Iterator[CodeType]:
    """The code objects of the functions in `namespaces` (modules, classes) defined in
    `files`, with the functions nested in them (a hook built by a method)."""
    seen: set[int] = set()
    stack: list[CodeType] = []
    for namespace in namespaces:
        for value in vars(namespace).values():
            if isinstance(value, (staticmethod, classmethod)):
                value = value.__func__
            elif isinstance(value, property):
                value = value.fget
            code = getattr(value, "__code__", None)
            if isinstance(code, CodeType):
                stack.append(code)
    while stack:
        code = stack.pop()
        if id(code) in seen or code.co_filename not in files:
            continue  # a function imported from elsewhere (contextlib's wrapper, say)
        seen.add(id(code))
        yield code
        stack.extend(const for const in code.co_consts if isinstance(const, CodeType))


def skip_in_dynamo(codes: Iterable[CodeType]) -> None:
    """Tell dynamo to run each of `codes` as it is (the functions they call are still
    dynamo's to judge: list those too)."""
    try:
        from torch._dynamo.eval_frame import skip_code
    except ImportError:  # not in every torch: the hook then costs more, nothing breaks
        return
    for code in codes:
        skip_code(code)
