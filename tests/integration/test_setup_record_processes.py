"""Inductor's set-up record across real processes: the second one runs no probe and no
header preprocessing, and gets the same answers."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pwdaemon.workers import setup_record

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]

_PROBE = """
import json
from torch._inductor import cpu_vec_isa
from pwdaemon.workers import setup_record

calls = []
probe = cpu_vec_isa.VecISA.check_build
def counting(isa, code):
    calls.append(type(isa).__name__)
    return probe(isa, code)
cpu_vec_isa.VecISA.check_build = counting
setup_record.install()
isa = cpu_vec_isa.pick_vec_isa()
print(json.dumps({"calls": len(calls), "isa": str(isa), "flags": isa.build_arch_flags()}))
"""

# A CPU kernel compiled (first process) or loaded from the FX graph cache (second):
# either way Inductor asks for its C++ prefix header's precompiled form.
_KERNEL = """
import json
import torch
from torch._inductor import codecache
from pwdaemon.workers import setup_record

calls = []
precompile = codecache._precompile_header
def counting(*args, **kwargs):
    calls.append(args[0])
    return precompile(*args, **kwargs)
codecache._precompile_header = counting
setup_record.install()
fn = torch.compile(lambda x: (x * 2 + 1).relu().sum(dim=1), dynamic=False)
x = torch.arange(64, dtype=torch.float32).reshape(8, 8) - 20
diff = float((fn(x) - (x * 2 + 1).relu().sum(dim=1)).abs().max())
print(json.dumps({"calls": len(calls), "diff": diff}))
"""


def _run(child: str, cache: Path) -> dict[str, object]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", child], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def test_a_second_process_picks_the_same_isa_without_probing(tmp_path: Path) -> None:
    # Real probes: g++ and the dlopen child, in a fresh Inductor cache.
    first = _run(_PROBE, tmp_path)
    if not first["isa"]:
        pytest.skip("no vector ISA builds here (no C++ compiler?): nothing to record")
    assert isinstance(first["calls"], int) and first["calls"] >= 1
    second = _run(_PROBE, tmp_path)
    assert second == {**first, "calls": 0}


def test_a_probe_library_cut_short_is_built_again_and_the_same_isa_picked(
    tmp_path: Path,
) -> None:
    # A worker killed while g++ linked a probe leaves its library cut short in the cache;
    # torch's probe then skips the build and reads the failed load as a CPU without the
    # ISA (kernels built without it, silently). Without the record's answer (its own
    # process per cache), the next process must find the same ISA.
    first = _run(_PROBE, tmp_path / "first")
    if not first["isa"]:
        pytest.skip("no vector ISA builds here (no C++ compiler?)")
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "first", cut)
    shutil.rmtree(cut / setup_record.RECORD_DIR)  # no replayed answer: a real probe
    libraries = list(cut.rglob("*.so"))
    assert libraries and all(setup_record.elf_complete(lib) for lib in libraries)
    for library in libraries:
        os.truncate(library, library.stat().st_size // 2)
    assert not any(setup_record.elf_complete(lib) for lib in libraries)
    again = _run(_PROBE, cut)
    assert again["isa"] == first["isa"] and again["flags"] == first["flags"]
    assert all(setup_record.elf_complete(lib) for lib in libraries if lib.exists())


def test_a_second_process_loads_a_cpu_kernel_without_preprocessing_its_header(
    tmp_path: Path,
) -> None:
    first = _run(_KERNEL, tmp_path)
    if first["calls"] == 0:
        pytest.skip("this torch precompiles no header for CPU kernels")
    second = _run(_KERNEL, tmp_path)
    assert second["calls"] == 0  # answered from the record: no g++ -E, no openssl
    # The kernel it then loads computes what eager computes (float32, exact here).
    assert first["diff"] == second["diff"] == 0.0


_TORCH_KEY = """
import json
from torch._inductor import codecache
from pwdaemon.workers import setup_record

hashed = []
build = codecache.build_code_hash
def counting(roots, prefix, hasher):
    hashed.append(prefix)
    return build(roots, prefix, hasher)
codecache.build_code_hash = counting
setup_record.install()
key = setup_record.torch_key()
print(json.dumps({"hashed": len(hashed), "key": key.hex(), "again": codecache.torch_key().hex()}))
"""


def test_a_second_process_gets_torchs_source_key_without_hashing_torchs_files(
    tmp_path: Path,
) -> None:
    first = _run(_TORCH_KEY, tmp_path)
    assert isinstance(first["hashed"], int) and first["hashed"] >= 1  # computed
    second = _run(_TORCH_KEY, tmp_path)
    assert second["hashed"] == 0  # replayed: no file of torch's read
    # The very key torch computed, and what Inductor's own function answers after.
    assert second["key"] == second["again"] == first["key"] == first["again"]


# A cold start in a fresh process and a fresh store: the compile worker probes the CPU's
# vector ISA and records it; the serving process, which used to probe too (its g++ took a
# vCPU from serving's OpenMP team for ~2 s), replays the worker's answer at its first
# load. Counted in the serving process: compiler builds and dlopen probe children.
_COLD_START = """
import json, sys, time
import torch
from torch._inductor import cpp_builder, cpu_vec_isa
import pwdaemon as pwd
from pwdaemon.models import demo_model, example_tokens

builds, probes = [], []
build = cpp_builder.CppBuilder.build
def counting_build(self, *a, **k):
    builds.append(1)
    return build(self, *a, **k)
cpp_builder.CppBuilder.build = counting_build
# The ISA probe: a build-and-load check per ISA, `_probe_load` on torch 2.13, all of
# `check_build` (a subprocess loads the build) on 2.11.
probe_name = "_probe_load" if hasattr(cpu_vec_isa.VecISA, "_probe_load") else "check_build"
probe_load = getattr(cpu_vec_isa.VecISA, probe_name)
def counting_probe(self, *a, **k):
    probes.append(str(self))
    return probe_load(self, *a, **k)
setattr(cpu_vec_isa.VecISA, probe_name, counting_probe)

model = demo_model()
x = example_tokens(4)
with torch.no_grad():
    want = model(x)
# Size 4 alone (no general compile): one artifact is all the serving side must load.
handle = pwd.attach(
    model, store=sys.argv[1], sizes=[4], compiler=pwd.CompileConfig(general=False)
)
with torch.no_grad():
    model(x)
    ok = handle.wait(sizes=[4], timeout=240)
    got = model(x)
tier = handle.pieces[0].dispatcher.table.lookup(4).tier.value
handle.detach()
print(json.dumps({"ok": ok, "tier": tier, "builds": len(builds), "probes": probes,
                  "diff": float((got - want).abs().max())}))
"""


def test_a_cold_start_runs_no_compiler_in_the_serving_process(tmp_path: Path) -> None:
    result = _run_with_args(_COLD_START, tmp_path / "inductor-unused", str(tmp_path / "store"))
    assert result["ok"] and result["tier"] == "size", result
    assert result["probes"] == [] and result["builds"] == 0, result
    assert isinstance(result["diff"], float) and result["diff"] <= 1e-4  # float32 on CPU


def _run_with_args(child: str, cache: Path, *args: str) -> dict[str, object]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(cache), "PYTHONPATH": str(REPO)}
    out = subprocess.run(
        [sys.executable, "-c", child, *args], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result
