"""The message reader on hostile byte streams: counted and skipped, never a crash or a desync."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from FreehandUSLib.igtl.crc64 import crc64
from FreehandUSLib.igtl.framing import BytesSource, MessageReader, StreamClosed
from FreehandUSLib.igtl.protocol import (
    HEADER_SIZE,
    ImageMessage,
    StatusMessage,
    StringMessage,
    TransformMessage,
    encode_message,
    is_plausible_header,
    pack_header,
    unpack_header,
)


def read_all(data: bytes, chunk: int = 1 << 20, **options):
    reader = MessageReader(BytesSource(data, chunk), **options)
    out = []
    with pytest.raises(StreamClosed):
        while True:
            out.append(reader.read())
    return out, reader.stats


def sample_messages(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    msgs = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            msgs.append(
                ImageMessage.from_frame(rng.integers(0, 256, (6, 9), dtype=np.uint8), device_name=f"Im{i}")
            )
        elif kind == 1:
            m = np.eye(4)
            m[:3, 3] = rng.normal(size=3) * 100
            msgs.append(TransformMessage(matrix=m, device_name=f"T{i}"))
        elif kind == 2:
            msgs.append(StringMessage(text=f"text {i} " * (i % 5), device_name=f"S{i}"))
        else:
            msgs.append(StatusMessage(code=1, status=f"s{i}", device_name=f"St{i}"))
    return msgs


def names(messages):
    return [m.device_name for m in messages]


def corrupt_crc(data: bytes) -> bytes:
    b = bytearray(data)
    b[-1] ^= 0x5A
    return bytes(b)


def with_type(data: bytes, type_name: str) -> bytes:
    b = bytearray(data)
    b[2:14] = type_name.encode().ljust(12, b"\x00")
    return bytes(b)


def short_transform(name: str) -> bytes:
    body = struct.pack(">10f", *range(10))
    return pack_header(1, "TRANSFORM", name, 0.0, len(body), crc64(body)) + body


def test_clean_stream_one_byte_at_a_time():
    msgs = sample_messages(12)
    data = b"".join(encode_message(m, header_version=1 + i % 2) for i, m in enumerate(msgs))
    out, stats = read_all(data, chunk=1)
    assert names(out) == names(msgs)
    assert stats.messages == 12 and stats.rejected == 0 and stats.bytes == len(data)


def test_bad_crc_is_counted_and_skipped():
    msgs = sample_messages(6)
    parts = [encode_message(m) for m in msgs]
    parts[2] = corrupt_crc(parts[2])
    out, stats = read_all(b"".join(parts))
    assert names(out) == names(msgs[:2] + msgs[3:])
    assert stats.crc_errors == 1 and stats.rejected == 1


def test_wrong_content_size_is_counted_as_malformed():
    msgs = sample_messages(4)
    data = encode_message(msgs[0]) + short_transform("Short") + b"".join(encode_message(m) for m in msgs[1:])
    out, stats = read_all(data)
    assert names(out) == names(msgs)
    assert stats.malformed == 1


def test_unknown_type_is_counted_and_skipped_or_returned_raw():
    msgs = sample_messages(3)
    data = encode_message(msgs[0]) + with_type(encode_message(msgs[1]), "POINT") + encode_message(msgs[2])
    out, stats = read_all(data)
    assert names(out) == [msgs[0].device_name, msgs[2].device_name]
    assert stats.unknown_types == 1
    out, stats = read_all(data, accept_raw=True)
    assert [m.type for m in out] == [msgs[0].type, "POINT", msgs[2].type]


def test_bad_header_resynchronises_on_the_next_message():
    msgs = sample_messages(5)
    garbage = bytes(range(1, 200))
    data = encode_message(msgs[0]) + garbage + b"".join(encode_message(m) for m in msgs[1:])
    out, stats = read_all(data, chunk=7)
    assert names(out) == names(msgs)
    assert stats.bad_headers == 1 and stats.resyncs == 1 and stats.skipped_bytes == len(garbage)


def test_damaged_size_field_recovers_with_the_following_message():
    msgs = sample_messages(5)
    parts = [encode_message(m) for m in msgs]
    b = bytearray(parts[1])
    size = struct.unpack_from(">Q", b, 42)[0]
    struct.pack_into(">Q", b, 42, size + 30)  # swallows 30 bytes of the next header
    parts[1] = bytes(b)
    out, stats = read_all(b"".join(parts))
    # The damaged message is lost; the reader finds the next header inside what it over-read.
    assert names(out) == names([msgs[0], *msgs[2:]])
    assert stats.crc_errors == 1 and stats.resyncs == 1


def test_truncated_stream_reports_the_partial_message():
    data = encode_message(sample_messages(1)[0])
    reader = MessageReader(BytesSource(data[:-5]))
    with pytest.raises(StreamClosed) as info:
        reader.read()
    assert info.value.partial > 0


def test_oversized_body_is_a_bad_header_and_never_allocated():
    huge = pack_header(1, "IMAGE", "big", 0.0, 1 << 40, 0)
    tail = encode_message(StatusMessage(device_name="after"))
    out, stats = read_all(huge + tail, max_body_bytes=1 << 20)
    assert names(out) == ["after"] and stats.bad_headers == 1


def test_idle_hook_can_abort_a_stalled_read():
    class Silent:
        def recv_into(self, view):
            raise TimeoutError

    calls = []

    def on_idle():
        calls.append(1)
        if len(calls) >= 3:
            raise RuntimeError("stalled")

    with pytest.raises(RuntimeError, match="stalled"):
        MessageReader(Silent(), on_idle=on_idle).read()
    assert len(calls) == 3


# -- fuzzing ---------------------------------------------------------------------------------
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(min_size=0, max_size=3000), st.integers(min_value=1, max_value=64))
def test_random_bytes_never_crash(data, chunk):
    reader = MessageReader(BytesSource(data, chunk), max_body_bytes=1 << 16)
    count = 0
    with pytest.raises(StreamClosed):
        while count < 1000:
            reader.read()
            count += 1
    assert reader.stats.bytes <= len(data)


CORRUPTIONS = ("none", "crc", "unknown", "short", "garbage")


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(st.sampled_from(CORRUPTIONS), min_size=1, max_size=14),
    st.binary(min_size=1, max_size=120),
    st.integers(min_value=1, max_value=97),
    st.integers(min_value=0, max_value=1000),
)
def test_corrupted_streams_keep_every_intact_message_in_order(plan, garbage, chunk, seed):
    msgs = sample_messages(len(plan), seed)
    parts, expected = [], []
    # Expected counters. After a CRC failure the reader scans for the next header whose body
    # passes its CRC; while scanning, a damaged or unknown-type message is just skipped bytes.
    crc_errors = unknown = malformed = resyncs = 0
    scanning = False
    for i, (kind, msg) in enumerate(zip(plan, msgs, strict=True)):
        data = encode_message(msg, header_version=1 + (i + seed) % 2)
        if kind == "none":
            parts.append(data)
            expected.append(msg.device_name)
        elif kind == "crc":
            parts.append(corrupt_crc(data))
        elif kind == "unknown":
            parts.append(with_type(data, "NOTKNOWN"))
        elif kind == "short":
            parts.append(short_transform(f"Bad{i}"))
        else:
            parts.append(garbage)
            parts.append(data)
            expected.append(msg.device_name)
        if scanning:
            if kind in ("crc", "unknown"):
                continue
            scanning = False
            resyncs += 1
            malformed += kind == "short"
        elif kind == "crc":
            crc_errors += 1
            scanning = True
        else:
            unknown += kind == "unknown"
            malformed += kind == "short"
            resyncs += kind == "garbage"
    stream = b"".join(parts)
    # Garbage that happens to hold something header-like is not garbage: leave such draws out.
    pos = 0
    for part in parts:
        if part is garbage:
            try:
                unpack_header(stream[pos : pos + HEADER_SIZE])
                assume(False)
            except Exception:
                pass
            for k in range(pos + 1, pos + len(garbage)):
                assume(not is_plausible_header(stream[k : k + HEADER_SIZE]))
        pos += len(part)
    out, stats = read_all(stream, chunk=chunk)
    assert names(out) == expected
    assert (stats.crc_errors, stats.unknown_types, stats.malformed, stats.resyncs) == (
        crc_errors, unknown, malformed, resyncs,
    )  # fmt: skip
