"""Inductor's kernel templates compiled on first use (`pwdaemon.workers.lazy_templates`)."""

from __future__ import annotations

import copy
from typing import Any

import jinja2

from pwdaemon.workers.lazy_templates import LazyTemplate

SOURCE = "{% for i in range(n) %}{{ name }}{{ i }};{% endfor %}"


class CountingCompiler:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, source: str) -> Any:
        self.calls += 1
        return jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(source)


def test_a_template_is_compiled_on_its_first_render_and_only_once() -> None:
    compiler = CountingCompiler()
    template = LazyTemplate(SOURCE, compiler)
    assert compiler.calls == 0
    assert template.render(n=3, name="x") == "x0;x1;x2;"
    assert template.render(n=1, name="y") == "y0;"
    assert compiler.calls == 1


def test_a_lazy_template_renders_what_the_compiled_one_renders() -> None:
    eager = jinja2.Environment(undefined=jinja2.StrictUndefined).from_string(SOURCE)
    lazy = LazyTemplate(SOURCE, CountingCompiler())
    assert lazy.render(n=4, name="k") == eager.render(n=4, name="k")


def test_copies_and_protocol_probes_neither_compile_nor_recurse() -> None:
    compiler = CountingCompiler()
    template = LazyTemplate(SOURCE, compiler)
    assert not hasattr(template, "__setstate_probe__")
    duplicate = copy.copy(template)
    assert compiler.calls == 0
    assert duplicate.render(n=1, name="z") == "z0;"
    assert compiler.calls == 1


def test_a_template_error_surfaces_when_rendered() -> None:
    template = LazyTemplate("{% for %}", CountingCompiler())
    try:
        template.render()
    except jinja2.TemplateSyntaxError:
        pass
    else:
        raise AssertionError("a bad template rendered")
