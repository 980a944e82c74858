"""Compile workers wherever serving code runs: a script without a main guard (run as a
file and with `python -c`), a Jupyter notebook kernel and a gunicorn worker each get
their worker, compile a size that matches eager within 1e-4, and leave no process
behind after detach (not even a zombie or a reparented worker), with no leaked
semaphore or traceback on stderr.

Real worker subprocesses, slow: each runs a real Inductor compile in a fresh process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Top-level code only, as in most scripts and quick tests: with multiprocessing's spawn,
# every worker re-ran this file and never reported ready.
_SCRIPT = """\
import copy, json, os, sys
import torch
import pwdaemon as pwd

class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(16, 16)
        self.norm = torch.nn.LayerNorm(16)

    def forward(self, x):
        return torch.relu(self.norm(self.lin(x)))

def children():
    out = []
    for e in os.listdir("/proc"):
        try:
            with open(f"/proc/{e}/stat") as f:
                if e.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    out.append(int(e))
        except OSError:
            pass
    return out

torch.manual_seed(0)
model = MLP().eval()
reference = copy.deepcopy(model)
compiler = pwd.CompileConfig(workers=1, general=False, start_timeout_s=300)
h = pwd.attach(model, sizes=[3], compiler=compiler, store=False)
x = torch.randn(3, 16)
with torch.no_grad():
    model(x)
    specialized = h.wait(sizes=[3], timeout=500)
    tier = str(h.table().lookup(3).tier.value)
    max_diff = float((model(x) - reference(x)).abs().max())
workers = list(h.status().worker_pids)
h.detach()
print(json.dumps({"specialized": specialized, "tier": tier, "max_diff": max_diff,
                  "workers": workers, "children": children(), "pid": os.getpid()}))
"""


def _worker_processes_of(parent: int) -> list[int]:
    # Any pwdaemon worker started by `parent`, wherever it was reparented to.
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = f.read().split(b"\0")
        except OSError:
            continue
        if b"pwdaemon.workers.main" in b" ".join(argv) and str(parent).encode() in argv:
            found.append(int(entry))
    return found


@pytest.mark.slow
@pytest.mark.parametrize("how", ["script", "python -c"])
def test_a_script_without_a_main_guard_gets_workers_and_leaves_nothing(
    how: str, tmp_path: Path
) -> None:
    script = tmp_path / "serve.py"
    script.write_text(_SCRIPT)
    argv = [sys.executable, str(script)] if how == "script" else [sys.executable, "-c", _SCRIPT]
    proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=590)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["specialized"] is True and report["tier"] == "size", proc.stderr[-4000:]
    assert report["max_diff"] <= 1e-4  # atol of the other comparisons here
    assert len(report["workers"]) == 1
    assert report["children"] == []  # nothing left after detach, not even a zombie
    assert _worker_processes_of(report["pid"]) == []  # nor reparented after exit
    for noise in ("leaked semaphore", "resource_tracker", "Traceback", "Exception ignored"):
        assert noise not in proc.stderr, proc.stderr[-4000:]


_KERNEL = {"argv": ["{python}", "-m", "ipykernel_launcher", "-f", "{connection_file}"],
           "display_name": "pwdaemon test", "language": "python"}  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_a_notebook_kernel_gets_workers_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A Jupyter kernel: no __main__ file, stdout and stderr are the kernel's streams.
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    spec_dir = tmp_path / "jupyter" / "kernels" / "pwdaemon-test"
    spec_dir.mkdir(parents=True)
    kernel = {**_KERNEL, "argv": [a.replace("{python}", sys.executable) for a in _KERNEL["argv"]]}
    (spec_dir / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))  # this venv's python only
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(_SCRIPT)])
    client = nbclient.NotebookClient(nb, timeout=590, kernel_name="pwdaemon-test")
    client.execute()
    outputs = nb.cells[0]["outputs"]
    text = "".join(o.get("text", "") for o in outputs if o.get("name") == "stdout")
    errors = [o for o in outputs if o.get("output_type") == "error" or o.get("name") == "stderr"]
    assert not [e for e in errors if "Traceback" in str(e)], errors
    report = json.loads(text.strip().splitlines()[-1])
    assert report["specialized"] is True and report["tier"] == "size", outputs
    assert report["max_diff"] <= 1e-4
    assert len(report["workers"]) == 1
    assert report["children"] == []  # nothing left after detach in the kernel
    assert _worker_processes_of(report["pid"]) == []


_WSGI_APP = """

def app(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"ok"]
"""


@pytest.mark.slow
@pytest.mark.timeout(900)  # the worker's compile, beside a busy CI machine
def test_a_gunicorn_worker_gets_workers_and_leaves_nothing(tmp_path: Path) -> None:
    # The model attached while gunicorn's worker imports the app (as serving code does);
    # gunicorn's own worker timeout (heartbeat) raised so the compile can finish.
    pytest.importorskip("gunicorn")
    (tmp_path / "app.py").write_text(_SCRIPT + _WSGI_APP)
    argv = [sys.executable, "-m", "gunicorn", "--workers", "1", "--timeout", "600",
            "--bind", f"unix:{tmp_path / 'gunicorn.sock'}", "app:app"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}  # the report must not wait in a buffer
    proc = subprocess.Popen(argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()  # the worker prints its report, then serves
        while line and not line.startswith("{"):
            line = proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=60)
    assert line.startswith("{"), err[-4000:]
    report = json.loads(line)
    assert report["specialized"] is True and report["tier"] == "size", err[-4000:]
    assert report["max_diff"] <= 1e-4
    assert report["children"] == []
    assert _worker_processes_of(report["pid"]) == []
    for noise in ("leaked semaphore", "resource_tracker", "Traceback", "Exception ignored"):
        assert noise not in err, err[-4000:]
