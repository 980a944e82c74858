"""Validation: outputs compared within their dtype's tolerance (`compare_outputs`), and
its inputs, a recorded input tiled into another size (`tile_input`)."""

from __future__ import annotations

import pytest
import torch

from pwdaemon.engine.validation import compare_outputs, tile_input


def test_a_tiled_input_repeats_the_recorded_rows_along_every_size_dimension() -> None:
    ids = torch.tensor([[5, 6, 7], [8, 9, 10]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    weight = torch.nn.Parameter(torch.randn(4, 3))
    pairs = torch.arange(4).reshape(2, 2)  # the size on both dimensions
    args = (2, ids, weight, mask, pairs)
    dims = ((), (0,), (), (0,), (0, 1))
    tiled = tile_input(args, 2, 5, (0,), dims)
    assert tiled is not None
    n, t_ids, t_weight, t_mask, t_pairs = tiled
    assert n == 5 and t_weight is weight  # module state is passed as it is
    assert t_ids.tolist() == [[5, 6, 7], [8, 9, 10], [5, 6, 7], [8, 9, 10], [5, 6, 7]]
    assert torch.equal(t_mask, mask[[0, 1, 0, 1, 0]])
    assert t_pairs.shape == (5, 5) and torch.equal(
        t_pairs, pairs[[0, 1, 0, 1, 0]][:, [0, 1, 0, 1, 0]]
    )
    smaller = tile_input(args, 2, 1, (0,), dims)
    assert smaller is not None and smaller[1].tolist() == [[5, 6, 7]]


def test_an_input_without_the_shape_the_facts_describe_is_not_tiled() -> None:
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert tile_input((3, ids), 3, 5, (0,), ((), (0,))) is None  # its dim is 2, not 3
    assert tile_input((2, ids), 2, 5, (0,), ((), (1,))) is None  # dim 1 is 3
    assert tile_input((2, ids), 2, 5, (0,), ((),)) is None  # facts for another arity
    assert tile_input((2, 7), 2, 5, (0,), ((), (0,))) is None  # not a tensor


@pytest.mark.parametrize(
    ("dtype", "within", "beyond"),
    [(torch.float32, 5e-5, 5e-4), (torch.float16, 4e-3, 5e-2), (torch.float64, 5e-8, 5e-7)],
)
def test_outputs_agree_within_their_dtypes_tolerance_and_not_beyond(
    dtype: torch.dtype, within: float, beyond: float
) -> None:
    want = torch.linspace(-2, 2, 64, dtype=torch.float64).reshape(8, 8).to(dtype)
    near = (want.double() + within).to(dtype)
    far = (want.double() + beyond).to(dtype)
    assert compare_outputs((near, 3), (want, 3)) is None
    reason = compare_outputs((want, far), (want, want))
    assert reason is not None and reason.startswith("output 1 differs beyond rtol=")


def test_integer_outputs_are_compared_exactly() -> None:
    ids = torch.arange(12).reshape(3, 4)
    assert compare_outputs([ids.clone()], [ids]) is None
    off = ids.clone()
    off[2, 3] += 1
    reason = compare_outputs([off], [ids])
    assert reason is not None and "max abs diff 1" in reason


def test_nans_agree_only_where_the_reference_has_them() -> None:
    want = torch.tensor([1.0, float("nan"), 3.0])
    assert compare_outputs(want.clone(), want) is None
    moved = torch.tensor([float("nan"), 2.0, 3.0])
    assert compare_outputs(moved, want) == (
        "output 0: NaN where the reference has none (or the reverse)"
    )


def test_the_first_output_that_differs_is_the_one_named() -> None:
    a, b = torch.zeros(4), torch.ones(4)
    reason = compare_outputs(((a, b + 1), [b + 1]), ((a, b), [b]))
    assert reason is not None and reason.startswith("output 1 differs")


def test_outputs_of_another_structure_are_named() -> None:
    x = torch.zeros(2, 3)
    assert compare_outputs((x,), (x, x)) == "1 outputs, expected 2"
    assert compare_outputs((1.0,), (x,)) == "output 0 is float, expected a tensor"
    assert compare_outputs((x.T,), (x,)) == (
        "output 0 is (3, 2) torch.float32, expected (2, 3) torch.float32"
    )
    assert compare_outputs((x.half(),), (x,)) is not None
    assert compare_outputs((torch.zeros(0, 3),), (torch.zeros(0, 3),)) is None
    assert compare_outputs(("a", None), ("a", None)) is None
    assert compare_outputs(("a",), ("b",)) == "output 0 is 'a', expected 'b'"


def test_validation_on_the_cpu_makes_no_cuda_call(monkeypatch: pytest.MonkeyPatch) -> None:
    # The engine's stream and the samples' events are CUDA's alone: on a CPU model they
    # are never asked for (torch built with CUDA would initialise it on a host that may
    # have no GPU, or one the server keeps for other work).
    from pwdaemon.engine.validation import validate
    from pwdaemon.serving.dispatch import Dispatcher

    def no_cuda(*args: object, **kwargs: object) -> None:
        raise AssertionError("a CUDA call")

    for name in ("Stream", "Event", "current_stream", "stream"):
        monkeypatch.setattr(torch.cuda, name, no_cuda)
    dispatcher = Dispatcher(0, lambda n, t: t * 2, size_index=0)
    x = torch.randn(3, 4)
    torch.testing.assert_close(dispatcher(3, x), x * 2)
    assert dispatcher.sample_events(3) == []
    ((_, sample),) = dispatcher.samples_for(None)
    assert validate(lambda n, t: t * 2, lambda n, t: t + t, sample, written=[]) is None
    assert validate(lambda n, t: t * 3, lambda n, t: t + t, sample) is not None
