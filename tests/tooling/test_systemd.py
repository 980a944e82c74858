"""systemd/: the unit is what `render_unit()` writes, `systemd-analyze verify` prints
nothing for it, its exposure is at most 3.0, and the README documents the install."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from pwdaemon.cli.main import main as cli_main
from pwdaemon.service.config import from_mapping, read_file
from pwdaemon.service.units import EXAMPLE_CONFIG, UnitOptions, render_unit

SYSTEMD = Path(__file__).resolve().parents[2] / "systemd"
ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze not installed")


def _rendered(tmp_path: Path) -> Path:
    # verify checks that ExecStart's binary exists: point it at this interpreter's
    # pwdaemon script (or the interpreter itself, which exists everywhere).
    exe = Path(sys.executable).with_name("pwdaemon")
    unit = tmp_path / "pwdaemon.service"
    unit.write_text(
        render_unit(UnitOptions(exec_path=str(exe if exe.exists() else sys.executable)))
    )
    return unit


def test_committed_files_are_what_the_code_renders() -> None:
    assert (SYSTEMD / "pwdaemon.service").read_text() == render_unit()
    assert (SYSTEMD / "pwdaemon.toml").read_text() == EXAMPLE_CONFIG


def test_example_config_is_valid() -> None:
    values = read_file(SYSTEMD / "pwdaemon.toml")
    assert values == tomllib.loads(EXAMPLE_CONFIG)["service"]
    assert from_mapping(values).workers == values["workers"]


@needs_analyze
def test_verify_prints_nothing(tmp_path: Path) -> None:
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "verify", str(_rendered(tmp_path))], capture_output=True, text=True, timeout=120
    )
    # Unknown keys and bad values only warn: any output at all is a failure.
    assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == "", proc


@needs_analyze
def test_verify_catches_a_bad_unit(tmp_path: Path) -> None:
    assert ANALYZE is not None
    unit = _rendered(tmp_path)
    unit.write_text(unit.read_text().replace("Type=notify", "Type=notify\nBogusKey=1"))
    proc = subprocess.run([ANALYZE, "verify", str(unit)], capture_output=True, text=True)
    assert "BogusKey" in proc.stdout + proc.stderr


@needs_analyze
def test_security_exposure_at_most_3(tmp_path: Path) -> None:
    assert ANALYZE is not None
    proc = subprocess.run(
        [ANALYZE, "security", "--offline=yes", str(_rendered(tmp_path))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", proc.stdout)
    assert m is not None, proc.stdout + proc.stderr
    assert float(m.group(1)) <= 3.0, proc.stdout


def test_unit_essentials() -> None:
    text = render_unit()
    for line in (
        "Type=notify",
        "Restart=on-failure",
        "RuntimeDirectory=pwdaemon",
        "CacheDirectory=pwdaemon",
        "ConfigurationDirectory=pwdaemon",
        "Environment=TORCHINDUCTOR_CACHE_DIR=/var/cache/pwdaemon/inductor",
        "Environment=TRITON_CACHE_DIR=/var/cache/pwdaemon/triton",
        "DeviceAllow=char-nvidia-frontend rw",
    ):
        assert line in text.splitlines(), line
    assert re.search(r"^WatchdogSec=\d+$", text, re.M)
    keys = {ln.split("=", 1)[0] for ln in text.splitlines() if "=" in ln and ln[0] != "#"}
    assert "PrivateDevices" not in keys and "PrivateUsers" not in keys
    with pytest.raises(ValueError):
        render_unit(UnitOptions(exec_path="relative/pwdaemon"))


def test_install_service_prints_the_unit(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["install-service", "--print", "--exec", "/opt/pw/bin/pwdaemon"]) == 0
    out = capsys.readouterr().out
    assert out == render_unit(UnitOptions(exec_path="/opt/pw/bin/pwdaemon"))


def test_readme_documents_install_enable_logs_upgrade() -> None:
    readme = (SYSTEMD / "README.md").read_text()
    for needle in (
        "useradd --system",
        "systemctl daemon-reload",
        "systemctl enable --now pwdaemon",
        "journalctl -u pwdaemon",
        "systemctl reload pwdaemon",
        "pwdaemon status",
        "## Upgrade",
    ):
        assert needle in readme, needle
