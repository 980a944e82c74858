"""The service's messages: a small versioned protocol over `pwdaemon.workers.framing`.

Every request and reply is one frame. The frame header carries the message `type` and
`proto` (this module's `SERVICE_PROTOCOL`, checked on every request, separate from the
framing's own version); a submit's payload is the graph (GraphPickler bytes).

    client                          service
    ping                      ->    pong {pid, store, proto, version}
    submit {key, target, ...} ->    accepted {digest, result}   (queued | deduplicated | stored)
                                    done {digest, outcome, path, seconds, reason}  (later)
    status                    ->    status_reply {status}
    anything malformed        ->    error {reason, detail}, then the service closes

A submit is idempotent per key: the same key from any number of clients is one job.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from pwdaemon.serving.range_table import Target, TargetKind
from pwdaemon.store import ArtifactKey
from pwdaemon.workers.framing import Frame, FrameError, encode, file_reader, read_frame

SERVICE_PROTOCOL = 1
"""Bumped when a message changes meaning; a peer speaking another one gets an error."""

DEFAULT_SOCKET = "/run/pwdaemon/pwdaemon.sock"
SOCKET_ENV = "PWDAEMON_SOCKET"

# Graph payloads are 65-240 KB on the models in DESIGN.md; 64 MiB bounds what one
# client can make the service allocate per frame while leaving room for big graphs.
DEFAULT_MAX_PAYLOAD_BYTES = 64 << 20


class MessageType(StrEnum):
    PING = "ping"
    PONG = "pong"
    SUBMIT = "submit"
    ACCEPTED = "accepted"
    DONE = "done"
    STATUS = "status"
    STATUS_REPLY = "status_reply"
    ERROR = "error"


class SubmitResult(StrEnum):
    """What a submit did: started a job, joined one, or found the artifact stored."""

    QUEUED = "queued"
    DEDUPLICATED = "deduplicated"
    STORED = "stored"


class JobOutcome(StrEnum):
    OK = "ok"
    STORED = "stored"  # the store already held the artifact: nothing compiled
    FAILED = "failed"
    CRASHED = "crashed"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"  # the service stopped before compiling it

    @property
    def has_artifact(self) -> bool:
        return self in (JobOutcome.OK, JobOutcome.STORED)


class RefusalReason(StrEnum):
    """Why the service answered `error`. It closes the connection after every error
    reply: after a bad frame the stream position is unknown, so the peer starts clean."""

    MALFORMED = "malformed"
    OVERSIZED = "oversized"
    VERSION = "version"
    UNKNOWN_TYPE = "unknown_type"
    BAD_REQUEST = "bad_request"
    CREDENTIALS = "credentials"
    SHUTTING_DOWN = "shutting_down"


class ProtocolError(ValueError):
    """A well-framed message that is not a valid request; `reason` says which kind."""

    def __init__(self, reason: RefusalReason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def classify_frame_error(exc: FrameError) -> RefusalReason:
    """Which refusal a framing error is (for the error reply and the metric).

    The framing module reports one exception type with a reason a person can read; the
    size-limit and version wordings are what tell the classes apart.
    """
    text = str(exc)
    if "over the limit" in text or "outside 1.." in text or "is over" in text:
        return RefusalReason.OVERSIZED
    if "protocol version" in text:
        return RefusalReason.VERSION
    return RefusalReason.MALFORMED


@dataclass(frozen=True)
class SubmitRequest:
    """One compile job as a client asks for it."""

    key: ArtifactKey
    target: Target
    graph: bytes
    options: Mapping[str, Any] = field(default_factory=dict)
    fault: str | None = None  # test hook passed through to the worker (JobSpec.fault)
    hotness: float = 1.0  # this client's interest; the service sums it over clients
    client: str = ""  # a name for logs and status ("pid 123 model mlp")

    def encode(self) -> bytes:
        header = {
            "proto": SERVICE_PROTOCOL,
            "key": self.key.fields(),
            "target": self.target.label,
            "options": dict(self.options),
            "fault": self.fault,
            "hotness": self.hotness,
            "client": self.client,
        }
        return encode(MessageType.SUBMIT, header, self.graph)

    @classmethod
    def from_frame(cls, frame: Frame) -> SubmitRequest:
        def bad(detail: str) -> ProtocolError:
            return ProtocolError(RefusalReason.BAD_REQUEST, f"submit: {detail}")

        raw_key = frame.get("key")
        if not isinstance(raw_key, dict):
            raise bad("'key' must be an object of key fields")
        try:
            key = ArtifactKey.from_fields(raw_key)
            target = Target.parse(str(frame.get("target")))
        except ValueError as exc:
            raise bad(str(exc)) from None
        if target.kind is TargetKind.GRAPH:
            raise bad("CUDA graphs are captured in the serving process, not compiled here")
        if key.target != target.label:
            raise bad(f"key is for target {key.target!r}, request for {target.label!r}")
        options = frame.get("options", {})
        if not isinstance(options, dict):
            raise bad("'options' must be an object")
        fault = frame.get("fault")
        if fault not in (None, "raise", "crash", "hang"):
            raise bad(f"unknown fault {fault!r}")
        hotness = frame.get("hotness", 1.0)
        if (
            isinstance(hotness, bool)
            or not isinstance(hotness, int | float)
            or not math.isfinite(hotness)
            or hotness < 0
        ):
            raise bad(f"'hotness' must be a finite number >= 0, got {hotness!r}")
        if not frame.payload:
            raise bad("no graph payload")
        client = frame.get("client", "")
        return cls(
            key=key,
            target=target,
            graph=frame.payload,
            options=options,
            fault=fault,
            hotness=float(hotness),
            client=str(client)[:200],
        )


def check_version(frame: Frame) -> None:
    proto = frame.get("proto")
    if proto != SERVICE_PROTOCOL:
        raise ProtocolError(
            RefusalReason.VERSION,
            f"service protocol {proto!r}, the service speaks {SERVICE_PROTOCOL}: "
            "upgrade client and service together",
        )


def request(msg_type: MessageType, **header: Any) -> bytes:
    """A request frame (ping, status) with the protocol version set."""
    return encode(msg_type, {"proto": SERVICE_PROTOCOL, **header})


def reply(msg_type: MessageType, **header: Any) -> bytes:
    return encode(msg_type, {"proto": SERVICE_PROTOCOL, **header})


def error_reply(reason: RefusalReason, detail: str) -> bytes:
    return reply(MessageType.ERROR, reason=str(reason), detail=detail[:2000])


# ---- blocking client side -----------------------------------------------------------


class ServiceUnavailable(ConnectionError):
    """The service cannot be reached, went away, or refused us; callers fall back."""


def connect(path: str, timeout: float) -> socket.socket:
    """A connected Unix socket to the service; ServiceUnavailable if nobody answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(_address(path))
    except OSError as exc:
        sock.close()
        raise ServiceUnavailable(f"cannot connect to {path}: {exc}") from exc
    return sock


def _address(path: str) -> str:
    # '@name' is Linux's abstract namespace, as systemd writes it.
    return "\0" + path[1:] if path.startswith("@") else path


def recv(sock: socket.socket, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Frame:
    """One frame from the service; ServiceUnavailable on EOF, reset or garbage."""
    try:
        frame = read_frame(file_reader(sock.recv), max_payload)
    except TimeoutError:
        raise  # the service is there but slow: the caller decides
    except (OSError, EOFError, FrameError) as exc:
        raise ServiceUnavailable(f"service connection lost: {exc}") from exc
    if frame.type == MessageType.ERROR:
        raise ServiceUnavailable(
            f"service refused the request ({frame.get('reason')}): {frame.get('detail')}"
        )
    return frame


def send(sock: socket.socket, data: bytes) -> None:
    try:
        sock.sendall(data)
    except OSError as exc:
        # A refused peer is told why and closed at once, possibly before our request
        # went out: the reason is waiting in the receive buffer, so report that.
        sock.settimeout(1.0)
        try:
            frame = recv(sock)
        except (ServiceUnavailable, TimeoutError) as why:
            if isinstance(why, ServiceUnavailable) and "refused" in str(why):
                raise why from exc
        else:
            raise ServiceUnavailable(f"service connection lost (got {frame.type})") from exc
        raise ServiceUnavailable(f"service connection lost: {exc}") from exc


def call(path: str, msg_type: MessageType, timeout: float = 5.0) -> Frame:
    """One request, one reply, on a fresh connection (ping, status)."""
    sock = connect(path, timeout)
    try:
        send(sock, request(msg_type))
        return recv(sock)
    finally:
        sock.close()


def ping(path: str, timeout: float = 1.0) -> Frame | None:
    """The pong if the service answers within `timeout`, else None."""
    try:
        frame = call(path, MessageType.PING, timeout)
    except ServiceUnavailable:
        return None
    return frame if frame.type == MessageType.PONG else None
