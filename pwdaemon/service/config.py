"""The service's configuration: /etc/pwdaemon/pwdaemon.toml, CLI flags over it, hot reload.

Precedence: built-in defaults < the TOML file < command-line flags. The file is
re-read when it changes (a watchdog observer on its directory, since editors replace
files by rename) and on SIGHUP. A file that does not parse or validate keeps the running
configuration: what is wrong is logged and counted (`pwdaemon_service_config_reloads_total
{outcome="invalid"}`). Settings that need a restart (socket, store, metrics endpoint)
are reported when they change, not applied.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import threading
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from pwdaemon.config import default_workers
from pwdaemon.service.protocol import DEFAULT_MAX_PAYLOAD_BYTES, DEFAULT_SOCKET
from pwdaemon.store import SERVICE_CACHE_DIR

log = logging.getLogger(__name__)

DEFAULT_CONFIG = Path("/etc/pwdaemon/pwdaemon.toml")
CONFIG_ENV = "PWDAEMON_CONFIG"


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; says which key and why."""


class ReloadOutcome(StrEnum):
    APPLIED = "applied"
    UNCHANGED = "unchanged"
    INVALID = "invalid"


@dataclass(frozen=True)
class ServiceConfig:
    """Every knob of `pwdaemon serve`; the TOML file uses the same names."""

    socket: str = DEFAULT_SOCKET
    """Unix socket path ('@name' for the abstract namespace). Restart to change."""
    store: str = str(SERVICE_CACHE_DIR)
    """The shared artifact store. Restart to change."""
    workers: int = field(default_factory=default_workers)
    """The global concurrency limit: compiles running at once for all clients."""
    timeout_s: float = 600.0
    """A compile running longer is killed with its worker."""
    niceness: int = 10
    """Workers run at lower CPU priority than the serving processes on the host."""
    allow_uids: tuple[int, ...] = ()
    """Uids allowed to connect, besides the service's own."""
    allow_gids: tuple[int, ...] = ()
    """Gids (primary or supplementary) allowed to connect, besides the service's own."""
    socket_mode: int = 0o660
    """Mode of the socket file: the service group may connect, nobody else."""
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES
    """Largest graph a client may send; a bigger frame is refused."""
    metrics_port: int | None = 9401
    """Prometheus endpoint port (0: any free port; None or -1 in the file: off). Restart."""
    metrics_addr: str = "127.0.0.1"
    """Address the metrics endpoint binds; loopback unless exposing it is deliberate."""
    drain_timeout_s: float = 30.0
    """On SIGTERM, running compiles get this long to finish before workers are killed."""
    status_interval_s: float = 2.0
    """How often STATUS= is sent to systemd (when it changed)."""
    prestart_workers: bool = True
    """Start the worker pool at start-up (first compile does not pay the torch import)."""
    log_level: str = "INFO"

    RESTART_ONLY = ("socket", "store", "metrics_port", "metrics_addr")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        def need(cond: bool, key: str, what: str) -> None:
            if not cond:
                raise ConfigError(f"{key} must be {what}, got {getattr(self, key)!r}")

        need(isinstance(self.socket, str) and bool(self.socket), "socket", "a path")
        need(isinstance(self.store, str) and bool(self.store), "store", "a directory")
        need(_is_int(self.workers) and self.workers >= 1, "workers", "an int >= 1")
        need(_is_num(self.timeout_s) and self.timeout_s > 0, "timeout_s", "a number > 0")
        need(_is_int(self.niceness) and 0 <= self.niceness <= 19, "niceness", "an int 0..19")
        need(all(_is_int(u) and u >= 0 for u in self.allow_uids), "allow_uids", "uids")
        need(all(_is_int(g) and g >= 0 for g in self.allow_gids), "allow_gids", "gids")
        need(_is_int(self.socket_mode) and 0 <= self.socket_mode <= 0o777, "socket_mode", "a mode")
        need(
            _is_int(self.max_payload_bytes) and self.max_payload_bytes >= 1024,
            "max_payload_bytes",
            "an int >= 1024",
        )
        need(
            self.metrics_port is None
            or (_is_int(self.metrics_port) and 0 <= self.metrics_port < 65536),
            "metrics_port",
            "a port 0..65535, or -1 for none",
        )
        need(_is_num(self.drain_timeout_s) and self.drain_timeout_s >= 0, "drain_timeout_s", ">= 0")
        need(
            _is_num(self.status_interval_s) and self.status_interval_s > 0,
            "status_interval_s",
            "a number > 0",
        )
        need(isinstance(self.prestart_workers, bool), "prestart_workers", "true or false")
        need(
            isinstance(self.log_level, str)
            and self.log_level.upper() in ("DEBUG", "INFO", "WARNING", "ERROR"),
            "log_level",
            "DEBUG, INFO, WARNING or ERROR",
        )

    def replace(self, **changes: Any) -> ServiceConfig:
        return dataclasses.replace(self, **changes)


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v == v


_FIELDS = {f.name: f for f in dataclasses.fields(ServiceConfig)}


def from_mapping(values: Mapping[str, Any], base: ServiceConfig | None = None) -> ServiceConfig:
    """`base` (default: defaults) with `values` applied; ConfigError names a bad key."""
    unknown = sorted(set(values) - set(_FIELDS))
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)} (known: {', '.join(_FIELDS)})")
    changes: dict[str, Any] = {}
    for name, value in values.items():
        if name in ("allow_uids", "allow_gids"):
            if not isinstance(value, list | tuple):
                raise ConfigError(f"{name} must be a list of ints, got {value!r}")
            value = tuple(value)
        if name == "metrics_port" and value == -1:
            value = None
        changes[name] = value
    try:
        return dataclasses.replace(base or ServiceConfig(), **changes)
    except TypeError as exc:
        raise ConfigError(str(exc)) from None


def read_file(path: Path) -> dict[str, Any]:
    """The file's settings (the top level, or a [service] table); ConfigError if unusable.

    A missing file is no settings: the service runs on defaults and flags.
    """
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    section = doc.get("service", doc)
    if not isinstance(section, dict):
        raise ConfigError(f"{path}: [service] must be a table")
    return section


class ConfigManager:
    """The live config: file + overrides, re-read on demand. Thread-safe `current`."""

    def __init__(self, path: Path | None, overrides: Mapping[str, Any]) -> None:
        self.path = path
        self.overrides = dict(overrides)
        self._lock = threading.Lock()
        self._digest: str | None = None
        self.reloads: dict[ReloadOutcome, int] = dict.fromkeys(ReloadOutcome, 0)
        self.last_error: str | None = None
        # At start an invalid file is fatal (nothing to keep); the caller reports it.
        self.current = self._build()
        self._digest = self._file_digest()

    def _file_digest(self) -> str | None:
        if self.path is None:
            return None
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except OSError:
            return None

    def _build(self) -> ServiceConfig:
        values = read_file(self.path) if self.path is not None else {}
        base = from_mapping(values)
        return from_mapping(self.overrides, base)

    def reload(self) -> tuple[ReloadOutcome, ServiceConfig]:
        """Re-read the file. Invalid: the old config stays, the error is logged and counted."""
        with self._lock:
            digest = self._file_digest()
            if digest == self._digest:
                self.reloads[ReloadOutcome.UNCHANGED] += 1
                return ReloadOutcome.UNCHANGED, self.current
            try:
                new = self._build()
            except ConfigError as exc:
                self.reloads[ReloadOutcome.INVALID] += 1
                self.last_error = str(exc)
                self._digest = digest  # the same broken bytes are reported once
                log.error(
                    "config %s is invalid, keeping the running configuration: %s", self.path, exc
                )
                return ReloadOutcome.INVALID, self.current
            old, self.current, self._digest = self.current, new, digest
            self.last_error = None
            self.reloads[ReloadOutcome.APPLIED] += 1
        for name in ServiceConfig.RESTART_ONLY:
            if getattr(old, name) != getattr(new, name):
                log.warning(
                    "config: %s changed to %r; it takes effect at the next restart",
                    name,
                    getattr(new, name),
                )
        changed = [n for n in _FIELDS if getattr(old, n) != getattr(new, n)]
        log.info("config %s reloaded (changed: %s)", self.path, ", ".join(changed) or "nothing")
        return ReloadOutcome.APPLIED, new


class ConfigWatcher:
    """Calls `on_change()` (from the observer's thread) when the config file changes.

    Watches the file's directory, not the file: editors and config management replace
    a file by writing another and renaming it over, which a watch on the old inode
    would never see.
    """

    def __init__(self, path: Path, on_change: Callable[[], None]) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        self.path = path
        name = path.name
        outer_on_change = on_change

        class _Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type in ("opened", "closed_no_write"):
                    return
                names = {os.path.basename(os.fsdecode(event.src_path))}
                if event.dest_path:
                    names.add(os.path.basename(os.fsdecode(event.dest_path)))
                if name in names:
                    outer_on_change()

        self._observer = Observer()
        self._observer.schedule(_Handler(), str(path.parent), recursive=False)

    def start(self) -> ConfigWatcher:
        self._observer.start()
        return self

    def stop(self) -> None:
        self._observer.stop()
        if self._observer.is_alive():
            self._observer.join(5.0)
