"""Peer credentials: the kernel's SO_PEERCRED, checked against uid and gid allow lists."""

from __future__ import annotations

import logging
import os
import socket

import pytest

from pwdaemon.service.credentials import (
    AllowList,
    PeerCredentials,
    Verdict,
    check_peer,
    peer_credentials,
)


def test_peer_credentials_come_from_the_kernel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        peer = peer_credentials(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert os.getegid() in peer.groups or not peer.groups


def test_allow_list_by_uid_gid_and_supplementary_group() -> None:
    allow = AllowList.of(uids=[1000], gids=[2000])
    assert allow.check(PeerCredentials(1, 1000, 5)) is Verdict.ALLOWED_UID
    assert allow.check(PeerCredentials(1, 1001, 2000)) is Verdict.ALLOWED_GROUP
    assert allow.check(PeerCredentials(1, 1001, 5, frozenset({7, 2000}))) is Verdict.ALLOWED_GROUP
    assert allow.check(PeerCredentials(1, 1001, 5, frozenset({7}))) is Verdict.REFUSED
    assert AllowList.of([], []).check(PeerCredentials(1, 0, 0)) is Verdict.REFUSED


def test_refusal_is_logged_with_the_uid(caplog: pytest.LogCaptureFixture) -> None:
    allow = AllowList.of(uids=[os.geteuid() + 4242], gids=[os.getegid() + 4242])
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b, caplog.at_level(logging.WARNING, "pwdaemon.service.credentials"):
        peer, verdict = check_peer(a, allow)
    assert verdict is Verdict.REFUSED and peer is not None
    assert f"uid {os.geteuid()}" in caplog.text


def test_a_socket_without_credentials_is_refused() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    a.close()
    with b:
        # A closed socket cannot report credentials: refused, never an exception.
        peer, verdict = check_peer(a, AllowList.default())
    assert (peer, verdict) == (None, Verdict.REFUSED)
