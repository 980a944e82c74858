"""The systemd unit of the host service, rendered for a host's user and paths.

`systemd/pwdaemon.service` in the repository is `render_unit()` with the defaults (a
test keeps them equal); `pwdaemon install-service --print` renders it for another
executable, user or paths.

Choices that are not obvious:
- A dedicated system user, not DynamicUser: with DynamicUser the cache directory lives
  under /var/cache/private (mode 0700), so clients could not read the artifacts.
- Clients join the service's group: the socket is 0660 and the store 0750 (UMask).
- No PrivateUsers: peers' uids outside the user namespace would all read as "nobody"
  in SO_PEERCRED, and the credential check would refuse every client.
- No PrivateDevices (the GPU must be reachable); DevicePolicy=closed with DeviceAllow
  for NVIDIA's character devices instead.
- No MemoryDenyWriteExecute: compilers and libffi closures map executable memory.
- No ~@resources in the system call filter: workers lower their priority (setpriority).
"""

from __future__ import annotations

from dataclasses import dataclass

from pwdaemon.service.protocol import DEFAULT_SOCKET

DEFAULT_EXEC = "/usr/local/bin/pwdaemon"


@dataclass(frozen=True)
class UnitOptions:
    exec_path: str = DEFAULT_EXEC
    user: str = "pwdaemon"
    group: str = "pwdaemon"
    watchdog_s: int = 30
    drain_s: int = 30


_TEMPLATE = """\
# pwdaemon host compile service. Install: see systemd/README.md.
[Unit]
Description=pwdaemon host compile service for PyTorch
Documentation=https://github.com/pwdaemon/pwdaemon/tree/main/systemd
After=local-fs.target

[Service]
Type=notify
NotifyAccess=main
ExecStart={exec_path} serve --config /etc/pwdaemon/pwdaemon.toml \\
    --socket {socket} --store /var/cache/pwdaemon
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2
WatchdogSec={watchdog_s}
# SIGTERM drains: running compiles get drain_timeout_s ({drain_s} s), then workers die.
TimeoutStopSec={stop_s}
KillMode=mixed

User={user}
Group={group}
UMask=0027
RuntimeDirectory=pwdaemon
RuntimeDirectoryMode=0750
CacheDirectory=pwdaemon
CacheDirectoryMode=0750
ConfigurationDirectory=pwdaemon
ConfigurationDirectoryMode=0755
Environment=PWDAEMON_CACHE_DIR=/var/cache/pwdaemon
Environment=TORCHINDUCTOR_CACHE_DIR=/var/cache/pwdaemon/inductor
Environment=TRITON_CACHE_DIR=/var/cache/pwdaemon/triton
Environment=HOME=/var/cache/pwdaemon

# GPU: the NVIDIA devices only (no PrivateDevices, which would hide them).
DevicePolicy=closed
DeviceAllow=char-nvidia-frontend rw
DeviceAllow=char-nvidia-uvm rw
DeviceAllow=char-nvidia-caps r

# Hardening.
NoNewPrivileges=yes
CapabilityBoundingSet=
AmbientCapabilities=
ProtectSystem=strict
ProtectHome=yes
PrivateTmp=yes
PrivateIPC=yes
ProtectHostname=yes
ProtectClock=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectKernelLogs=yes
ProtectControlGroups=yes
ProtectProc=invisible
RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6
IPAddressDeny=any
IPAddressAllow=localhost
RestrictNamespaces=yes
RestrictRealtime=yes
RestrictSUIDSGID=yes
LockPersonality=yes
RemoveIPC=yes
KeyringMode=private
SystemCallArchitectures=native
SystemCallFilter=@system-service
SystemCallFilter=~@privileged @mount @debug @cpu-emulation @obsolete
SystemCallFilter=~@raw-io @reboot @swap @module @clock
SystemCallErrorNumber=EPERM

[Install]
WantedBy=multi-user.target
"""


def render_unit(options: UnitOptions | None = None, socket: str = DEFAULT_SOCKET) -> str:
    o = options or UnitOptions()
    for name, value in (("exec_path", o.exec_path), ("user", o.user), ("group", o.group)):
        if not value or any(c.isspace() for c in value) or "%" in value:
            raise ValueError(f"{name} must be a non-empty word without spaces or '%': {value!r}")
    if not o.exec_path.startswith("/"):
        raise ValueError(f"exec_path must be absolute (systemd requires it): {o.exec_path!r}")
    return _TEMPLATE.format(
        exec_path=o.exec_path,
        user=o.user,
        group=o.group,
        socket=socket,
        watchdog_s=o.watchdog_s,
        drain_s=o.drain_s,
        stop_s=o.drain_s + 30,
    )


EXAMPLE_CONFIG = """\
# /etc/pwdaemon/pwdaemon.toml: settings of `pwdaemon serve` (flags override them).
# Changes are picked up on save and on `systemctl reload pwdaemon`; an invalid file
# keeps the running configuration (see `journalctl -u pwdaemon`).
[service]
workers = 2                 # compiles running at once, for every client on the host
timeout_s = 600             # a compile running longer is killed
niceness = 10               # workers' CPU priority below serving processes
allow_uids = []             # uids allowed besides the service's own user
allow_gids = []             # gids allowed besides the service's group
max_payload_bytes = 67108864
metrics_port = 9401         # -1: no metrics endpoint
metrics_addr = "127.0.0.1"
drain_timeout_s = 30
log_level = "INFO"
"""
