"""Who may talk to the service: SO_PEERCRED checked against allowed uids and gids.

A submit carries a pickled graph, which is code the service's workers run: only
trusted peers may send one. The kernel reports the peer's pid, uid and gid at connect
time (SO_PEERCRED cannot be forged by the peer); supplementary groups are read from
/proc/<pid>/status so members of the service's client group are allowed too.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

log = logging.getLogger(__name__)

_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


@dataclass(frozen=True)
class PeerCredentials:
    pid: int
    uid: int
    gid: int
    groups: frozenset[int] = frozenset()  # supplementary groups, when /proc tells


class Verdict(StrEnum):
    ALLOWED_UID = "allowed_uid"
    ALLOWED_GROUP = "allowed_group"
    REFUSED = "refused"

    @property
    def allowed(self) -> bool:
        return self is not Verdict.REFUSED


def peer_credentials(sock: socket.socket) -> PeerCredentials:
    """The connected peer's pid, uid, gid (and supplementary groups) from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return PeerCredentials(pid, uid, gid, supplementary_groups(pid))


def supplementary_groups(pid: int) -> frozenset[int]:
    """Groups of `pid` from /proc (empty if the process is gone or /proc is hidden).

    Read right after accept: the peer may exit and its pid be reused, but then it is
    also gone from the socket, and a later request on this connection fails anyway.
    """
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return frozenset(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return frozenset()


@dataclass(frozen=True)
class AllowList:
    """Uids and gids allowed to connect. Empty sets allow nobody (not everybody)."""

    uids: frozenset[int]
    gids: frozenset[int]

    @classmethod
    def of(cls, uids: Iterable[int], gids: Iterable[int]) -> AllowList:
        return cls(frozenset(uids), frozenset(gids))

    @classmethod
    def default(cls) -> AllowList:
        """The service's own user and group: its clients join that group."""
        return cls(frozenset({os.geteuid()}), frozenset({os.getegid()}))

    def check(self, peer: PeerCredentials) -> Verdict:
        if peer.uid in self.uids:
            return Verdict.ALLOWED_UID
        if peer.gid in self.gids or peer.groups & self.gids:
            return Verdict.ALLOWED_GROUP
        return Verdict.REFUSED

    def describe(self) -> str:
        return f"uids {sorted(self.uids)}, gids {sorted(self.gids)}"


def check_peer(sock: socket.socket, allow: AllowList) -> tuple[PeerCredentials | None, Verdict]:
    """Credentials and verdict for a freshly accepted connection; refusals are logged.

    A socket whose credentials cannot be read (not AF_UNIX) is refused.
    """
    try:
        peer = peer_credentials(sock)
    except OSError as exc:
        log.warning("refused a connection: cannot read its peer credentials (%s)", exc)
        return None, Verdict.REFUSED
    verdict = allow.check(peer)
    if not verdict.allowed:
        log.warning(
            "refused a connection from uid %d (gid %d, pid %d): not in the allowed %s",
            peer.uid,
            peer.gid,
            peer.pid,
            allow.describe(),
        )
    return peer, verdict
