"""Inductor's kernel templates compiled when first rendered, not when imported.

Importing `torch._inductor.compile_fx` (which loading an artifact needs) imports
`select_algorithm` and the kernel modules, and each module-level `TritonTemplate`
compiles its jinja2 source on construction: 23 templates, 0.2-0.25 s of the 1.1-1.2 s
that Inductor's imports take on the 2-core CPU here, on the serving process's GIL during
a warm restart. A process that only loads artifacts never renders one (templates are for
autotuned matmuls and attention, rendered inside a compile), so the serving process pays
for nothing it uses.

`install()` makes `KernelTemplate._template_from_string` return a `LazyTemplate`, which
compiles the source with the original function on the first attribute it is asked for
(`render`, in Inductor). Templates made at render time (the C++ GEMM templates build one
per render) are compiled at once on that first use, as before.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

_lock = threading.Lock()
_installed = False


class LazyTemplate:
    """A jinja2 template, compiled from `source` on first use."""

    __slots__ = ("_compile", "_source", "_template")

    def __init__(self, source: str, compile_template: Callable[[str], Any]) -> None:
        self._source = source
        self._compile = compile_template
        self._template: Any = None

    def compiled(self) -> Any:
        # No lock: two threads that render the same template first compile it twice and
        # keep either result; jinja2 compiles the same source to equivalent templates.
        template = self._template
        if template is None:
            template = self._template = self._compile(self._source)
        return template

    def __getattr__(self, name: str) -> Any:
        # Called only for names the proxy lacks. A slot not set yet (a copy being built)
        # and protocol probes such as `__setstate__` must not compile or recurse.
        if name.startswith("__") or name in LazyTemplate.__slots__:
            raise AttributeError(name)
        return getattr(self.compiled(), name)


def install() -> bool:
    """Defer template compilation in this process (once; idempotent). True if in place.

    Call before Inductor's `select_algorithm` is imported: templates already built stay
    compiled. A torch without `KernelTemplate._template_from_string` is left as it is.
    """
    global _installed
    with _lock:
        if _installed:
            return True
        try:
            from torch._inductor.codegen import common
        except ImportError:
            return False
        original = getattr(common.KernelTemplate, "_template_from_string", None)
        if not callable(original) or not callable(getattr(common, "jinja2_env", None)):
            return False

        def template_from_string(source: str) -> Any:
            if common.jinja2_env() is None:
                return None  # no jinja2: what the original returns
            return LazyTemplate(source, original)

        common.KernelTemplate._template_from_string = staticmethod(template_from_string)  # type: ignore[method-assign]
        _installed = True
        return True
