"""OpenIGTLink wire format: CRC-64, headers v1/v2, metadata, message codecs, PLUS command XML."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from FreehandUSLib.errors import FreehandUSError
from FreehandUSLib.igtl.commands import (
    command_xml,
    parse_command_xml,
    parse_reply_xml,
    reply_xml,
    uid_from_command_device,
)
from FreehandUSLib.igtl.crc64 import crc64, crc64_backend, crc64_reference
from FreehandUSLib.igtl.protocol import (
    HEADER_SIZE,
    CommandMessage,
    ImageMessage,
    PositionMessage,
    ProtocolError,
    RawMessage,
    RTSCommandMessage,
    StatusMessage,
    StringMessage,
    TrackingDataElement,
    TrackingDataMessage,
    TransformMessage,
    decode_body,
    encode_message,
    is_plausible_header,
    pack_header,
    timestamp_from_igtl,
    timestamp_to_igtl,
    unpack_header,
)

RNG = np.random.default_rng(7)
MATRIX = np.array([[0.6, -0.8, 0.0, 12.5], [0.8, 0.6, 0.0, -30.25], [0.0, 0.0, 1.0, 250.0], [0.0, 0.0, 0.0, 1.0]])


def roundtrip(message, version=1):
    data = encode_message(message, header_version=version)
    header = unpack_header(data[:HEADER_SIZE])
    assert header.body_size == len(data) - HEADER_SIZE
    return decode_body(header, data[HEADER_SIZE:])


# -- CRC -------------------------------------------------------------------------------------
def test_crc64_check_value_of_ecma182():
    assert crc64(b"123456789") == 0x6C40DF5F0B497347
    assert crc64(b"") == 0


@pytest.mark.parametrize("n", [1, 7, 8, 9, 63, 64, 65, 1000, 505_121])
def test_crc64_matches_bitwise_reference_and_continues(n):
    data = RNG.integers(0, 256, n, dtype=np.uint8).tobytes()
    expected = crc64_reference(data)
    assert crc64(data) == expected
    cut = n // 3
    assert crc64(data[cut:], crc64(data[:cut])) == expected
    assert crc64(np.frombuffer(data, np.uint8)) == expected


def test_crc64_agrees_with_crcmod_used_by_pyigtl():
    pytest.importorskip("pyigtl")
    from pyigtl.messages import CRC64

    data = RNG.integers(0, 256, 4099, dtype=np.uint8).tobytes()
    assert crc64(data) == CRC64(data)


def test_crc64_uses_a_fast_backend():
    assert crc64_backend() in ("numba", "crcmod")


# -- header ----------------------------------------------------------------------------------
@pytest.mark.parametrize("t", [0.0, 1.5, 1700000000.123456789, 4294967295.5])
def test_timestamp_roundtrip_within_fixed_point_resolution(t):
    seconds, fraction = timestamp_to_igtl(t)
    assert 0 <= fraction < 2**32
    assert abs(timestamp_from_igtl(seconds, fraction) - t) <= 2.0**-32 + 1e-12 * t


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf"), 2.0**32])
def test_timestamp_out_of_range_raises(bad):
    with pytest.raises(ProtocolError, match="timestamp"):
        timestamp_to_igtl(bad)


@pytest.mark.parametrize("version", [1, 2])
def test_header_pack_unpack(version):
    raw = pack_header(version, "TRANSFORM", "ProbeToTracker", 12.25, 60, 0xDEADBEEF)
    assert len(raw) == HEADER_SIZE
    h = unpack_header(raw)
    assert (h.version, h.type, h.device_name, h.timestamp_s, h.body_size, h.crc) == (
        version, "TRANSFORM", "ProbeToTracker", 12.25, 60, 0xDEADBEEF,
    )  # fmt: skip
    assert is_plausible_header(raw)


def test_header_rejects_long_device_name():
    with pytest.raises(ProtocolError, match="device name .* at most 20"):
        pack_header(1, "STRING", "D" * 21, 0.0, 0, 0)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda b: struct.pack(">H", 7) + b[2:], "header version 7"),
        (lambda b: b[:2] + b"tr\x01nsform\x00\x00\x00" + b[14:], "message type"),
        (lambda b: b[:14] + b"\x07" * 20 + b[34:], "device name .* control characters"),
        (lambda b: b[:42] + struct.pack(">Q", 2**40) + b[50:], "exceeds the limit"),
    ],
)
def test_unpack_header_rejects_bad_fields(mutate, fragment):
    good = pack_header(1, "TRANSFORM", "Probe", 1.0, 48, 0)
    with pytest.raises(ProtocolError, match=fragment):
        unpack_header(mutate(good), max_body_bytes=1 << 30)


def test_unpack_header_wrong_length_and_v2_without_extended_header():
    with pytest.raises(ProtocolError, match="58 bytes"):
        unpack_header(b"\x00" * 57)
    with pytest.raises(ProtocolError, match="extended header"):
        unpack_header(pack_header(2, "STATUS", "", 0.0, 5, 0))


def test_unknown_type_is_not_plausible_while_resynchronising():
    raw = pack_header(1, "ZZTOP", "x", 0.0, 0, 0)
    assert unpack_header(raw).type == "ZZTOP"
    assert not is_plausible_header(raw)
    assert is_plausible_header(pack_header(1, "GET_STATUS", "", 0.0, 0, 0))


# -- codecs ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.float32, np.float64]
)
@pytest.mark.parametrize("version", [1, 2])
def test_image_roundtrip(dtype, version):
    frame = (RNG.normal(size=(31, 45)) * 50).astype(dtype)
    msg = ImageMessage.from_frame(frame, MATRIX, device_name="Image_Reference", timestamp_s=3.5,
                                  metadata={"ImageToReferenceTransformStatus": "OK"})  # fmt: skip
    out = roundtrip(msg, version)
    assert isinstance(out, ImageMessage)
    assert out.pixels.shape == (1, 31, 45)
    np.testing.assert_array_equal(out.frame, frame)
    np.testing.assert_allclose(out.ijk_to_world, MATRIX, atol=1e-4)
    assert out.timestamp_s == 3.5 and out.device_name == "Image_Reference"
    assert out.header_version == version
    assert out.metadata == ({"ImageToReferenceTransformStatus": "OK"} if version == 2 else {})


def test_image_big_endian_color_and_volume():
    vol = RNG.integers(0, 60000, size=(3, 5, 7), dtype=np.uint16).astype(">u2")
    out = roundtrip(ImageMessage(pixels=vol, coordinate="LPS"))
    np.testing.assert_array_equal(out.pixels, vol.astype(np.uint16))
    assert out.coordinate == "LPS" and out.size_ijk == (7, 5, 3)
    rgb = RNG.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    out = roundtrip(ImageMessage.from_frame(rgb))
    assert out.n_components == 3
    np.testing.assert_array_equal(out.frame, rgb)


def test_image_centre_convention_matches_openigtlink():
    # The 4th column on the wire is the world position of the image centre ((size-1)/2).
    msg = ImageMessage.from_frame(np.zeros((11, 21), np.uint8), np.diag([0.5, 0.25, 1.0, 1.0]))
    data = encode_message(msg)
    values = struct.unpack_from(">12f", data, HEADER_SIZE + 12)
    np.testing.assert_allclose(values[9:12], [5.0, 1.25, 0.0])
    np.testing.assert_allclose(values[0:3], [0.5, 0, 0])


def test_image_subvolume_roundtrip():
    sub = RNG.integers(0, 255, (1, 4, 6), dtype=np.uint8)
    msg = ImageMessage(pixels=sub, image_size=(10, 8, 1), subvolume_offset=(2, 3, 0))
    out = roundtrip(msg)
    assert out.image_size == (10, 8, 1) and out.subvolume_offset == (2, 3, 0)
    np.testing.assert_array_equal(out.pixels, sub)


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"\x00" * 10, "shorter than the 72-byte image header"),
        (struct.pack(">HBBBB3H12f3H3H", 1, 1, 99, 2, 1, 2, 2, 1, *([0.0] * 12), 0, 0, 0, 2, 2, 1) + b"\x00" * 4,
         "unknown scalar type 99"),
        (struct.pack(">HBBBB3H12f3H3H", 1, 1, 3, 2, 1, 2, 2, 1, *([0.0] * 12), 0, 0, 0, 2, 2, 1) + b"\x00" * 3,
         "3 bytes of pixels, expected 4"),
        (struct.pack(">HBBBB3H12f3H3H", 1, 1, 3, 2, 1, 2, 2, 1, *([0.0] * 12), 1, 0, 0, 2, 2, 1) + b"\x00" * 4,
         "does not fit"),
        (struct.pack(">HBBBB3H12f3H3H", 1, 1, 3, 5, 1, 2, 2, 1, *([0.0] * 12), 0, 0, 0, 2, 2, 1) + b"\x00" * 4,
         "endian field 5"),
    ],
)  # fmt: skip
def test_image_decode_rejects_inconsistent_content(content, fragment):
    header = unpack_header(pack_header(1, "IMAGE", "im", 0.0, len(content), crc64(content)))
    with pytest.raises(ProtocolError, match=fragment):
        decode_body(header, content)


def test_image_rejects_unsupported_input():
    with pytest.raises(ProtocolError, match="cannot be sent"):
        ImageMessage(pixels=np.zeros((2, 2), dtype=np.complex64))
    with pytest.raises(ProtocolError, match="2D to 4D"):
        ImageMessage(pixels=np.zeros(5, dtype=np.uint8))
    with pytest.raises(ProtocolError, match="4x4"):
        ImageMessage(pixels=np.zeros((2, 2), np.uint8), ijk_to_world=np.eye(3))
    with pytest.raises(ProtocolError, match="coordinate"):
        ImageMessage(pixels=np.zeros((2, 2), np.uint8), coordinate="XYZ")


@pytest.mark.parametrize("version", [1, 2])
def test_transform_roundtrip_float32_precision(version):
    out = roundtrip(TransformMessage(matrix=MATRIX, device_name="ProbeToTracker", timestamp_s=7.0), version)
    assert isinstance(out, TransformMessage) and out.device_name == "ProbeToTracker"
    np.testing.assert_allclose(out.matrix, MATRIX, rtol=1e-7, atol=1e-7)
    np.testing.assert_array_equal(out.matrix[3], [0, 0, 0, 1])


def test_transform_wrong_size_raises():
    body = b"\x00" * 40
    header = unpack_header(pack_header(1, "TRANSFORM", "T", 0.0, 40, crc64(body)))
    with pytest.raises(ProtocolError, match="40 bytes, expected 48"):
        decode_body(header, body)


@pytest.mark.parametrize("text", ["", "hello", '<Command Name="x"/>', "äöü ünïcödé", "x" * 5000])
def test_string_roundtrip(text):
    out = roundtrip(StringMessage(text=text, device_name="CMD_1"), 2)
    assert out.text == text


def test_string_length_field_beyond_content_raises():
    body = struct.pack(">HH", 3, 50) + b"abc"
    header = unpack_header(pack_header(1, "STRING", "s", 0.0, len(body), crc64(body)))
    with pytest.raises(ProtocolError, match="length field 50"):
        decode_body(header, body)


def test_status_roundtrip_and_short_body():
    out = roundtrip(StatusMessage(code=1, subcode=-128, error_name="OK!", status="all good", device_name="Device"))
    assert (out.code, out.subcode, out.error_name, out.status) == (1, -128, "OK!", "all good")
    header = unpack_header(pack_header(1, "STATUS", "", 0.0, 10, crc64(b"\x00" * 10)))
    with pytest.raises(ProtocolError, match="at least 30"):
        decode_body(header, b"\x00" * 10)


def test_tdata_roundtrip_and_bad_size():
    elements = [TrackingDataElement("ProbeToTracker", MATRIX), TrackingDataElement("Stylus", np.eye(4), type=3)]
    out = roundtrip(TrackingDataMessage(elements=elements, device_name="Tracker"))
    assert [e.name for e in out.elements] == ["ProbeToTracker", "Stylus"]
    assert out.elements[1].type == 3
    np.testing.assert_allclose(out.elements[0].matrix, MATRIX, atol=1e-5)
    header = unpack_header(pack_header(1, "TDATA", "t", 0.0, 71, crc64(b"\x00" * 71)))
    with pytest.raises(ProtocolError, match="multiple of the 70-byte element"):
        decode_body(header, b"\x00" * 71)


def test_position_roundtrip_all_forms():
    q = np.array([0.0, 0.0, np.sin(0.25), np.cos(0.25)])
    out = roundtrip(PositionMessage(position=[1, 2, 3], quaternion=q, device_name="Probe"))
    np.testing.assert_allclose(out.position, [1, 2, 3])
    np.testing.assert_allclose(out.quaternion, q, atol=1e-7)
    np.testing.assert_allclose(
        out.matrix[:3, :3], [[np.cos(0.5), -np.sin(0.5), 0], [np.sin(0.5), np.cos(0.5), 0], [0, 0, 1]], atol=1e-6
    )
    short = struct.pack(">6f", 1, 2, 3, *q[:3])
    header = unpack_header(pack_header(1, "POSITION", "p", 0.0, 24, crc64(short)))
    np.testing.assert_allclose(decode_body(header, short).quaternion, q, atol=1e-6)
    header = unpack_header(pack_header(1, "POSITION", "p", 0.0, 20, crc64(b"\x00" * 20)))
    with pytest.raises(ProtocolError, match="expected 12, 24 or 28"):
        decode_body(header, b"\x00" * 20)


@pytest.mark.parametrize("cls", [CommandMessage, RTSCommandMessage])
def test_command_roundtrip(cls):
    msg = cls(command_id=42, command_name="StartRecording", content='<Command Name="StartRecording" />',
              device_name="PlusServer", metadata={"a": "b"})  # fmt: skip
    out = roundtrip(msg, 2)
    assert type(out) is cls
    assert (out.command_id, out.command_name, out.content, out.metadata) == (
        42, "StartRecording", '<Command Name="StartRecording" />', {"a": "b"},
    )  # fmt: skip


def test_unknown_type_decodes_as_raw():
    raw = RawMessage(type_name="GET_STATUS", device_name="x")
    out = roundtrip(raw)
    assert isinstance(out, RawMessage) and out.type == "GET_STATUS" and out.content == b""


def test_crc_mismatch_raises_with_both_values():
    data = bytearray(encode_message(TransformMessage(matrix=MATRIX)))
    data[-1] ^= 0xFF
    header = unpack_header(bytes(data[:HEADER_SIZE]))
    with pytest.raises(ProtocolError, match="CRC mismatch"):
        decode_body(header, bytes(data[HEADER_SIZE:]))
    assert isinstance(decode_body(header, bytes(data[HEADER_SIZE:]), check_crc=False), TransformMessage)


@pytest.mark.parametrize(
    "mutate, fragment",
    [
        (lambda ext: struct.pack(">HHII", 12, 0, 500, 0), "exceed the body size"),
        (lambda ext: struct.pack(">HHII", 4, 0, 0, 0), "exceed the body size"),
        (lambda ext: struct.pack(">HHII", 12, 0, 4, 0), "no metadata header"),
    ],
)
def test_v2_extended_header_inconsistencies_raise(mutate, fragment):
    content = struct.pack(">12f", *([0.0] * 12))
    body = mutate(None) + content
    header = unpack_header(pack_header(2, "TRANSFORM", "T", 0.0, len(body), crc64(body)))
    with pytest.raises(ProtocolError, match=fragment):
        decode_body(header, body)


def test_v2_metadata_count_mismatch_raises():
    content = struct.pack(">12f", *([0.0] * 12))
    meta_head = struct.pack(">H", 2) + struct.pack(">HHI", 1, 3, 1)  # claims 2 entries, has 1
    body = struct.pack(">HHII", 12, len(meta_head), 2, 0) + content + meta_head + b"kv"
    header = unpack_header(pack_header(2, "TRANSFORM", "T", 0.0, len(body), crc64(body)))
    with pytest.raises(ProtocolError, match="does not match 2 entries"):
        decode_body(header, body)


def test_protocol_error_is_a_freehandus_error():
    assert issubclass(ProtocolError, FreehandUSError)


def test_interoperates_with_pyigtl_both_ways():
    pyigtl = pytest.importorskip("pyigtl")
    from pyigtl.messages import MessageBase

    frame = RNG.integers(0, 256, (20, 30), dtype=np.uint8)
    ours = encode_message(ImageMessage.from_frame(frame, MATRIX, device_name="Image_Reference", timestamp_s=9.5))
    fields = MessageBase.parse_header(ours[:HEADER_SIZE])
    theirs = MessageBase.create_message(fields["message_type"])
    theirs.unpack(fields, ours[HEADER_SIZE:])
    np.testing.assert_array_equal(theirs.image[0], frame)
    np.testing.assert_allclose(theirs.ijk_to_world_matrix, MATRIX, atol=1e-4)

    t = pyigtl.TransformMessage(MATRIX, device_name="ProbeToTracker", timestamp=4.0)
    t.header_version = 2
    t.metadata = {"TransformStatus": "OK"}
    data = t.pack()
    out = decode_body(unpack_header(data[:HEADER_SIZE]), data[HEADER_SIZE:])
    assert out.metadata == {"TransformStatus": "OK"} and out.header_version == 2
    np.testing.assert_allclose(out.matrix, MATRIX, atol=1e-5)


# -- PLUS command XML -------------------------------------------------------------------------
def test_command_xml_roundtrip_with_escaping():
    text = command_xml("StartRecording", OutputFilename='a "b" <c>.mha')
    name, attrs = parse_command_xml(text)
    assert name == "StartRecording" and attrs == {"OutputFilename": 'a "b" <c>.mha'}


@pytest.mark.parametrize(
    "text, fragment",
    [("not xml", "not XML"), ("<Other Name='x'/>", "expected <Command>"), ("<Command/>", "no Name")],
)
def test_parse_command_xml_errors(text, fragment):
    with pytest.raises(ProtocolError, match=fragment):
        parse_command_xml(text)


def test_command_name_must_be_identifier():
    with pytest.raises(ProtocolError, match="plain identifier"):
        command_xml("Start Recording")


def test_reply_xml_both_forms():
    r = parse_reply_xml(reply_xml(True, "file & <name>.mha"))
    assert r.ok and r.message == "file & <name>.mha"
    r = parse_reply_xml(reply_xml(False, "Command failed.", name="StopRecording", error="not recording"))
    assert not r.ok and r.name == "StopRecording" and r.error == "not recording"
    r = parse_reply_xml("garbage", {"Status": "SUCCESS", "Message": "m"})
    assert r.ok and r.message == "m"
    with pytest.raises(ProtocolError, match="not XML"):
        parse_reply_xml("garbage")


def test_uid_from_command_device():
    assert uid_from_command_device("CMD_0042") == 42
    assert uid_from_command_device("CMD_abc") is None
    assert uid_from_command_device("ACK_1") is None


def test_device_names_are_c_strings_and_may_be_utf8():
    raw = bytearray(pack_header(1, "STRING", "Probe", 0.0, 0, 0))
    raw[14 + 6 : 14 + 20] = b"\xff\x01garbage\x02\x03\x04\x05\x06"  # after the terminating NUL
    assert unpack_header(bytes(raw)).device_name == "Probe"
    out = roundtrip(StringMessage(text="x", device_name="Bildgerät"))
    assert out.device_name == "Bildgerät"
