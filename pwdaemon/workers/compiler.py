"""What a worker process does with one job: rebuild the graph, compile it, save it.

Runs in the worker, never in the serving process. The graph arrives as GraphPickler
bytes (plain pickle would drop the fake metadata the dynamic compile needs). Weights are
graph inputs, so fake or empty tensors stand in for them: the worker never sees a weight.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pwdaemon.serving.range_table import Target, TargetKind


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs; picklable, holds no tensors."""

    graph: bytes
    target: Target
    out_path: str
    options: dict[str, Any] = field(default_factory=dict)
    # Test hooks, exercised by the failure tests on the real worker path.
    fault: str | None = None  # "raise" | "crash" | "hang"


def dump_graph(gm: torch.fx.GraphModule) -> bytes:
    """GraphPickler bytes of `gm`, fake metadata and symbols kept.

    GraphPickler cannot pickle a fake tensor that is a view (its base drags in
    unpicklable state), and dynamo records views (a 3-D `linear` is a view of a 2-D
    matmul). A compile needs only shape, stride, dtype and device of such values, so
    views are swapped for fresh fake tensors of the same layout while pickling.
    """
    from torch.fx._graph_pickler import GraphPickler

    swapped: list[tuple[torch.fx.Node, Any]] = []
    try:
        for node in gm.graph.nodes:
            v = node.meta.get("example_value")
            if isinstance(v, torch.Tensor) and v._base is not None:
                fake_mode = getattr(v, "fake_mode", None)
                if fake_mode is None:
                    continue
                with fake_mode:
                    fresh = torch.empty_strided(
                        v.shape,
                        v.stride(),
                        dtype=v.dtype,
                        device=v.device,
                        requires_grad=v.requires_grad,
                    )
                swapped.append((node, v))
                node.meta["example_value"] = fresh
        return bytes(GraphPickler.dumps(gm))
    finally:
        for node, v in swapped:
            node.meta["example_value"] = v


def _load_graph(data: bytes) -> tuple[torch.fx.GraphModule, Any]:
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx._graph_pickler import GraphPickler
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv())
    gm = GraphPickler.loads(data, fake_mode)
    assert isinstance(gm, torch.fx.GraphModule)
    return gm, fake_mode


def _inference_fakes(gm: torch.fx.GraphModule, fake_mode: Any) -> list[Any]:
    # Serving is inference: parameters arrive with requires_grad=True, which would
    # make AOTAutograd build a training graph (and specialise unbacked sizes).
    inputs: list[Any] = []
    with fake_mode:
        for node in gm.graph.nodes:
            if node.op != "placeholder":
                continue
            v = node.meta["example_value"]
            if isinstance(v, torch.Tensor):
                v = torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device=v.device)
                node.meta["example_value"] = v
            inputs.append(v)
    return inputs


def _concrete_inputs(gm: torch.fx.GraphModule, size: int) -> list[Any]:
    # Every symbol of a specializable piece is the size symbol (checked at capture).
    def concrete(s: Any) -> int:
        return size if isinstance(s, torch.SymInt) else int(s)

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


def _constrain_range(gm: torch.fx.GraphModule, start: int, end: int) -> None:
    # Tell the compiler the size's bounds; the dispatcher only routes sizes in range.
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sym = next(n for n in placeholders if isinstance(n.meta.get("example_value"), torch.SymInt))
    with gm.graph.inserting_after(placeholders[-1]):
        gm.graph.call_function(
            torch.ops.aten.sym_constrain_range_for_size.default,
            (sym,),
            {"min": start, "max": end},
        )
    gm.recompile()


def compile_job(spec: JobSpec) -> dict[str, Any]:
    """Compile `spec` and save the artifact; returns {path, seconds}."""
    from torch._inductor import standalone_compile

    if spec.fault == "raise":
        raise RuntimeError("injected compile failure")
    if spec.fault == "crash":
        os.kill(os.getpid(), 9)
    if spec.fault == "hang":
        while True:
            time.sleep(3600)
    started = time.perf_counter()
    gm, fake_mode = _load_graph(spec.graph)
    target = spec.target
    with torch.no_grad():
        if target.kind is TargetKind.SIZE:
            inputs = _concrete_inputs(gm, target.start)
            artifact = standalone_compile(
                gm, inputs, dynamic_shapes="from_example_inputs", options=dict(spec.options)
            )
        else:
            if target.kind is TargetKind.RANGE:
                _constrain_range(gm, target.start, target.end)
            inputs = _inference_fakes(gm, fake_mode)
            artifact = standalone_compile(
                gm, inputs, dynamic_shapes="from_graph", options=dict(spec.options)
            )
    tmp = f"{spec.out_path}.tmp-{os.getpid()}"
    artifact.save(path=tmp, format="binary")
    os.replace(tmp, spec.out_path)
    return {"path": spec.out_path, "seconds": time.perf_counter() - started}


def load_artifact(path: str) -> Any:
    """Load a saved artifact in this process (the serving side; off the serving thread)."""
    from torch._inductor import CompiledArtifact

    return CompiledArtifact.load(path=path, format="binary")
