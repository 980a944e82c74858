"""Real architectures (issue 11): transformers' BERT, GPT-2 and Llama (tiny configs, random
weights, no downloads), nn.Sequential and nn.TransformerEncoder, called under
`torch.inference_mode()`.

Proves (compile=False, seconds): each model is captured through pwdaemon's entry frame
with no more pieces than `torch.compile(model, dynamic=True)` makes on the same inputs;
no retrace over sizes 1, 2, 8, 1, 5 (dynamo's `unique_graphs` counter equals the pieces
plus any graph a failed strategy made on its one tracing call, `recompiles` stays
empty); no call missed; the strategy each piece ended on; outputs equal eager (float32,
1e-5: the captured graph runs the same ops). Before torch 2.13 attention under the
backed strategy gets a piece for size 1 and one for the other sizes, their hot miss.

Proves (slow, real Inductor in real workers): from an unguarded script run in a
subprocess, size 1 gets specialized, sizes 5 and 8 are served compiled (the general), the
outputs equal eager within 1e-4 (compiled kernels reorder reductions), and no piece is
left on eager for those sizes once the plan completed. One specialized size: each
costs a compile per piece on this 2-core machine, and one proves the unguarded path.
And sized on their sequence dim (`dynamic=`), BERT, GPT-2 and Llama are one piece whose
length 16 specializes, every length equal to eager within 1e-4.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch._dynamo.utils import counters

import pwdaemon as pwd
from pwdaemon.real_models import SEQUENCE_DIMS, sequence_inputs
from pwdaemon.serving import strategy as strategy_module
from pwdaemon.serving.strategy import ShapeStrategy, torch_release
from pwdaemon.serving.trace_record import AttemptOutcome

MODELS = ["bert", "gpt2", "llama", "sequential", "encoder"]
SIZES = (1, 2, 8, 1, 5)
SEQ = 8
VOCAB = 100


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model: nn.Module
    if name == "bert":
        from transformers import BertConfig, BertModel

        model = BertModel(
            BertConfig(
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                vocab_size=VOCAB,
            )
        )
    elif name == "gpt2":
        from transformers import GPT2Config, GPT2Model

        model = GPT2Model(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB))
    elif name == "llama":
        from transformers import LlamaConfig, LlamaModel

        model = LlamaModel(
            LlamaConfig(
                hidden_size=64,
                intermediate_size=128,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                vocab_size=VOCAB,
            )
        )
    elif name == "sequential":
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    elif name == "encoder":
        layer = nn.TransformerEncoderLayer(
            d_model=32, nhead=4, dim_feedforward=64, batch_first=True
        )
        model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    else:
        raise KeyError(name)
    return model.eval()


def inputs(name: str, n: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
    g = torch.Generator().manual_seed(1000 + n)
    if name in ("bert", "gpt2", "llama"):
        ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
        mask = torch.ones(n, SEQ, dtype=torch.long)
        if n > 1:
            mask[0, SEQ - 3 :] = 0  # some padding
        return (), {"input_ids": ids, "attention_mask": mask}
    if name == "sequential":
        return (torch.randn(n, 32, generator=g),), {}
    return (torch.randn(n, SEQ, 32, generator=g),), {}


def main_output(out: Any) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    hidden = getattr(out, "last_hidden_state", None)
    if isinstance(hidden, torch.Tensor):
        return hidden
    raise TypeError(f"unexpected output {type(out).__name__}")


def dynamic_true_pieces(name: str) -> int:
    """Graphs plain `torch.compile(model, dynamic=True)` makes on the same calls."""
    torch._dynamo.reset()
    model = build(name)
    graphs: list[torch.fx.GraphModule] = []

    def backend(gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Any:
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(model, dynamic=True, backend=backend)
    with torch.inference_mode():
        for n in SIZES:
            args, kwargs = inputs(name, n)
            compiled(*args, **kwargs)
    torch._dynamo.reset()
    return len(graphs)


# The unbacked strategy captures every model here as one piece from torch 2.13 on. Before
# it, SDPA attention asks `Eq(u0, 1)` in BERT, GPT-2 and Llama (the unbacked trace fails
# on 2.12; on 2.11 it is not tried), and under the backed strategy an attention traced at
# size 1 is guarded to size 1: the other sizes miss until their hot miss is traced as a
# second piece (the encoder's too on 2.11, where the backed strategy is the only one).
# nn.TransformerEncoder's fused fast path traces under neither strategy there, so it
# runs with the fast path off, as pwdaemon's warning at attach advises.
UNBACKED_CAPTURES_ALL = torch_release() >= (2, 13)
ATTENTION = ("bert", "gpt2", "llama")  # SDPA: the unbacked trace fails before 2.13


def expected_strategy(name: str) -> ShapeStrategy:
    """The strategy a model's pieces end on with this torch's `strategy.ORDER`."""
    first = strategy_module.ORDER[0]
    if UNBACKED_CAPTURES_ALL or (first is ShapeStrategy.UNBACKED and name not in ATTENTION):
        return first
    return ShapeStrategy.BACKED_OBLIVIOUS


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_real_model_is_captured_with_no_retrace(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import mha_fast_path_off_where_untraceable

    mha_fast_path_off_where_untraceable(monkeypatch)
    counters.clear()
    model = build(name)
    reference = copy.deepcopy(model)
    handle = pwd.attach(model, compile=False, store=False)  # traced in the background
    try:
        with torch.inference_mode():
            args, kwargs = inputs(name, SIZES[0])
            model(*args, **kwargs)  # served by the plain module; starts the trace
            assert handle.wait_traced(300)
            for n in SIZES:
                args, kwargs = inputs(name, n)
                got = main_output(model(*args, **kwargs))
                want = main_output(reference(*args, **kwargs))
                torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        tracer = handle._tracer
        attention = name in (*ATTENTION, "encoder")
        if attention and expected_strategy(name) is ShapeStrategy.BACKED_OBLIVIOUS:
            _sizes_above_1_traced_as_a_second_piece(name, handle, model, reference)
            return
        pieces = len(handle.pieces)
        assert pieces >= 1, tracer.attempts
        discarded = sum(a.discarded for a in tracer.attempts)
        assert counters["stats"]["unique_graphs"] == pieces + discarded
        assert not counters["recompiles"]
        assert tracer.settled and not tracer.misses and tracer.errors.calls == 0
        # The encoder too since its unbacked size is known to be at least 1 (its fast
        # path asked `Eq(80*u0, 0)` and fell back to the backed strategy before).
        strategy = expected_strategy(name)
        assert all(p.strategy is strategy for p in handle.pieces), tracer.attempts
        assert all(p.specializable for p in handle.pieces)
        for p in handle.pieces:
            assert sorted(p.dispatcher.histogram()) == sorted(set(SIZES))
    finally:
        handle.detach()
    assert pieces <= dynamic_true_pieces(name)


def _sizes_above_1_traced_as_a_second_piece(
    name: str, handle: pwd.Handle, model: nn.Module, reference: nn.Module
) -> None:
    """Attention under the backed strategy (before torch 2.13): the size-1 piece, then the
    traced hot miss of the other sizes."""
    tracer = handle._tracer
    for a in tracer.attempts:
        if a.strategy is ShapeStrategy.UNBACKED:  # torch 2.12 tries it first
            assert a.outcome is AttemptOutcome.FELL_BACK and "Eq(u0, 1)" in a.reason, a
    # Three calls of sizes above 1 made their miss hot: the next one is traced (in the
    # background, from a copy of its inputs).
    with torch.inference_mode():
        args, kwargs = inputs(name, 2)
        model(*args, **kwargs)
    assert tracer.miss.traced.wait(300), str(handle.status())
    before = tracer.miss_calls
    with torch.inference_mode():
        for n in SIZES:
            args, kwargs = inputs(name, n)
            got = main_output(model(*args, **kwargs))
            want = main_output(reference(*args, **kwargs))
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert tracer.miss_calls == before, str(handle.status())  # every size on a piece
    assert len(handle.pieces) == 2, str(handle.status())
    assert all(p.strategy is ShapeStrategy.BACKED_OBLIVIOUS for p in handle.pieces)
    assert all(p.specializable for p in handle.pieces)
    seen = sorted(n for p in handle.pieces for n in p.dispatcher.histogram())
    assert seen == sorted(set(SIZES)), str(handle.status())
    assert tracer.settled and tracer.errors.calls == 0


# ---- slow: an unguarded script, real workers ---------------------------------------------

SCRIPT = textwrap.dedent(
    """
    # No `if __name__ == "__main__":` guard on purpose (issue 11, item 2).
    import copy, faulthandler, json, sys
    # A run that hangs shows where every thread is (CI once saw this script wait with no
    # worker started and nothing compiled; it did not come back in 6 runs here).
    faulthandler.dump_traceback_later(420, repeat=True)
    import torch
    sys.path.insert(0, {test_dir!r})
    from test_real_models import build, inputs, main_output
    import pwdaemon as pwd

    # Every model attached at once, as a process serving several: one interpreter's
    # start-up and the compiles of all five overlap (one script per model spent most of
    # 150 s of CI on starting interpreters and workers, one at a time).
    served = {{}}
    for name in {names!r}:
        model = build(name)
        reference = copy.deepcopy(model)
        # Size 3 is configured and never called before it goes live: it is validated on
        # a recorded input tiled to size 3 (`engine.validation.tile_input`).
        handle = pwd.attach(model, sizes=[1, 3], store={store!r})
        swaps = []
        handle.on_swap(
            lambda e, swaps=swaps: swaps.append((e.graph, str(e.range), e.tier.value, e.validated))
        )
        served[name] = (model, reference, handle, swaps)
    with torch.inference_mode():
        for n in (1, 8, 1, 5):
            for name, (model, _, _, _) in served.items():
                args, kwargs = inputs(name, n)
                model(*args, **kwargs)
    results = {{}}
    for name, (model, reference, handle, swaps) in served.items():
        specialized = handle.wait(sizes=[1], timeout=540)
        plan_done = handle.wait(timeout=540)  # the general compile may still be running
        tiers_3 = [handle.table(p.index).lookup(3).tier.value for p in handle.pieces]
        worst = 0.0
        with torch.inference_mode():
            for n in (1, 8, 5, 3):
                args, kwargs = inputs(name, n)
                got = main_output(model(*args, **kwargs))
                want = main_output(reference(*args, **kwargs))
                worst = max(worst, (got - want).abs().max().item())
        tiers = {{
            p.index: {{n: handle.table(p.index).lookup(n).tier.value for n in (1, 8)}}
            for p in handle.pieces
        }}
        results[name] = dict(
            specialized=specialized,
            plan_done=plan_done,
            worst=worst,
            tiers=tiers,
            pieces=len(handle.pieces),
            strategies=[p.strategy.value for p in handle.pieces],
            swaps=swaps,
            tiers_3=tiers_3,
            specializable=[p.specializable for p in handle.pieces],
            status=repr(handle.status())[:3000],
        )
    for _, _, handle, _ in served.values():
        handle.detach()
    print("RESULT " + json.dumps(results))
    """
)


def _with_repo(path: str | None) -> str:
    # The repository first, the caller's path kept: a torch 2.11 CUDA wheel run on a
    # machine without a GPU needs a sitecustomize on it (its FakeTensorMode crashed the
    # scripts with SIGSEGV where the path was replaced).
    repo = str(Path(__file__).parents[2])
    return os.pathsep.join([repo, path]) if path else repo


def run_script(script: Path, timeout: float) -> tuple[dict[str, Any], str]:
    """Run `script` in a fresh interpreter with the repository importable; its last
    `RESULT {json}` line, parsed, and its stderr. Fails the test when it fails."""
    proc = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": _with_repo(os.environ.get("PYTHONPATH"))},
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-4000:]
    result: dict[str, Any] = json.loads(lines[-1][len("RESULT ") :])
    return result, proc.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)  # the script's own bound; Llama took > 300 s beside a CPU burner
@pytest.mark.skipif(
    not UNBACKED_CAPTURES_ALL,
    reason="before torch 2.13 the attention models' first call (size 1) is traced as a "
    "size-1 piece, and sizes above 1 as a second piece once hot (this script's traffic "
    "makes none hot): test_real_model_is_captured_with_no_retrace covers that",
)
def test_real_models_served_from_one_unguarded_script_get_specialized(tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text(
        SCRIPT.format(
            test_dir=str(Path(__file__).parent), names=MODELS, store=str(tmp_path / "store")
        )
    )
    results, stderr = run_script(script, timeout=900)
    assert sorted(results) == sorted(MODELS), results
    for name, result in results.items():
        assert result["specialized"], (name, result, stderr[-12000:])
        assert result["plan_done"], (name, result)
        assert result["worst"] <= 1e-4, (name, result)  # float32; Inductor reorders reductions
        for index, tiers in result["tiers"].items():
            assert tiers["1"] == "size" and tiers["8"] != "eager", (name, index, tiers)
        # Size 3 went live on every piece that specializes, checked on a tiled input (and
        # not rejected by it); `worst` above includes its outputs.
        size_3 = [s for s in result["swaps"] if s[1] == "3" and s[2] == "size"]
        want = [i for i, ok in enumerate(result["specializable"]) if ok]
        assert sorted(s[0] for s in size_3) == want, (name, result["swaps"])
        assert all(s[3] for s in size_3), (name, result["swaps"])
        assert all(t == "size" for i, t in enumerate(result["tiers_3"]) if i in want), result


@pytest.mark.slow
def test_bert_under_the_backed_strategy_serves_every_size_right_after_its_general(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # BERT under the fallback strategy (what torch 2.11 CUDA ends on), traced at size 1.
    # Its general compile answered a batch of 2 with a batch of 1 (an H200, this CPU),
    # and at size 16 divided by `4 // 16` (SIGFPE: the serving process died validating
    # it): one size symbol per input that a worker's fresh shape env did not know to be
    # equal (workers unify them), and a worker compiling without the trace's
    # `backed_size_oblivious`, which read the hint 1 as the size (workers now compile
    # under it). The store gives the workers a fresh Inductor cache: an entry left by a
    # compile from before the fix would be refused (see test_workers.py), not live.
    from conftest import trace_with

    from pwdaemon.real_models import model_spec

    trace_with(monkeypatch, ShapeStrategy.BACKED_OBLIVIOUS)
    torch._dynamo.reset()
    spec = model_spec("bert", "tiny")
    cpu = torch.device("cpu")
    with torch.inference_mode():
        model = spec.build(cpu, torch.float32)
        reference = copy.deepcopy(model)
        calls = {n: spec.inputs(n, cpu, torch.float32) for n in (1, 2, 3, 16)}
        with pwd.attach(model, store=str(tmp_path / "store")) as handle:
            # Traffic of sizes 1 and 2 until the plan (the general compile) completes.
            deadline = time.monotonic() + 600
            while not handle.wait(timeout=0.05):
                assert time.monotonic() < deadline, str(handle.status())
                for n in (1, 2):
                    model(*calls[n][0], **calls[n][1])
            general = str(handle.status())
            entry = next(
                e for p in handle.status().pieces for e in p.entries if e.target == "general"
            )
            assert entry.state == "live", general
            for n in (1, 2, 3, 16):  # 3 and 16 on the general tier
                got = model(*calls[n][0], **calls[n][1]).last_hidden_state
                want = reference(*calls[n][0], **calls[n][1]).last_hidden_state
                assert got.shape == want.shape, (n, general)
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


TRANSFORMERS = ("bert", "gpt2", "llama")


def _attach_by_length(
    stack: contextlib.ExitStack,
    models: dict[str, nn.Module],
    sizes: list[int],
    compiler: pwd.CompileConfig,
    store: Path,
) -> dict[str, pwd.Handle]:
    """Each model attached sized on its sequence dim, in inference mode, all at once
    (their compiles overlap on this 2-core machine), detached when `stack` closes."""
    stack.enter_context(torch.inference_mode())
    return {
        name: stack.enter_context(
            pwd.attach(
                model, dynamic=SEQUENCE_DIMS, sizes=sizes, compiler=compiler, store=str(store)
            )
        )
        for name, model in models.items()
    }


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_transformers_sized_on_their_sequence_dim_are_one_piece_each_and_specialize(
    tmp_path: Path,
) -> None:
    # Servers that batch requests by length size these models on dim 1. Unbacked, the
    # attention's `q_length > 1` broke them into 7 (BERT), 3 (GPT-2) and 8 (Llama)
    # pieces, some pinned to the first call's length, Llama's generals failing
    # ("KeyError: u0"); and a size compile of any piece sized on dim 1 was rejected
    # ("expected size 2==2, stride 1024==16": the worker took dim 0's stride 64*s as s).
    # Now: one backed piece, length 16 specialized, every length right within 1e-4.
    # The three are attached at once (their compiles overlap on this 2-core machine).
    models = {name: build(name) for name in TRANSFORMERS}
    references = {name: copy.deepcopy(model) for name, model in models.items()}

    def tokens(name: str, length: int) -> dict[str, torch.Tensor]:
        return sequence_inputs(models[name], length, torch.device("cpu"))[1]

    compiler = pwd.CompileConfig(workers=1, general=False, start_timeout_s=300)
    with contextlib.ExitStack() as stack:
        handles = _attach_by_length(stack, models, [16], compiler, tmp_path / "store")
        for name, model in models.items():
            model(**tokens(name, 16))
        for name, model in models.items():
            assert handles[name].wait_traced(300), name
            for length in (8, 16, 24):
                model(**tokens(name, length))
        for name, model in models.items():
            h = handles[name]
            assert h.wait(sizes=[16], timeout=600, tier=pwd.Tier.SIZE), (name, str(h.status()))
            assert len(h.pieces) == 1, (name, str(h.status()))
            assert h.pieces[0].strategy is ShapeStrategy.BACKED_OBLIVIOUS, name
            assert h.table().lookup(16).tier is pwd.Tier.SIZE, name
            for length in (8, 16, 24, 16):
                got = main_output(model(**tokens(name, length)))
                want = main_output(references[name](**tokens(name, length)))
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_transformers_sized_on_their_sequence_dim_and_called_at_length_1_serve_it_compiled(
    tmp_path: Path,
) -> None:
    # Length 1 gets pieces of its own (SDPA refuses the SymBool of `q_length > 1`). BERT's
    # include `gt = s > 1; return (gt, s)`, with no tensor: its compiles failed every
    # attempt ("no artifact to save") and `wait(sizes=[1])` gave up. GPT-2's are pinned
    # to length 1 (no size symbol) and no wait counted them: it ran to its timeout.
    # Now: the wait for lengths 1 and 2 ends True, the size-arithmetic piece gets no job,
    # and every length is right within 1e-4.
    names = ("bert", "gpt2")
    models = {name: build(name) for name in names}
    references = {name: copy.deepcopy(model) for name, model in models.items()}

    def tokens(name: str, length: int) -> dict[str, torch.Tensor]:
        return sequence_inputs(models[name], length, torch.device("cpu"))[1]

    compiler = pwd.CompileConfig(workers=1, start_timeout_s=300)
    with contextlib.ExitStack() as stack:
        handles = _attach_by_length(stack, models, [1, 2], compiler, tmp_path / "store")
        for name, model in models.items():
            model(**tokens(name, 1))  # the first call at length 1, as bench/matrix.py
        for name, model in models.items():
            assert handles[name].wait_traced(300), name
            for length in (1, 2, 8, 1, 5):
                model(**tokens(name, length))
        for name, model in models.items():
            h = handles[name]
            assert h.wait(sizes=[1, 2], timeout=600, tier=pwd.Tier.SIZE), (name, str(h.status()))
            # (A general may be rejected, as holding at size 1 alone, with the range
            # above 1 compiled in its place: a failed general is no failed size.)
            failed = [
                e.target
                for p in h.status().pieces
                for e in p.entries
                if e.state == "failed" and e.target.startswith("size:")
            ]
            assert not failed, (name, str(h.status()))
            for piece in h.pieces:
                if piece.tensor_free:  # no job at all: eager is all it has
                    tiers = {e.tier for e in piece.dispatcher.table.entries()}
                    assert tiers == {pwd.Tier.EAGER}, (name, str(h.status()))
            for length in (1, 2, 5, 1):
                got = main_output(model(**tokens(name, length)))
                want = main_output(references[name](**tokens(name, length)))
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert any(p.tensor_free for p in handles["bert"].pieces), str(handles["bert"].status())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_transformers_batched_with_varying_lengths_gain_one_piece_for_them_all() -> None:
    # The default attach sizes dim 0 (the batch), and a server's lengths vary as well.
    # The first hot length is traced with dynamo's automatic dynamic on the length. For
    # BERT an unbacked batch that might be 0 left the attention's reshape to -1
    # undecidable (`Ne(16*s16*u0, 0)`): dynamo dropped the frame and each length became a
    # piece of its own, pinned (10 pieces, 595 s until no call ran eager:
    # bench/varying_lengths.py). GPT-2 and Llama got the second piece, but the worker
    # took the length's symbol for the batch and validation rejected the general ("u0 >=
    # 2"): every length but the first stayed eager. Now the batch is marked at least 1 and
    # a shipped graph names its size symbols: one more piece serves every length, on its
    # general compile. The three are attached at once.
    models = {name: build(name) for name in TRANSFORMERS}
    references = {name: copy.deepcopy(model) for name, model in models.items()}

    def call(name: str, batch: int, length: int) -> dict[str, torch.Tensor]:
        return sequence_inputs(models[name], length, torch.device("cpu"), batch=batch)[1]

    compiler = pwd.CompileConfig(workers=1, start_timeout_s=300)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode())
        handles = {
            name: stack.enter_context(pwd.attach(model, compiler=compiler, store=False))
            for name, model in models.items()
        }
        for name, model in models.items():
            model(**call(name, 2, 8))
        for name, model in models.items():
            assert handles[name].wait_traced(300), name
            # A length the first piece does not serve: hot after 3 misses (hot_calls'
            # default), traced at the 4th, in the background.
            for _ in range(4):
                model(**call(name, 3, 12))
        for name, model in models.items():
            h = handles[name]
            tracer = h._tracer
            assert tracer.miss.traced.wait(300), name
            missed = tracer.miss_calls
            traffic = ((1, 5), (4, 17), (2, 23), (3, 12), (1, 8))
            for batch, length in traffic:
                model(**call(name, batch, length))
            # Every length served; on torch 2.11 (the backed strategy alone) the pieces
            # traced at batches 2 and 3 do not serve batch 1: its calls miss.
            ones = 0 if strategy_module.ORDER[0] is ShapeStrategy.UNBACKED else 2
            assert tracer.miss_calls == missed + ones, (name, str(h.status()))
            assert len(h.pieces) == 2, (name, str(h.status()))
            assert h.pieces[1].facts.extra_symbols, (name, h.pieces[1].facts)  # the length's
        for name, model in models.items():
            h = handles[name]
            assert h.wait(timeout=600), (name, str(h.status()))
            assert h.table(1).general is not None, (name, str(h.status()))
            for batch, length in ((1, 5), (4, 17), (2, 23), (2, 8)):
                got = main_output(model(**call(name, batch, length)))
                want = main_output(references[name](**call(name, batch, length)))
                torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
