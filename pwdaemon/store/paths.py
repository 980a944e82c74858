"""Where stores live: the per-user default and the host service's directory."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ("CACHE_DIR_ENV", "SERVICE_CACHE_DIR", "default_store_dir")

SERVICE_CACHE_DIR = Path("/var/cache/pwdaemon")
CACHE_DIR_ENV = "PWDAEMON_CACHE_DIR"


def default_store_dir(environ: Mapping[str, str] | None = None) -> Path:
    """$PWDAEMON_CACHE_DIR, else $XDG_CACHE_HOME/pwdaemon, else ~/.cache/pwdaemon."""
    env = os.environ if environ is None else environ
    explicit = env.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = env.get("XDG_CACHE_HOME")
    # The XDG spec says relative values are invalid and must be ignored.
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "pwdaemon"
    return Path.home() / ".cache" / "pwdaemon"
