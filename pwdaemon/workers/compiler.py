"""A compile job: compiling a shipped graph (worker side) and loading the artifact.

`compile_job` runs in a worker process, never in the serving process: it rebuilds the
graph that `workers.shipping.dump_graph` pickled in the serving process, compiles it and
saves the artifact. Weights are graph inputs, so fake or empty tensors stand in for
them: the worker never sees a weight.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from pwdaemon.serving.graph_facts import SIZE_GUARDS_META, admits, shipped_size_symbols
from pwdaemon.serving.priority import lowest_niceness
from pwdaemon.serving.range_table import OPEN_END, Target, TargetKind
from pwdaemon.serving.strategy import torch_release
from pwdaemon.workers.framing import Frame, encode
from pwdaemon.workers.kernel_cache import compile_past_broken_kernels
from pwdaemon.workers.prewarm import ISA_LOCK, prewarm
from pwdaemon.workers.sdpa import SDPA_OFF_OPTION, sdpa_backends
from pwdaemon.workers.shipping import load_graph
from pwdaemon.workers.upstream import compile_past_known_bugs

FAULTS = ("raise", "crash", "hang")

# An option the engine adds for the worker and takes out before Inductor sees the rest:
# load and compile the graph under fx's `backed_size_oblivious`, as the piece was traced
# (the backed strategy). Without it a fresh shape env reads the size's hint (the traced
# size, often 1) literally: BERT traced at size 1 compiled to a general that guarded
# `Eq(s52, 1)`, kept 16 rows where there were 16 x size, and divided by `4 // size` (0
# at size 16: SIGFPE, the serving process died validating it). It travels in the
# options, not in a field of its own, so that the store key (which hashes the options)
# tells artifacts compiled with and without it apart, and the service's requests carry it
# unchanged.
SIZE_OBLIVIOUS_OPTION = "pwdaemon.backed_size_oblivious"

# Another, for a CPU piece: the serving process's torch thread count, which the worker
# compiles under. Inductor's C++ kernels are generated for the compiling process's count
# (`parallel_num_threads()`), and torch 2.13 writes it into the kernel
# (`#pragma omp parallel num_threads(N)`) unless it equals the CPU count: a worker at
# torch's default (the physical cores) gave a server that had set
# `torch.set_num_threads(1)` kernels that ran N threads each, and the service compiled
# for every replica with its own count. In the options, so in the store key: artifacts
# built for one count are not loaded by a process running another.
CPU_THREADS_OPTION = "pwdaemon.cpu_threads"
# torch 2.13 keys Inductor's graph cache on the thread count a C++ kernel is built for
# (`cpp_runtime_thread_count`); before it, only Inductor's `cpp.threads` setting is.
_CACHE_KEYS_ON_THREADS = torch_release() >= (2, 13)

# Sizes a general compile must hold for (its guards are evaluated at each): the small
# sizes where "the size is 1" and "the size is the hint" differ from every other size.
GENERAL_PROBE_SIZES = (1, 2, 3, 17)
# In a refused general's reason where its guards fail at size 1 alone (a conv net whose
# compile assumed a batch above 1: "s33 >= 2"); the engine reads it (see its runner).
ABOVE_ONE = "it holds for every size above 1"
# In a refused general's reason where its guards hold at size 1 alone: a backed trace at
# size 1 hands Inductor the hint 1, and Inductor's choices at that hint can pin it (BERT
# in fp16 on an H100, torch 2.11: `Eq(s52, 1)`, every batch but 1 left on eager). The
# engine plans as for `ABOVE_ONE`: the range above 1 compiles from the hint 2
# (`_hint_inside`), so its choices are those of a batch above 1, and size 1 gets its own.
AT_ONE_ONLY = "it holds at size 1 alone (its hint)"


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs; holds no tensors. On the wire: `to_frame`/`from_frame`."""

    graph: bytes
    target: Target
    out_path: str
    options: dict[str, Any] = field(default_factory=dict)
    # Test hooks, exercised by the failure tests on the real worker path.
    fault: str | None = None  # "raise" | "crash" | "hang"

    def to_frame(self) -> bytes:
        """A "job" frame: the fields in the header, the graph as the payload.

        Raises TypeError (or FrameError) for options that are not JSON.
        """
        header = {
            "target": self.target.label,
            "out_path": self.out_path,
            "options": dict(self.options),
            "fault": self.fault,
        }
        return encode("job", header, self.graph)

    @classmethod
    def from_frame(cls, frame: Frame) -> JobSpec:
        """The spec of a "job" frame; ValueError names what is wrong."""
        target = Target.parse(str(frame.get("target")))
        out_path, options, fault = frame.get("out_path"), frame.get("options"), frame.get("fault")
        if not isinstance(out_path, str) or not out_path:
            raise ValueError(f"job frame has no out_path: {out_path!r}")
        if not isinstance(options, dict):
            raise ValueError(f"job frame options are not an object: {options!r}")
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}; one of {FAULTS}")
        return cls(frame.payload, target, out_path, options, fault)


def _same(x: Any) -> Any:
    return x


def _inference_fakes(
    gm: torch.fx.GraphModule, fake_mode: Any, resize: Callable[[Any], Any] = _same
) -> list[Any]:
    # Serving is inference: parameters arrive with requires_grad=True, which would
    # make AOTAutograd build a training graph (and specialise unbacked sizes). Each
    # placeholder's value is made again, its sizes passed through `resize` (a range's
    # new hint, `_hint_inside`), and written back to its meta.
    inputs: list[Any] = []
    with fake_mode:
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            v = node.meta["example_value"]
            if isinstance(v, torch.SymInt):
                v = resize(v)
            elif isinstance(v, torch.Tensor):
                shape = [resize(d) for d in v.shape]
                stride = [resize(d) for d in v.stride()]
                v = torch.empty_strided(shape, stride, dtype=v.dtype, device=v.device)
            node.meta["example_value"] = v
            inputs.append(v)
    return inputs


def _size_exprs(gm: torch.fx.GraphModule) -> list[Any]:
    """The expressions of the graph's SymInt placeholders that are the size, in order:
    those named in `SIZE_SYMBOLS_META`, else all of them (a graph shipped without it: the
    size is every symbol of a specializable piece, checked at capture). A piece with
    another dim dynamic too (a varying length beside the batch) ships its names: taking
    the length's symbol for the size made its general equate the two and fail in
    Inductor ("Could not extract specialized integer from data-dependent expression u0")."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    named = shipped_size_symbols(placeholders, output)
    exprs = [
        v.node.expr
        for v in (n.meta.get("example_value") for n in placeholders)
        if isinstance(v, torch.SymInt)
    ]
    return [e for e in exprs if e in named] if named else exprs


def _unify_size_symbols(gm: torch.fx.GraphModule, fake_mode: Any) -> None:
    """Tell the worker's shape env that every size symbol of the graph is one size.

    Under the backed strategy each marked input gets a symbol of its own (BERT: one for
    input_ids, one for attention_mask). The serving process knows they are equal; a
    fresh shape env here does not, and Inductor then resolved an `expand` between them
    by taking one of them as 1: the general compile answered a batch of 2 with a batch
    of 1 (torch 2.11 CUDA and 2.13 CPU). Every symbol of a specializable piece is the
    size (checked at capture), so all of them are replaced by the first.
    """
    symbols = _size_exprs(gm)
    shape_env = fake_mode.shape_env
    for sym in symbols[1:]:
        if sym != symbols[0]:
            # private API (torch 2.11-2.13); the replacement is what dynamo's own
            # equality guards record
            shape_env._set_replacement(sym, symbols[0], "pwdaemon: every size symbol is the size")


def _concrete_inputs(gm: torch.fx.GraphModule, size: int) -> list[Any]:
    # Every symbol of a specializable piece is the size symbol (checked at capture), so
    # every shape and stride is an expression in it, evaluated at `size`. Not the size
    # itself: with the size on dim 1 of a (2, s, 8) input, dim 0's stride is 8 * s, and
    # taking it as s compiled size 5 for strides (5, 8, 1), which every real input
    # failed (Inductor's input check: "expected size 2==2, stride 40==5 at dim=0").
    def concrete(s: Any) -> int:
        if not isinstance(s, torch.SymInt):
            return int(s)
        expr = s.node.expr
        return int(expr.xreplace({symbol: size for symbol in expr.free_symbols}))

    out: list[Any] = []
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        v = node.meta["example_value"]
        if isinstance(v, torch.SymInt):
            out.append(size)
        elif isinstance(v, torch.Tensor):
            shape = [concrete(s) for s in v.shape]
            stride = [concrete(s) for s in v.stride()]
            out.append(torch.empty_strided(shape, stride, dtype=v.dtype, device=v.device))
        else:
            out.append(v)
    return out


def _constrain_range(
    gm: torch.fx.GraphModule, fake_mode: Any, start: int, end: int
) -> Callable[[Any], Any]:
    # Tell the compiler the size's bounds; the dispatcher only routes sizes in range.
    # Returns what the inputs' sizes go through (`_hint_inside`, for `_inference_fakes`).
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    size = _size_exprs(gm)[0]
    resize = _hint_inside(fake_mode.shape_env, size, start, end)
    sym = next(
        n
        for n in placeholders
        if isinstance(v := n.meta.get("example_value"), torch.SymInt) and v.node.expr == size
    )
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.call_function(
            torch.ops.aten.sym_constrain_range_for_size.default,
            (sym,),
            {"min": start, "max": end},
        )
    gm.recompile()
    return resize


def _hint_inside(shape_env: Any, size: Any, start: int, end: int) -> Callable[[Any], Any]:
    # A backed size symbol carries the size it was traced at as its hint, and the shape
    # environment refuses a range that leaves its hint out ("1 not in VR[32, 64]": every
    # configured range above the traced size failed under the backed strategy, torch
    # 2.11's only one). The hint becomes the range's start in the shape environment, and
    # the returned function gives an input's size that hint (each SymInt keeps its own;
    # `_inference_fakes` applies it): a hint is what Inductor tunes for, not a guard.
    import sympy

    hints = shape_env.backed_var_to_val
    if size not in hints or start <= int(hints[size]) <= end:
        return _same
    hints[size] = sympy.Integer(start)

    def rehint(x: Any) -> Any:
        if not isinstance(x, torch.SymInt):
            return x
        value = x.node.expr.xreplace(hints)
        return shape_env.create_symintnode(x.node.expr, hint=int(value)) if value.is_number else x

    return rehint


class SpecializedCompileError(RuntimeError):
    """A general or range compile that holds for some of its sizes only (a guard pins
    the size); its artifact is not saved. The worker's reason starts with this class's
    name, which the engine reads to give the job up at once, as "rejected"."""


def _probe_sizes(gm: torch.fx.GraphModule, target: Target) -> tuple[int, ...]:
    if target.kind is TargetKind.RANGE:
        # A range open above is probed as a general is, at sizes a server sees: at its
        # end every compile of a model of some size fails Inductor's 32-bit indexing
        # assumption (`49152*s52 <= 2147483647`, BERT on an H100, refused the range
        # above 1), which a general's probes never reach either.
        top = target.end if target.end < OPEN_END else max(GENERAL_PROBE_SIZES)
        ends = (target.start, target.start + 1, top)
        sizes = sorted({n for n in ends if target.start <= n <= target.end})
    else:
        sizes = list(GENERAL_PROBE_SIZES)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    guards = output.meta.get(SIZE_GUARDS_META, ())
    return tuple(n for n in sizes if admits(guards, n))


def _pinning_guard(
    gm: torch.fx.GraphModule, fake_mode: Any, probes: tuple[int, ...]
) -> tuple[str | None, frozenset[int]]:
    """A guard the compile recorded that some of the `probes` (`_probe_sizes`) fails, as
    text (None: none), and every probe that some guard fails.

    Inductor and AOTAutograd record every assumption about a size in the shape env (a
    compile's own branches and a cache hit's guards alike); standalone_compile's artifact
    does not check them when it runs, so a general that assumed "size == 1" serves every
    other size wrong, or crashes. Only guards over the size symbols alone are read.
    """
    import sympy

    symbols = {e for e in _size_exprs(gm) if e.is_symbol}
    shape_env = fake_mode.shape_env
    first: str | None = None
    failing: set[int] = set()
    for sym in symbols:
        value = shape_env.replacements.get(sym)
        if value is not None and getattr(value, "is_Integer", False):
            wrong = {n for n in probes if n != int(value)}
            if wrong:
                first = first or f"{sym} = {value}"
                failing |= wrong
    for guard in shape_env.guards:
        expr = guard.expr
        if not expr.free_symbols or not expr.free_symbols <= symbols:
            continue
        for n in probes:
            try:
                holds = expr.xreplace({s: sympy.Integer(n) for s in expr.free_symbols})
            except (ArithmeticError, TypeError):  # ZeroDivisionError included
                holds = sympy.false  # undefined there (`Mod(x, s - 1)` at 1): not held
            if holds is sympy.false:
                first = first or f"{expr} (false at size {n})"
                failing.add(n)
    return first, frozenset(failing)


@contextlib.contextmanager
def _layout_config(target: Target, size_oblivious: bool) -> Iterator[None]:
    # A general or range compile over an unbacked size runs without Inductor's layout
    # optimization (channels last for conv nets): it expected a conv's output in
    # channels last, the conv kernel returned it contiguous, and validation rejected a
    # conv net's general ("expected size 8==8, stride 1==1024 at dim=1"), leaving every
    # batch without its own compile on eager. Without it, one general serves every batch,
    # 1 included. Backed compiles keep it: a conv net's general then guards `s >= 2` and
    # gives way to the range above 1 and size 1 (`ABOVE_ONE`), while without it a conv
    # over time guarded `s > 1` where with it the general held for every length.
    if target.kind is TargetKind.SIZE or size_oblivious:
        yield
        return
    import torch._inductor.config as inductor_config

    with inductor_config.patch(layout_optimization=False):
        yield


@contextlib.contextmanager
def _shape_config(size_oblivious: bool) -> Iterator[None]:
    if not size_oblivious:
        yield
        return
    import torch.fx.experimental._config as fx_config

    # a config module: patch() exists at run time, not in its type stubs
    with fx_config.patch(backed_size_oblivious=True):  # type: ignore[attr-defined]
        yield


@contextlib.contextmanager
def _threads_config(threads: Any) -> Iterator[None]:
    # Inductor's graph cache key leaves the thread count out before torch 2.13: a job for
    # 4 threads got the kernel a job for 3 had built (torch 2.11). Inductor's
    # `cpp.threads` is in its key, and is the count it builds for.
    if threads is None or _CACHE_KEYS_ON_THREADS:
        yield
        return
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.threads": int(threads)}):
        yield


def compile_job(spec: JobSpec) -> dict[str, Any]:
    """Compile `spec` and save the artifact; returns {path, seconds, note} (`note`: how a
    known bug of torch was worked around, `workers.upstream`; "" when none was)."""
    from torch._inductor import standalone_compile

    if spec.fault == "raise":
        raise RuntimeError("injected compile failure")
    if spec.fault == "crash":
        os.kill(os.getpid(), 9)
    if spec.fault == "hang":
        while True:
            time.sleep(3600)
    started = time.perf_counter()
    options = dict(spec.options)
    size_oblivious = bool(options.pop(SIZE_OBLIVIOUS_OPTION, False))
    threads = options.pop(CPU_THREADS_OPTION, None)
    if threads is not None:
        # A worker process compiles one job at a time; each job says its count.
        torch.set_num_threads(int(threads))
    sdpa_off = list(options.pop(SDPA_OFF_OPTION, ()))
    target = spec.target
    # The graph's symbols are made when it loads: the shape configuration covers both.
    with (
        torch.no_grad(),
        sdpa_backends(sdpa_off),
        _shape_config(size_oblivious),
        _layout_config(target, size_oblivious),
        _threads_config(threads),
    ):
        gm, fake_mode = load_graph(spec.graph)
        dynamic_shapes: Literal["from_example_inputs", "from_graph"]
        if target.kind is TargetKind.SIZE:
            inputs = _concrete_inputs(gm, target.start)
            dynamic_shapes = "from_example_inputs"
        else:
            _unify_size_symbols(gm, fake_mode)
            resize: Callable[[Any], Any] = _same
            if target.kind is TargetKind.RANGE:
                resize = _constrain_range(gm, fake_mode, target.start, target.end)
            inputs = _inference_fakes(gm, fake_mode, resize)
            dynamic_shapes = "from_graph"
        artifact, note = compile_past_broken_kernels(
            lambda: compile_past_known_bugs(
                lambda: standalone_compile(
                    gm, inputs, dynamic_shapes=dynamic_shapes, options=options
                )
            )
        )
        if target.kind is not TargetKind.SIZE:
            probes = _probe_sizes(gm, target)
            pinned, failing = _pinning_guard(gm, fake_mode, probes)
            if pinned is not None:
                # Inductor's caches do not key on the shape configuration, and a cached
                # entry's guards are checked at the hint only: an entry that a compile
                # without it left (size pinned to 1, before pwdaemon sent the option) is
                # found again at hint 1. standalone_compile cannot save an artifact with
                # the caches off, so the reason says how to clear them. A general whose
                # guards fail at size 1 alone says so: the engine compiles the range of
                # every size above 1 in its place (`ABOVE_ONE`), and so does one whose
                # guards hold at size 1 alone (`AT_ONE_ONLY`).
                where = ""
                if failing == {1}:
                    where = f"; {ABOVE_ONE}"
                elif 1 in probes and failing == set(probes) - {1}:
                    where = f"; {AT_ONE_ONLY}"
                raise SpecializedCompileError(
                    f"the {target.label} compile holds for some sizes only (guard {pinned})"
                    f"{where}; not kept: it would serve the other sizes wrong (if"
                    " Inductor's cache predates this pwdaemon, clear it: `pwdaemon cache"
                    " clear`)"
                )
    tmp = f"{spec.out_path}.tmp-{os.getpid()}"
    artifact.save(path=tmp, format="binary")
    os.replace(tmp, spec.out_path)
    return {"path": spec.out_path, "seconds": time.perf_counter() - started, "note": note}


# A load re-creates the artifact's kernels through Inductor's async compile, which with
# more than one compile thread hands them to its pools: a C++ kernel's module loads on a
# thread of Inductor's own (not gated: it takes the GIL while a serving call runs), and
# the first Triton kernel starts Inductor's compile subprocess pool, a sidecar process and
# `compile_threads` workers that each import torch (min(32, CPUs) of them in every
# serving replica; a sampled warm restart on the H200 showed the pool's reader thread in
# the serving process). The serving process loads what compile workers built and
# compiles nothing itself, so a load runs with one compile thread: all of it on the
# loading thread, gated. Inductor's config is process-wide (`patch` sets and restores
# module state): two loads patching at once could restore each other's value, so one
# load patches at a time. `compile_threads` is not part of Inductor's cache keys.
LOAD_CONFIG_LOCK = threading.Lock()


def load_artifact(path: str) -> Any:
    """Load a saved artifact in this process (the serving side; off the serving thread)."""
    from torch._inductor import CompiledArtifact

    # Inductor's set-up first (the pre-warm's thread), then the CPU's vector ISA, once,
    # under its lock (`prewarm.ISA_LOCK` says why): replayed from what a compile worker
    # recorded, or probed here where nothing did. Both cost nothing once done.
    prewarm().join()
    with ISA_LOCK:
        from torch._inductor import cpu_vec_isa

        with lowest_niceness():
            cpu_vec_isa.pick_vec_isa()
    # The first load in a process preprocesses and precompiles Inductor's C++ prefix
    # header (g++ and openssl subprocesses, ~0.3 s): at serving's priority they took a
    # core from serving's OpenMP team (a 181 ms BERT call beside them, 2-core box). The
    # caller is a thread of its own that ends after the load (`run_torch_work`).
    # With one compile thread (`LOAD_CONFIG_LOCK` says why).
    with LOAD_CONFIG_LOCK, torch._inductor.config.patch(compile_threads=1), lowest_niceness():
        return CompiledArtifact.load(path=path, format="binary")
