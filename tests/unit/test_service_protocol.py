"""The service protocol: submits round-trip through real frames; bad requests are refused."""

from __future__ import annotations

import socket
import struct

import pytest

from pwdaemon.service.protocol import (
    SERVICE_PROTOCOL,
    MessageType,
    ProtocolError,
    RefusalReason,
    ServiceUnavailable,
    SubmitRequest,
    check_version,
    classify_frame_error,
    recv,
    request,
)
from pwdaemon.serving.range_table import Target
from pwdaemon.store import make_key
from pwdaemon.workers.framing import MAGIC, Frame, FrameError, encode, file_reader, read_frame


def _request(target: str = "size:8") -> SubmitRequest:
    key = make_key("graph-fp", target, device="cpu", options={"a": 1})
    return SubmitRequest(key, Target.parse(target), b"graph", {"a": 1}, None, 2.5, "pid 1")


def _parse(data: bytes, max_payload: int = 1 << 20) -> Frame:
    chunks = [data]

    def read(n: int) -> bytes:
        buf = chunks[0]
        chunks[0] = buf[n:]
        return buf[:n]

    return read_frame(file_reader(read), max_payload)


def test_submit_round_trips() -> None:
    req = _request()
    back = SubmitRequest.from_frame(_parse(req.encode()))
    assert back == req
    assert back.key.digest == req.key.digest


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"key": "nope"}, "key"),
        ({"target": "size:9"}, "target"),
        ({"target": "graph:8"}, "CUDA graphs"),
        ({"hotness": -1}, "hotness"),
        ({"hotness": True}, "hotness"),
        ({"fault": "explode"}, "fault"),
        ({"options": [1]}, "options"),
    ],
)
def test_bad_submits_are_refused_with_a_reason(change: dict[str, object], needle: str) -> None:
    req = _request()
    header = {
        "proto": SERVICE_PROTOCOL,
        "key": req.key.fields(),
        "target": "size:8",
        "options": {},
        "hotness": 1.0,
        **change,
    }
    frame = _parse(encode(MessageType.SUBMIT, header, b"graph"))
    with pytest.raises(ProtocolError) as info:
        SubmitRequest.from_frame(frame)
    assert info.value.reason is RefusalReason.BAD_REQUEST
    assert needle in str(info.value)


def test_submit_without_payload_is_refused() -> None:
    req = _request()
    frame = _parse(encode(MessageType.SUBMIT, {"key": req.key.fields(), "target": "size:8"}))
    with pytest.raises(ProtocolError, match="no graph payload"):
        SubmitRequest.from_frame(frame)


def test_protocol_version_is_checked() -> None:
    check_version(_parse(request(MessageType.PING)))
    with pytest.raises(ProtocolError) as info:
        check_version(_parse(encode(MessageType.PING, {"proto": 99})))
    assert info.value.reason is RefusalReason.VERSION


def test_frame_errors_are_classified() -> None:
    huge = struct.pack(">4sHIQ", MAGIC, 1, 10, 1 << 40)
    with pytest.raises(FrameError) as info:
        _parse(huge + b"x" * 10)
    assert classify_frame_error(info.value) is RefusalReason.OVERSIZED
    with pytest.raises(FrameError) as info:
        _parse(struct.pack(">4sHIQ", MAGIC, 7, 10, 0) + b"x" * 10)
    assert classify_frame_error(info.value) is RefusalReason.VERSION
    with pytest.raises(FrameError) as info:
        _parse(b"GET / HTTP/1.1\r\n\r\n")
    assert classify_frame_error(info.value) is RefusalReason.MALFORMED


def test_recv_turns_errors_and_eof_into_service_unavailable() -> None:
    a, b = socket.socketpair()
    with a, b:
        b.sendall(encode(MessageType.ERROR, {"reason": "credentials", "detail": "uid 5"}))
        with pytest.raises(ServiceUnavailable, match="credentials"):
            recv(a)
        b.close()
        with pytest.raises(ServiceUnavailable, match="connection lost"):
            recv(a)
