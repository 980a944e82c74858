"""The host compile service (`pwdaemon serve`) and its clients.

Modules, one concern each: `protocol` (message types over the shared framing),
`credentials` (who may connect), `listener` (the socket and one connection), `notify`
(sd_notify), `config` (the TOML file, CLI overrides, hot reload), `queue` (one job per
key, hotness and fairness), `metrics` (what the service exports), `server` (the anyio
socket server), `client` (`ServiceExecutor`, the `Executor` that uses the service and
falls back to embedded workers) and `units` (the systemd unit rendered for a host).
"""
