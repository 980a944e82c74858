"""The frame format of worker pipes and the service socket: round trips and refusals.

Every malformed input must end in `FrameError` (a reason a person can read) or, at a clean
end of stream, `PeerClosed`: never another exception, never a read past the limits.
"""

from __future__ import annotations

import io
import os
import random
import struct
import threading

import anyio
import pytest

from pwdaemon.workers import framing
from pwdaemon.workers.framing import (
    MAGIC,
    PRELUDE_BYTES,
    PROTOCOL_VERSION,
    Frame,
    FrameError,
    PeerClosed,
    encode,
    file_reader,
    read_frame,
    read_frame_async,
)

_PRELUDE = struct.Struct(">4sHIQ")


def _reader(data: bytes) -> framing.ReadExact:
    return file_reader(io.BytesIO(data).read)


def _raw(header: bytes, payload: bytes = b"", *, magic: bytes = MAGIC, version: int = 1) -> bytes:
    return _PRELUDE.pack(magic, version, len(header), len(payload)) + header + payload


@pytest.mark.parametrize(
    ("msg_type", "header", "payload"),
    [
        ("ready", {}, b""),
        ("job", {"target": "size:8", "options": {"max_autotune": False}}, b"\x00\xff" * 1000),
        ("result", {"path": "/tmp/x é", "seconds": 1.5, "nested": [1, None, "a"]}, b""),
        ("artifact", {}, bytes(range(256)) * 300),
    ],
)
def test_frames_round_trip(msg_type: str, header: dict[str, object], payload: bytes) -> None:
    data = encode(msg_type, header, payload)
    frame = read_frame(_reader(data))
    assert frame == Frame(msg_type, header, payload)
    assert frame.get("missing", 7) == 7


def test_consecutive_frames_then_clean_end() -> None:
    data = b"".join(encode("n", {"i": i}, os.urandom(i)) for i in range(20))
    read = _reader(data)
    assert [read_frame(read).get("i") for _ in range(20)] == list(range(20))
    with pytest.raises(PeerClosed):
        read_frame(read)


def test_frames_survive_short_reads_of_a_pipe() -> None:
    # A pipe returns what is there; file_reader must assemble exact lengths. A writer
    # thread feeds a real pipe in small pieces, past the pipe's buffer size.
    data = encode("job", {"k": "v"}, os.urandom(200_000))
    r, w = os.pipe()

    def feed() -> None:
        for i in range(0, len(data), 997):
            os.write(w, data[i : i + 997])
        os.close(w)

    writer = threading.Thread(target=feed)
    writer.start()
    sizes: list[int] = []

    def read(n: int) -> bytes:
        got = os.read(r, n)
        sizes.append(len(got))
        return got

    try:
        frame = read_frame(file_reader(read))
        with pytest.raises(PeerClosed):
            read_frame(file_reader(read))
    finally:
        writer.join()
        os.close(r)
    assert frame.type == "job" and frame.payload == data[-200_000:]
    assert len(sizes) > 3  # the frame really arrived in short reads


def test_async_reader_matches_sync() -> None:
    data = encode("job", {"a": 1}, b"payload") + encode("done")

    async def main() -> list[Frame]:
        buf = io.BytesIO(data)

        async def read_exact(n: int) -> bytes:
            await anyio.sleep(0)
            return buf.read(n)

        frames = [await read_frame_async(read_exact) for _ in range(2)]
        with pytest.raises(PeerClosed):
            await read_frame_async(read_exact)
        return frames

    assert anyio.run(main) == [Frame("job", {"a": 1}, b"payload"), Frame("done")]


def test_encode_refuses_a_header_over_the_limit() -> None:
    with pytest.raises(FrameError, match="header of"):
        encode("big", {"x": "a" * framing.MAX_HEADER_BYTES})


def _truncations() -> list[bytes]:
    data = encode("job", {"a": 1}, b"0123456789")
    hlen = len(data) - PRELUDE_BYTES - 10
    # inside the prelude, inside the header, inside the payload
    return [data[:3], data[: PRELUDE_BYTES + hlen // 2], data[:-4]]


@pytest.mark.parametrize("data", _truncations(), ids=["prelude", "header", "payload"])
def test_truncated_frame_is_a_frame_error(data: bytes) -> None:
    with pytest.raises(FrameError, match="stream ended inside"):
        read_frame(_reader(data))


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_raw(b'{"type":"x"}', magic=b"HTTP"), "not a pwdaemon frame"),
        (_raw(b'{"type":"x"}', version=PROTOCOL_VERSION + 1), "protocol version"),
        (_raw(b'{"type":"x"}', version=0), "protocol version"),
        (_raw(b""), "header length 0"),
        (_raw(b"not json"), "header is not JSON"),
        (_raw(b"\xff\xfe{}"), "header is not JSON"),
        (_raw(b"[1, 2]"), "JSON object with a string 'type'"),
        (_raw(b'{"kind": "x"}'), "JSON object with a string 'type'"),
        (_raw(b'{"type": 3}'), "JSON object with a string 'type'"),
    ],
    ids=[
        "magic",
        "newer-version",
        "version-0",
        "empty-header",
        "not-json",
        "not-utf8",
        "json-list",
        "no-type",
        "type-not-str",
    ],
)
def test_malformed_frame_is_a_frame_error(data: bytes, match: str) -> None:
    with pytest.raises(FrameError, match=match):
        read_frame(_reader(data))


def test_oversized_lengths_are_refused_before_reading() -> None:
    reads: list[int] = []

    def counting(data: bytes) -> framing.ReadExact:
        inner = _reader(data)

        def read_exact(n: int) -> bytes:
            reads.append(n)
            return inner(n)

        return read_exact

    huge_payload = _PRELUDE.pack(MAGIC, PROTOCOL_VERSION, 12, 1 << 40) + b'{"type":"x"}'
    with pytest.raises(FrameError, match="over the limit"):
        read_frame(counting(huge_payload))
    assert reads == [PRELUDE_BYTES]  # nothing read (or allocated) past the prelude
    reads.clear()
    huge_header = _PRELUDE.pack(MAGIC, PROTOCOL_VERSION, framing.MAX_HEADER_BYTES + 1, 0)
    with pytest.raises(FrameError, match="header length"):
        read_frame(counting(huge_header))
    assert reads == [PRELUDE_BYTES]
    # A caller's own, lower payload limit is honoured too.
    with pytest.raises(FrameError, match="over the limit of 100"):
        read_frame(_reader(encode("x", {}, b"a" * 101)), max_payload=100)
    assert read_frame(_reader(encode("x", {}, b"a" * 100)), max_payload=100).payload == b"a" * 100


def test_fuzz_random_bytes_and_mutations_only_raise_frame_errors() -> None:
    rng = random.Random(1234)
    good = encode("job", {"target": "size:4", "n": [1, 2.5, None]}, os.urandom(64))
    outcomes = {"frame": 0, "error": 0, "closed": 0}
    for i in range(3000):
        if i % 3 == 0:
            data = rng.randbytes(rng.randrange(0, 200))
        elif i % 3 == 1:
            # A valid prelude with random lengths and random rest: exercises the checks
            # after the magic and version.
            data = _PRELUDE.pack(
                MAGIC, PROTOCOL_VERSION, rng.randrange(0, 64), rng.randrange(0, 1 << 33)
            ) + rng.randbytes(rng.randrange(0, 100))
        else:
            mutated = bytearray(good)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.randrange(256)
            cut = len(mutated) if rng.random() < 0.5 else rng.randrange(len(mutated) + 1)
            data = bytes(mutated[:cut])
        try:
            frame = read_frame(_reader(data), max_payload=1 << 20)
        except FrameError:
            outcomes["error"] += 1
        except PeerClosed:
            assert data == b""
            outcomes["closed"] += 1
        else:
            # Only a frame whose bytes are all consumed and whose header is an object
            # with a string type is accepted.
            assert isinstance(frame.type, str) and isinstance(frame.header, dict)
            assert encode(frame.type, frame.header, frame.payload)[:4] == MAGIC
            outcomes["frame"] += 1
    assert outcomes["error"] > 2000
    assert outcomes["frame"] > 0  # mutations of the payload still read back as frames
