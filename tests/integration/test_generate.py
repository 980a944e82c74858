"""transformers' `generate()` on an attached causal LM (GPT-2, Llama; tiny configs, random
weights), with the default attach: background trace, real Inductor in real workers.

generate() calls the model once for the prompt (the prefill) and once per new token, each
time with the same `DynamicCache`, which the model fills in place. Proves: within a few
generations no call misses (each piece dynamo captures is sized on the batch, and the
decode step's is traced until one serves every cache length), the plan completed and
each piece runs compiled; greedy tokens equal eager's and every step's logits are within
atol=rtol=1e-4 of eager's (float32, compiled kernels reorder reductions), at the batch
the traffic brought and at another.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

import pwdaemon as pwd

pytestmark = pytest.mark.slow

TOL: dict[str, Any] = {"atol": 1e-4, "rtol": 1e-4}
PROMPT = 6
NEW_TOKENS = 8
VOCAB = 100
# Generations until two in a row run with no miss: the prefill's piece, then the decode
# step's traces (at most MAX_TRACES_PER_SIGNATURE), each after 3 misses (hot_calls); one
# more once the compiled prefill went live, whose cache keys have other strides than
# eager's (a piece of their own for the first decode step).
ROUNDS = 12


def _build(name: str) -> Any:
    from pwdaemon.real_models import causal_lm

    return causal_lm(name, VOCAB)


def _generate(model: Any, batch: int) -> Any:  # a transformers model: has generate()
    prompt = torch.randint(
        1, VOCAB, (batch, PROMPT), generator=torch.Generator().manual_seed(batch)
    )
    return model.generate(
        prompt,
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        pad_token_id=0,
        return_dict_in_generate=True,
        output_logits=True,
    )


@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_on_an_attached_causal_lm_stops_missing_and_runs_compiled(name: str) -> None:
    model = _build(name)
    reference = copy.deepcopy(model)
    compiler = pwd.CompileConfig(workers=1, start_timeout_s=300)
    # Generals only (no hot sizes): what is proved here is that each piece runs compiled.
    policy = pwd.PolicyConfig(budget=0)
    with (
        torch.inference_mode(),
        pwd.attach(model, compiler=compiler, policy=policy, store=False) as h,
    ):
        tracer = h._tracer
        misses: list[int] = []
        for _ in range(ROUNDS):
            before = tracer.miss_calls
            _generate(model, 2)
            assert h.wait_traced(300) and tracer.miss.traced.wait(300)
            assert h.wait(timeout=600), str(h.status())
            misses.append(tracer.miss_calls - before)
            if misses[-2:] == [0, 0]:
                break
        assert misses[-2:] == [0, 0], (misses, str(h.status()))
        assert all(p.facts.size_symbols for p in h.pieces), [p.facts for p in h.pieces]
        for piece in h.pieces:
            assert h.table(piece.index).general is not None, str(h.status())
        before = tracer.miss_calls
        for batch in (2, 3):
            got, want = _generate(model, batch), _generate(reference, batch)
            assert torch.equal(got.sequences, want.sequences), batch
            for g, w in zip(got.logits, want.logits, strict=True):
                torch.testing.assert_close(g, w, **TOL)
        assert tracer.miss_calls == before, str(h.status())
