"""Length-prefixed frames: the one wire format of worker pipes and the service socket.

A frame is a fixed prelude, a JSON header and an opaque payload:

    magic   4 bytes  b"PWDF"
    version u16      PROTOCOL_VERSION; a peer refuses a version it does not speak
    hlen    u32      header length in bytes (JSON object, UTF-8, has a "type" key)
    plen    u64      payload length in bytes (graph bytes, artifact bytes, or none)

Both lengths are checked against limits *before* anything is allocated, so a peer that
sends garbage or a huge length gets a `FrameError` (a reason a person can read), never a
memory blow-up. Readers take a `read_exact`-style function so the same code serves a
subprocess pipe, a socket and (through `read_frame_async`) an anyio stream.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

MAGIC = b"PWDF"
PROTOCOL_VERSION = 1
_PRELUDE = struct.Struct(">4sHIQ")
PRELUDE_BYTES = _PRELUDE.size

# A header is a small JSON object (type, ids, a key, a status table): 1 MiB is far past
# any real one and still cheap to refuse.
MAX_HEADER_BYTES = 1 << 20
# Graph payloads measured 65-240 KB on the models in DESIGN.md; artifacts a few MB. 512 MiB
# leaves room for big models while bounding what one bad frame can make us allocate.
DEFAULT_MAX_PAYLOAD_BYTES = 512 << 20

ReadExact = Callable[[int], bytes]
"""`read_exact(n)`: exactly n bytes, or fewer only at the end of the stream."""


class FrameError(ValueError):
    """A frame that cannot be read: bad magic, version, lengths, or header."""


class PeerClosed(EOFError):
    """The peer closed the stream between frames (a clean end, not an error)."""


@dataclass(frozen=True)
class Frame:
    """One message: its type, the rest of its header, and its payload."""

    type: str
    header: Mapping[str, Any] = field(default_factory=dict)
    payload: bytes = b""

    def get(self, key: str, default: Any = None) -> Any:
        return self.header.get(key, default)


def encode(msg_type: str, header: Mapping[str, Any] | None = None, payload: bytes = b"") -> bytes:
    """The bytes of one frame."""
    doc = {**(header or {}), "type": msg_type}
    head = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
    if len(head) > MAX_HEADER_BYTES:
        raise FrameError(f"header of {len(head)} bytes is over {MAX_HEADER_BYTES}")
    return _PRELUDE.pack(MAGIC, PROTOCOL_VERSION, len(head), len(payload)) + head + payload


def _parse_prelude(prelude: bytes, max_payload: int) -> tuple[int, int]:
    magic, version, hlen, plen = _PRELUDE.unpack(prelude)
    if magic != MAGIC:
        raise FrameError(f"not a pwdaemon frame (magic {magic!r})")
    if version != PROTOCOL_VERSION:
        raise FrameError(
            f"protocol version {version}, this side speaks {PROTOCOL_VERSION}: "
            "upgrade both sides together"
        )
    if hlen == 0 or hlen > MAX_HEADER_BYTES:
        raise FrameError(f"header length {hlen} outside 1..{MAX_HEADER_BYTES}")
    if plen > max_payload:
        raise FrameError(f"payload of {plen} bytes is over the limit of {max_payload}")
    return hlen, plen


def _parse_header(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise FrameError(f"header is not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("type"), str):
        raise FrameError("header is not a JSON object with a string 'type'")
    return doc


def _frame(doc: dict[str, Any], payload: bytes) -> Frame:
    msg_type = doc.pop("type")
    return Frame(msg_type, doc, payload)


def read_frame(read_exact: ReadExact, max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES) -> Frame:
    """Read one frame with `read_exact(n)` (returns exactly n bytes, or fewer at EOF).

    Raises `PeerClosed` at a clean end of stream (before a frame starts) and
    `FrameError` for a truncated or malformed frame.
    """
    prelude = read_exact(PRELUDE_BYTES)
    if not prelude:
        raise PeerClosed("peer closed the stream")
    if len(prelude) < PRELUDE_BYTES:
        raise FrameError("stream ended inside a frame's prelude")
    hlen, plen = _parse_prelude(prelude, max_payload)
    raw = read_exact(hlen)
    if len(raw) < hlen:
        raise FrameError("stream ended inside a frame's header")
    doc = _parse_header(raw)
    payload = read_exact(plen) if plen else b""
    if len(payload) < plen:
        raise FrameError("stream ended inside a frame's payload")
    return _frame(doc, payload)


async def read_frame_async(
    read_exact: Callable[[int], Awaitable[bytes]],
    max_payload: int = DEFAULT_MAX_PAYLOAD_BYTES,
) -> Frame:
    """`read_frame` for async streams; same errors."""
    prelude = await read_exact(PRELUDE_BYTES)
    if not prelude:
        raise PeerClosed("peer closed the stream")
    if len(prelude) < PRELUDE_BYTES:
        raise FrameError("stream ended inside a frame's prelude")
    hlen, plen = _parse_prelude(prelude, max_payload)
    raw = await read_exact(hlen)
    if len(raw) < hlen:
        raise FrameError("stream ended inside a frame's header")
    doc = _parse_header(raw)
    payload = await read_exact(plen) if plen else b""
    if len(payload) < plen:
        raise FrameError("stream ended inside a frame's payload")
    return _frame(doc, payload)


def file_reader(read: Callable[[int], bytes]) -> ReadExact:
    """`read_exact` over a file-like `read(n)` that may return short reads (a pipe)."""

    def read_exact(n: int) -> bytes:
        chunks: list[bytes] = []
        left = n
        while left > 0:
            chunk = read(left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    return read_exact


def fd_writer(fd: int) -> Callable[[bytes], None]:
    """`write_all(data)` to a file descriptor (a pipe may take a large frame in pieces)."""

    def write_all(data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]

    return write_all
