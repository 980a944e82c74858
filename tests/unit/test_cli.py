"""Tests for the `pwdaemon` command line: parsing, `--version`, `python -m pwdaemon`."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pwdaemon
from pwdaemon.cli.main import build_parser, main
from pwdaemon.demo.args import cmd_demo, options_from_args
from pwdaemon.demo.options import DEFAULT_DURATION_S, QUICK_SWAPS, DemoOptions


def demo_options(*argv: str) -> DemoOptions:
    args = build_parser().parse_args(["demo", *argv])
    assert args.func is cmd_demo
    return options_from_args(args)


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == f"pwdaemon {pwdaemon.__version__}"


def test_no_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    err = capsys.readouterr().err
    assert "demo" in err and "usage: pwdaemon" in err


def test_unknown_command_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["frobnicate"])
    assert exc.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_demo_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--duration", "--quick", "--seed", "--plain", "--fresh", "--store"):
        assert flag in out


def test_demo_defaults() -> None:
    opts = demo_options()
    assert opts.duration == DEFAULT_DURATION_S
    assert opts.seed == 0
    assert not opts.plain and not opts.fresh
    assert opts.store is None
    assert opts.general
    assert opts.check_every == 10
    assert opts.stop_after_swaps == 0
    assert opts.prefill_max == 512 and opts.decode_max == 128


def test_demo_quick_ends_after_a_few_swaps_within_the_duration() -> None:
    # A fixed short run specialized nothing on a fresh store on a 2-core machine: --quick
    # ends a few seconds after the first swaps instead, with the duration as its limit.
    quick = demo_options("--quick")
    assert quick.stop_after_swaps == QUICK_SWAPS and quick.duration == DEFAULT_DURATION_S
    assert quick.phases == 3
    assert demo_options("--quick", "--stop-after-swaps", "1").stop_after_swaps == 1
    assert demo_options("--quick", "--duration", "7.5").duration == 7.5
    assert demo_options("--duration", "90").duration == 90.0
    assert demo_options("--duration", "90").stop_after_swaps == 0
    assert demo_options("--duration", "15").phases == 3


def test_demo_flags() -> None:
    opts = demo_options(
        "--seed",
        "3",
        "--plain",
        "--rate",
        "50",
        "--max-size",
        "256",
        "--check-every",
        "5",
        "--workers",
        "2",
        "--no-general",
        "--stop-after-swaps",
        "2",
        "--fresh",
    )
    assert opts.seed == 3 and opts.plain and opts.rate == 50.0
    assert opts.prefill_max == 256 and opts.decode_max == 128
    assert opts.check_every == 5 and opts.workers == 2
    assert not opts.general and opts.stop_after_swaps == 2 and opts.fresh
    assert demo_options("--store", "/tmp/somewhere").store == "/tmp/somewhere"


def test_small_max_size_keeps_traffic_valid() -> None:
    opts = demo_options("--max-size", "8")
    assert opts.decode_max < opts.prefill_max == 8
    config = opts.traffic_config()
    assert config.max_size == 8
    assert opts.traffic_config().phase_calls >= 1


@pytest.mark.parametrize(
    "argv",
    [
        ["--duration", "0"],
        ["--duration", "-3"],
        ["--duration", "soon"],
        ["--duration", "inf"],
        ["--seed", "x"],
        ["--max-size", "0"],
        ["--check-every", "0"],
        ["--store", "/tmp/a", "--fresh"],
    ],
)
def test_demo_bad_arguments(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["demo", *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_cache_commands_are_registered() -> None:
    # `_cli_cache` exists in this tree: `pwdaemon cache ...` is reachable from the CLI.
    args = build_parser().parse_args(["cache", "ls", "--json"])
    assert args.command == "cache"
    assert callable(args.func)


def test_every_subcommand_is_registered() -> None:
    parser = build_parser()
    assert parser.parse_args(["demo"]).func is cmd_demo
    for argv in (
        ["cache", "ls"],
        ["cache", "verify"],
        ["cache", "clear", "--yes"],
        ["warm", "m:f", "--sizes", "1,2"],
    ):
        assert callable(parser.parse_args(argv).func), argv


def test_python_dash_m_version() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pwdaemon", "--version"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"pwdaemon {pwdaemon.__version__}"


def test_warm_takes_the_attention_backends_servers_turn_off(
    capsys: pytest.CaptureFixture[str],
) -> None:
    parser = build_parser()
    args = parser.parse_args(["warm", "m:f", "--sizes", "1", "--attention-off", "cudnn,flash"])
    assert args.attention_off == ["cudnn", "flash"]
    assert parser.parse_args(["warm", "m:f", "--sizes", "1"]).attention_off == []
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(["warm", "m:f", "--sizes", "1", "--attention-off", "cudnn,fast"])
    assert exc.value.code == 2
    assert "expected attention backends among cudnn,flash,mem_efficient,math" in (
        capsys.readouterr().err
    )
