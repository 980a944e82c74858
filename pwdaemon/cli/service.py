"""`pwdaemon serve`, `pwdaemon status` and `pwdaemon install-service`: the host service.

`serve` runs the compile service in the foreground (systemd runs it as Type=notify);
`status` asks a running service over its socket and prints a table (or JSON);
`install-service --print` writes the systemd unit for this host's paths.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

from pwdaemon.service.config import CONFIG_ENV, DEFAULT_CONFIG, ConfigError, ConfigManager
from pwdaemon.service.protocol import DEFAULT_SOCKET, MessageType, ServiceUnavailable, call
from pwdaemon.service.units import EXAMPLE_CONFIG, UnitOptions, render_unit

log = logging.getLogger(__name__)


def _default_socket() -> str:
    from pwdaemon.service.client import default_socket

    return default_socket()


def _metrics_port(text: str) -> int:
    if text in ("off", "none", "-1"):
        return -1
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a port number or 'off', got {text!r}") from None
    if not 0 <= port < 65536:
        raise argparse.ArgumentTypeError(f"a port 0..65535 or 'off', got {port}")
    return port


def add_service_parsers(subparsers: Any) -> None:
    serve = subparsers.add_parser(
        "serve",
        help="run the host compile service (normally under systemd)",
        description="Compile for every serving process on this host: one queue, one "
        "concurrency limit, one compile per key. Settings come from the config file; "
        "flags override it.",
    )
    serve.add_argument(
        "--config",
        type=Path,
        default=None,
        help=f"TOML config file (default: ${CONFIG_ENV}, else {DEFAULT_CONFIG}; missing is fine)",
    )
    serve.add_argument("--socket", help="Unix socket path ('@name': abstract namespace)")
    serve.add_argument("--store", help="the shared artifact store directory")
    serve.add_argument("--workers", type=int, help="compiles running at once")
    serve.add_argument("--timeout-s", type=float, help="kill a compile running longer")
    serve.add_argument(
        "--metrics-port", type=_metrics_port, help="Prometheus port (0: any, 'off': none)"
    )
    serve.add_argument("--metrics-addr", help="address the metrics endpoint binds")
    serve.add_argument(
        "--allow-uid", type=int, action="append", help="uid allowed to connect (repeatable)"
    )
    serve.add_argument(
        "--allow-gid", type=int, action="append", help="gid allowed to connect (repeatable)"
    )
    serve.add_argument("--drain-timeout-s", type=float, help="on SIGTERM, wait this long")
    serve.add_argument(
        "--no-prestart", action="store_true", help="start workers on the first job, not now"
    )
    serve.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    serve.set_defaults(func=run_serve)

    status = subparsers.add_parser(
        "status", help="show the host service's queue, clients and counters"
    )
    status.add_argument("--socket", default=None, help="the service's socket")
    status.add_argument("--json", action="store_true", help="print the raw status as JSON")
    status.set_defaults(func=run_status)

    install = subparsers.add_parser(
        "install-service", help="render the systemd unit (and an example config)"
    )
    install.add_argument(
        "--print", action="store_true", required=True, help="write the unit to stdout"
    )
    install.add_argument(
        "--exec",
        dest="exec_path",
        default=None,
        help="absolute path of the pwdaemon executable (default: the one on PATH)",
    )
    install.add_argument("--user", default="pwdaemon")
    install.add_argument("--group", default="pwdaemon")
    install.add_argument("--socket", default=None)
    install.add_argument("--config", action="store_true", help="print the example config")
    install.set_defaults(func=run_install)


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """The flags that were given, as config settings."""
    out: dict[str, Any] = {}
    for flag, key in (
        ("socket", "socket"),
        ("store", "store"),
        ("workers", "workers"),
        ("timeout_s", "timeout_s"),
        ("metrics_port", "metrics_port"),
        ("metrics_addr", "metrics_addr"),
        ("drain_timeout_s", "drain_timeout_s"),
        ("log_level", "log_level"),
    ):
        value = getattr(args, flag, None)
        if value is not None:
            out[key] = value
    if args.allow_uid:
        out["allow_uids"] = list(args.allow_uid)
    if args.allow_gid:
        out["allow_gids"] = list(args.allow_gid)
    if args.no_prestart:
        out["prestart_workers"] = False
    return out


def _setup_logging(level: str) -> None:
    # Under systemd, journald stamps each line; a terminal gets our own timestamps.
    fmt = "%(levelname)s %(name)s: %(message)s"
    if "JOURNAL_STREAM" not in os.environ:
        fmt = "%(asctime)s " + fmt
    logging.basicConfig(level=level.upper(), format=fmt, stream=sys.stderr)


def run_serve(args: argparse.Namespace) -> int:
    from pwdaemon.service.server import serve

    path = args.config or Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG)
    try:
        manager = ConfigManager(path, overrides_from(args))
    except ConfigError as exc:
        print(f"pwdaemon serve: invalid configuration: {exc}", file=sys.stderr)
        return 2
    _setup_logging(manager.current.log_level)
    try:
        serve(manager)
    except OSError as exc:
        log.error("pwdaemon serve: %s", exc)
        return 1
    return 0


def format_status(status: dict[str, Any]) -> str:
    rows = [
        ("pid", status.get("pid")),
        ("version", status.get("version")),
        ("uptime", f"{float(status.get('uptime_s', 0)):.0f} s"),
        ("socket", status.get("socket")),
        ("store", status.get("store")),
        ("metrics", status.get("metrics_url") or "off"),
        ("concurrency limit", status.get("concurrency_limit")),
        ("workers", " ".join(str(p) for p in status.get("worker_pids", [])) or "none running"),
        ("queued", status.get("queued")),
        ("compiling", status.get("in_flight")),
        ("clients", status.get("clients")),
        ("jobs", _pairs(status.get("jobs", {}))),
        ("submits", _pairs(status.get("submits", {}))),
        ("config reloads", _pairs(status.get("config_reloads", {}))),
    ]
    if status.get("config_error"):
        rows.append(("config error", status["config_error"]))
    if status.get("stopping"):
        rows.append(("state", "stopping"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    queue = status.get("queue") or []
    if queue:
        lines += ["", f"{'key':<12}  {'target':<14}  {'state':<8}  {'hot':>6}  {'clients':>7}  age"]
        for j in queue:
            lines.append(
                f"{j['digest']:<12}  {j['target']:<14}  {j['state']:<8}  "
                f"{j['hotness']:>6g}  {j['clients']:>7}  {j['age_s']:.1f} s"
            )
    return "\n".join(lines)


def _pairs(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items()) if v) or "none"


def run_status(args: argparse.Namespace) -> int:
    path = args.socket or _default_socket()
    try:
        frame = call(path, MessageType.STATUS, timeout=5.0)
    except ServiceUnavailable as exc:
        print(f"pwdaemon status: no service at {path}: {exc}", file=sys.stderr)
        return 1
    status = dict(frame.get("status") or {})
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        print(format_status(status))
    return 0


def run_install(args: argparse.Namespace) -> int:
    if args.config:
        sys.stdout.write(EXAMPLE_CONFIG)
        return 0
    exec_path = args.exec_path or shutil.which("pwdaemon")
    if not exec_path:
        print("install-service: pwdaemon is not on PATH; pass --exec", file=sys.stderr)
        return 2
    try:
        text = render_unit(
            UnitOptions(exec_path=os.path.abspath(exec_path), user=args.user, group=args.group),
            socket=args.socket or DEFAULT_SOCKET,
        )
    except ValueError as exc:
        print(f"install-service: {exc}", file=sys.stderr)
        return 2
    sys.stdout.write(text)
    return 0
