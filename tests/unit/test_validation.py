"""Validation's inputs: a recorded input tiled into another size (`tile_input`)."""

from __future__ import annotations

import torch

from pwdaemon.engine.validation import tile_input


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
