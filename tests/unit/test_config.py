"""Bad configuration fails loudly at attach (or config construction), naming the value.

Proves: ranges with start > end, overlapping ranges, sizes <= 0, non-int sizes,
unknown `dynamic` argument names, bad policy and compile settings each raise
ValueError/TypeError whose message names the bad value; a failed attach leaves the
model untouched; good values (Range objects, lists, adjacent ranges, duplicate sizes)
parse as expected. No dynamo tracing happens here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

import pwdaemon as pwd
from pwdaemon import CompileConfig, PolicyConfig, Range
from pwdaemon.config import parse_dynamic, parse_ranges, parse_sizes


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * mask


@pytest.fixture
def model() -> nn.Module:
    return Masked()


def assert_untouched(model: nn.Module) -> None:
    assert model._compiled_call_impl is None
    assert getattr(model, "_pwdaemon_handle", None) is None
    assert "forward" not in vars(model)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"ranges": [(5, 2)]}, ValueError, r"start 5 is greater than its end 2"),
        ({"ranges": [(1, 10), (5, 20)]}, ValueError, r"1\.\.10 and 5\.\.20 overlap"),
        ({"ranges": [(1, 8), Range(8, 9)]}, ValueError, r"1\.\.8 and 8\.\.9 overlap"),
        ({"ranges": [(0, 4)]}, ValueError, r"got 0"),
        ({"ranges": [(1, 2.5)]}, TypeError, r"got 2\.5"),
        ({"ranges": [(1, 2, 3)]}, ValueError, r"\(start, end\), got \(1, 2, 3\)"),
        ({"ranges": [7]}, ValueError, r"\(start, end\), got 7"),
        ({"sizes": [4, 0]}, ValueError, r"sizes must be >= 1, got 0"),
        ({"sizes": [-3]}, ValueError, r"got -3"),
        ({"sizes": [2.5]}, TypeError, r"sizes must be ints, got 2\.5"),
        ({"sizes": ["4"]}, TypeError, r"got '4'"),
        ({"sizes": [True]}, TypeError, r"got True"),
        ({"sizes": 8}, TypeError, r"sequence of ints, got 8"),
        ({"dynamic": {"nope": 0}}, ValueError, r"\['nope'\] are not arguments of Masked\.forward"),
        ({"dynamic": {"x": "0"}}, TypeError, r"dynamic\['x'\] must be an int dim, got '0'"),
        ({"dynamic": {0: 0}}, TypeError, r"got key 0"),
        ({"dynamic": ["x"]}, TypeError, r"got \['x'\]"),
        ({"dynamic": {}}, ValueError, r"marks nothing"),
        ({"size_cap": 0}, ValueError, r"size_cap must be >= 1, got 0"),
        (
            {"sizes": [1, 2, 3], "policy": PolicyConfig(budget=2)},
            ValueError,
            r"3 sizes configured but the specialization budget is 2",
        ),
    ],
    ids=lambda v: str(v)[:40] if isinstance(v, dict) else None,
)
def test_attach_rejects(
    model: nn.Module, kwargs: dict[str, Any], exc: type[Exception], match: str
) -> None:
    with pytest.raises(exc, match=match):
        pwd.attach(model, compile=False, **kwargs)
    assert_untouched(model)


def test_attach_takes_a_module() -> None:
    with pytest.raises(TypeError, match=r"nn\.Module, got function"):
        pwd.attach(lambda x: x)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"hot_calls": 0}, ValueError, r"hot_calls must be >= 1, got 0"),
        ({"hot_calls": 1.5}, TypeError, r"hot_calls must be an int, got 1\.5"),
        ({"hot_calls": "3"}, TypeError, r"hot_calls must be an int, got '3'"),
        ({"budget": -1}, ValueError, r"budget must be >= 0, got -1"),
        ({"queue_pressure": 0}, ValueError, r"queue_pressure must be >= 1, got 0"),
        ({"cold_after_s": 0}, ValueError, r"cold_after_s must be > 0, got 0"),
        ({"tick_s": -0.5}, ValueError, r"tick_s must be > 0, got -0\.5"),
        ({"tick_s": float("nan")}, ValueError, r"tick_s must be > 0, got nan"),
        ({"tick_s": None}, TypeError, r"tick_s must be a number of seconds, got None"),
    ],
)
def test_policy_config_rejects(kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        PolicyConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"workers": 0}, ValueError, r"workers must be >= 1, got 0"),
        ({"workers": 2.0}, TypeError, r"workers must be an int, got 2\.0"),
        ({"timeout_s": 0}, ValueError, r"timeout_s must be > 0, got 0"),
        ({"retries": -1}, ValueError, r"retries must be >= 0, got -1"),
        ({"backoff_s": -1.0}, ValueError, r"backoff_s must be >= 0, got -1\.0"),
        ({"niceness": -5}, ValueError, r"niceness must be >= 0, got -5"),
        ({"options": [("max_autotune", True)]}, TypeError, r"options must be a mapping"),
        ({"pause_during_calls": "yes"}, TypeError, r"pause_during_calls must be a bool or None"),
        ({"start_timeout_s": 0}, ValueError, r"start_timeout_s must be > 0, got 0"),
    ],
)
def test_compile_config_rejects(kwargs: dict[str, Any], exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        CompileConfig(**kwargs)


def test_validate_still_checks_a_config_changed_behind_its_back(model: nn.Module) -> None:
    # Frozen, but object.__setattr__ gets past that: attach validates again.
    policy = PolicyConfig()
    object.__setattr__(policy, "hot_calls", 0)
    with pytest.raises(ValueError, match="hot_calls must be >= 1, got 0"):
        pwd.attach(model, compile=False, policy=policy)
    compiler = CompileConfig(workers=1)
    object.__setattr__(compiler, "workers", 0)
    with pytest.raises(ValueError, match="workers must be >= 1, got 0"):
        pwd.attach(model, compile=False, compiler=compiler)
    assert_untouched(model)


def test_defaults_and_edge_values_are_accepted() -> None:
    PolicyConfig()
    PolicyConfig(hot_calls=1, budget=0, tick_s=1)
    CompileConfig()
    assert CompileConfig(workers=1, retries=0, backoff_s=0, niceness=0).workers == 1
    assert CompileConfig().workers >= 1


def test_parse_good_values() -> None:
    assert parse_sizes([8, 2, 8, 1]) == (8, 2, 1)  # order kept, duplicates dropped
    assert parse_sizes(()) == ()
    assert parse_ranges([(5, 8), Range(1, 4), [9, 9]]) == (  # type: ignore[list-item]
        Range(1, 4),
        Range(5, 8),
        Range(9, 9),
    )  # adjacent ranges do not overlap; sorted
    assert parse_dynamic(None) is None
    assert parse_dynamic({"x": 0, "mask": -1}) == {"x": 0, "mask": -1}
