"""OpenIGTLink wire format: the 58-byte header (versions 1 and 2), version-2 metadata, and the
body codecs of the message types a PLUS/SlicerIGT setup exchanges.

Byte layout (all numbers big-endian; see openigtlink.org "Protocol" pages):

Header, 58 bytes::

    uint16 version      1 = classic header; 2 = body starts with an extended header and ends
                        with metadata (OpenIGTLink 3)
    char[12] type       "IMAGE", "TRANSFORM", ... NUL padded
    char[20] device     device name, NUL padded (PLUS: "Image_Reference", "ProbeToTracker")
    uint32 seconds      timestamp, whole seconds since 1970 (0 with fraction 0 = "no timestamp")
    uint32 fraction     fraction of a second in units of 2**-32 s
    uint64 body_size    bytes that follow the header
    uint64 crc          CRC-64/ECMA-182 of the body (:mod:`.crc64`)

Version-2 body: ``uint16 ext_header_size (12) | uint16 metadata_header_size | uint32
metadata_size | uint32 message_id`` + content + metadata header (``uint16 count`` then per entry
``uint16 key_size, uint16 value_encoding, uint32 value_size``) + keys and values.

Content of each type (``f32`` = IEEE float32):

- IMAGE: ``uint16 version(1), uint8 components, uint8 scalar_type, uint8 endian (1 big, 2
  little), uint8 coord (1 RAS, 2 LPS), uint16 size[3] (i, j, k), f32 matrix[12], uint16
  subvolume_offset[3], uint16 subvolume_size[3]`` then the pixels. ``matrix`` holds the i, j,
  k axes scaled by the pixel spacing (three columns of the 3x3 part of the index-to-world
  matrix) and the world position of the **centre** of the image, ``(size - 1) / 2`` in index
  units, as the OpenIGTLink library, Slicer and PLUS agree.
- TRANSFORM: ``f32[12]`` = R11 R21 R31 R12 R22 R32 R13 R23 R33 TX TY TZ (48 bytes).
- STRING: ``uint16 encoding (IANA MIBenum, 3 = US-ASCII, 106 = UTF-8), uint16 length`` + text.
- STATUS: ``uint16 code, int64 subcode, char[20] error_name`` + NUL-terminated status text.
- TDATA: elements of ``char[20] name, uint8 type, uint8 reserved, f32[12] matrix`` (70 bytes).
- POSITION: ``f32 x y z`` + quaternion ``f32 ox oy oz w`` (28 bytes; 24- and 12-byte short forms
  with 3 or 0 quaternion components are read too).
- COMMAND / RTS_COMMAND (OpenIGTLink 3): ``uint32 command_id, char[128] name, uint16 encoding,
  uint32 length`` + command text.

Decoding never trusts a size field: every mismatch raises :class:`ProtocolError` naming the
message type, device, field and the expected and actual values. Receivers count and skip such
messages (:mod:`.framing`).
"""

from __future__ import annotations

import math
import re
import struct
import sys
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from ..errors import FreehandUSError
from .crc64 import crc64

__all__ = [
    "ProtocolError",
    "HEADER_SIZE",
    "EXTENDED_HEADER_SIZE",
    "KNOWN_MESSAGE_TYPES",
    "Header",
    "pack_header",
    "unpack_header",
    "is_plausible_header",
    "timestamp_to_igtl",
    "timestamp_from_igtl",
    "Message",
    "ImageMessage",
    "TransformMessage",
    "StringMessage",
    "StatusMessage",
    "TrackingDataElement",
    "TrackingDataMessage",
    "PositionMessage",
    "CommandMessage",
    "RTSCommandMessage",
    "RawMessage",
    "MESSAGE_CLASSES",
    "encode_message",
    "encode_message_parts",
    "decode_body",
    "split_body",
    "STATUS_OK",
]

HEADER_SIZE = 58
EXTENDED_HEADER_SIZE = 12
_HEADER = struct.Struct(">H12s20sIIQQ")
_EXT_HEADER = struct.Struct(">HHII")
_META_ENTRY = struct.Struct(">HHI")
_IMAGE_HEADER = struct.Struct(">HBBBB3H12f3H3H")
_TRANSFORM = struct.Struct(">12f")
_STRING_HEADER = struct.Struct(">HH")
_STATUS_HEADER = struct.Struct(">Hq20s")
_TDATA_ELEMENT = struct.Struct(">20sBB12f")
_COMMAND_HEADER = struct.Struct(">I128sHI")

IANA_US_ASCII = 3
IANA_UTF8 = 106
STATUS_OK = 1

#: Base type names of the OpenIGTLink standard (and PLUS's own); used to judge whether a header
#: found while resynchronising a stream is plausible. Query prefixes GET_/STT_/STP_/RTS_ allowed.
KNOWN_MESSAGE_TYPES = frozenset(
    {
        "IMAGE", "TRANSFORM", "STRING", "STATUS", "TDATA", "POSITION", "COMMAND", "POINT",
        "TRAJ", "TRAJECTORY", "POLYDATA", "QTDATA", "QTRANS", "CAPABILITY", "IMGMETA", "LBMETA",
        "COLORT", "NDARRAY", "SENSOR", "BIND", "VIDEO", "VIDEOMETA", "TRACKEDFRAME",
        "USMESSAGE", "CLIENTINFO", "UNIT",
    }
)  # fmt: skip
# Checked up to the first NUL (C strings: what follows the terminator does not matter).
_TYPE_RE = re.compile(rb"^(?:GET_|STT_|STP_|RTS_)?[A-Z][A-Z0-9_]*(?:\x00|$)")
_NAME_RE = re.compile(rb"^[\x20-\x7e\x80-\xff]*(?:\x00|$)")

_SCALAR_TYPES = {
    2: np.dtype(np.int8),
    3: np.dtype(np.uint8),
    4: np.dtype(np.int16),
    5: np.dtype(np.uint16),
    6: np.dtype(np.int32),
    7: np.dtype(np.uint32),
    10: np.dtype(np.float32),
    11: np.dtype(np.float64),
}
_SCALAR_CODES = {dt: code for code, dt in _SCALAR_TYPES.items()}


class ProtocolError(FreehandUSError):
    """Bytes that do not follow the OpenIGTLink format (bad header, size, CRC, content)."""


# -------------------------------------------------------------------------------------------
# Header and timestamps
# -------------------------------------------------------------------------------------------
def timestamp_to_igtl(timestamp_s: float) -> tuple[int, int]:
    """``(seconds, fraction)`` of a time in seconds since 1970; fraction in units of 2**-32 s.

    Negative or non-finite times are not representable and raise :class:`ProtocolError`.
    """
    t = float(timestamp_s)
    if not math.isfinite(t) or t < 0 or t >= 2.0**32:
        raise ProtocolError(f"timestamp {timestamp_s!r} s cannot be sent (expected 0 <= t < 2**32)")
    seconds = int(t)
    fraction = int(round((t - seconds) * 4294967296.0))
    if fraction >= 1 << 32:
        seconds, fraction = seconds + 1, 0
    return seconds, fraction


def timestamp_from_igtl(seconds: int, fraction: int) -> float:
    """Seconds since 1970 from the header fields (inverse of :func:`timestamp_to_igtl`)."""
    return float(seconds) + float(fraction) / 4294967296.0


@dataclass(frozen=True)
class Header:
    """A decoded 58-byte header.

    Attributes
    ----------
    version : int
        1 or 2.
    type : str
        Message type (``"IMAGE"``...).
    device_name : str
    timestamp_s : float
        Seconds since 1970 as sent; 0.0 means the sender gave no timestamp.
    body_size : int
        Bytes of body that follow.
    crc : int
        CRC-64 the sender computed over the body.
    """

    version: int
    type: str
    device_name: str
    timestamp_s: float
    body_size: int
    crc: int


def _fixed_ascii(text: str, size: int, what: str) -> bytes:
    raw = text.encode("utf-8")
    if len(raw) > size:
        raise ProtocolError(f"{what} {text!r} is {len(raw)} bytes; OpenIGTLink allows at most {size}")
    return raw


def pack_header(
    version: int, type_name: str, device_name: str, timestamp_s: float, body_size: int, crc: int
) -> bytes:
    """The 58-byte header. Raises :class:`ProtocolError` for names that do not fit."""
    if version not in (1, 2):
        raise ProtocolError(f"header version must be 1 or 2, got {version}")
    seconds, fraction = timestamp_to_igtl(timestamp_s)
    return _HEADER.pack(
        version,
        _fixed_ascii(type_name, 12, "message type"),
        _fixed_ascii(device_name, 20, "device name"),
        seconds,
        fraction,
        body_size,
        crc,
    )


def _cstr(raw: bytes) -> str:
    return raw.split(b"\x00", 1)[0].decode("utf-8", errors="replace")


def unpack_header(data, *, max_body_bytes: int = 1 << 30) -> Header:
    """Decode and sanity-check a 58-byte header.

    Raises :class:`ProtocolError` when the version is not 1/2, the type is not an upper-case
    name, the device name holds control characters, or the body size exceeds ``max_body_bytes`` (a corrupt or hostile
    header must not make a receiver allocate gigabytes).
    """
    if len(data) != HEADER_SIZE:
        raise ProtocolError(f"header must be {HEADER_SIZE} bytes, got {len(data)}")
    version, type_raw, name_raw, seconds, fraction, body_size, crc = _HEADER.unpack(data)
    if version not in (1, 2):
        raise ProtocolError(f"header version {version} (expected 1 or 2)")
    if not _TYPE_RE.match(type_raw):
        raise ProtocolError(f"message type field {type_raw!r} is not an upper-case name")
    if not _NAME_RE.match(name_raw):
        raise ProtocolError(f"device name field {name_raw!r} holds control characters")
    if body_size > max_body_bytes:
        raise ProtocolError(f"body size {body_size} bytes exceeds the limit of {max_body_bytes}")
    if version == 2 and body_size < EXTENDED_HEADER_SIZE:
        raise ProtocolError(
            f"version-2 body size {body_size} is smaller than the {EXTENDED_HEADER_SIZE}-byte extended header"
        )
    return Header(
        version=version,
        type=_cstr(type_raw),
        device_name=_cstr(name_raw),
        timestamp_s=timestamp_from_igtl(seconds, fraction),
        body_size=body_size,
        crc=crc,
    )


def is_plausible_header(data, *, max_body_bytes: int = 1 << 30) -> bool:
    """Whether 58 bytes look like a header of a known message type (used to resynchronise)."""
    try:
        header = unpack_header(data, max_body_bytes=max_body_bytes)
    except ProtocolError:
        return False
    base = header.type
    for prefix in ("GET_", "STT_", "STP_", "RTS_"):
        if base.startswith(prefix):
            base = base[len(prefix) :]
            break
    return base in KNOWN_MESSAGE_TYPES


# -------------------------------------------------------------------------------------------
# Messages
# -------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Message:
    """Fields every OpenIGTLink message has.

    Attributes
    ----------
    device_name : str
        At most 20 bytes.
    timestamp_s : float
        Seconds since 1970 (0.0 = none given).
    metadata : dict[str, str]
        Version-2 metadata (empty, and not sent, with header version 1).
    message_id : int
        Version-2 message id.
    header_version : int
        Version of the header the message arrived with (receivers), informational when sending.
    received_s : float
        Receiver's clock (``time.time()``, s) when the message was read; 0.0 when not received.
    """

    TYPE: ClassVar[str] = ""

    device_name: str = ""
    timestamp_s: float = 0.0
    metadata: dict = field(default_factory=dict)
    message_id: int = 0
    header_version: int = 1
    received_s: float = field(default=0.0, repr=False)

    @property
    def type(self) -> str:
        return self.TYPE

    def content_parts(self) -> list:
        """Content bytes (without extended header/metadata) as a list of buffers."""
        return []

    @classmethod
    def from_content(cls, content: memoryview, common: dict) -> Message:
        return cls(**common)

    def __str__(self) -> str:
        return f"{self.type} {self.device_name!r} t={self.timestamp_s:.6f}"


def _matrix_to_12(m: np.ndarray) -> list[float]:
    return [
        m[0, 0], m[1, 0], m[2, 0],
        m[0, 1], m[1, 1], m[2, 1],
        m[0, 2], m[1, 2], m[2, 2],
        m[0, 3], m[1, 3], m[2, 3],
    ]  # fmt: skip


def _matrix_from_12(v) -> np.ndarray:
    m = np.eye(4)
    m[:3, 0] = v[0:3]
    m[:3, 1] = v[3:6]
    m[:3, 2] = v[6:9]
    m[:3, 3] = v[9:12]
    return m


def _check_matrix(matrix, what: str) -> np.ndarray:
    m = np.asarray(matrix, dtype=np.float64)
    if m.shape != (4, 4):
        raise ProtocolError(f"{what} must be a 4x4 matrix, got shape {m.shape}")
    return m


@dataclass(eq=False)
class ImageMessage(Message):
    """IMAGE: pixels with their index-to-world matrix.

    Attributes
    ----------
    pixels : (n_k, n_j, n_i) or (n_k, n_j, n_i, n_components) array
        Any of int8/uint8/int16/uint16/int32/uint32/float32/float64. A 2D ``(n_rows, n_cols)``
        frame is sent as one slice (i = column, j = row); use :meth:`from_frame` for colour
        frames. Received pixels are read-only views of the message body.
    ijk_to_world : (4, 4) float64
        Maps (i, j, k, 1) pixel indices to world mm (PLUS: ImageToReference, which includes the
        pixel spacing). Sent as float32.
    coordinate : "RAS" or "LPS"
    subvolume_offset : (3,) int
        (i, j, k) index of ``pixels[0, 0, 0]`` within the full image of size ``image_size``.
    image_size : (3,) int or None
        Full image size (i, j, k); None = the size of ``pixels``.
    """

    TYPE: ClassVar[str] = "IMAGE"

    pixels: np.ndarray | None = None
    ijk_to_world: np.ndarray = field(default_factory=lambda: np.eye(4))
    coordinate: str = "RAS"
    subvolume_offset: tuple = (0, 0, 0)
    image_size: tuple | None = None

    def __post_init__(self):
        if self.pixels is None:
            raise ProtocolError("IMAGE message needs pixels")
        px = np.asarray(self.pixels)
        if px.dtype.newbyteorder("=") not in _SCALAR_CODES:
            raise ProtocolError(f"IMAGE pixels of type {px.dtype} cannot be sent")
        if px.ndim == 2:
            px = px[None]
        if px.ndim not in (3, 4):
            raise ProtocolError(f"IMAGE pixels must be 2D to 4D, got shape {px.shape}")
        if max(px.shape[:3]) > 65535 or (px.ndim == 4 and px.shape[3] > 255):
            raise ProtocolError(f"IMAGE of shape {px.shape} exceeds the uint16 size fields")
        self.pixels = px
        self.ijk_to_world = _check_matrix(self.ijk_to_world, "IMAGE ijk_to_world")
        if self.coordinate not in ("RAS", "LPS"):
            raise ProtocolError(f"IMAGE coordinate must be 'RAS' or 'LPS', got {self.coordinate!r}")

    @classmethod
    def from_frame(cls, frame, image_to_world=None, **common) -> ImageMessage:
        """A 2D ultrasound frame ``(n_rows, n_cols[, n_channels])`` (MF) with its ImageToWorld."""
        frame = np.asarray(frame)
        return cls(
            pixels=frame[None] if frame.ndim in (2, 3) else frame,
            ijk_to_world=np.eye(4) if image_to_world is None else image_to_world,
            **common,
        )

    @property
    def n_components(self) -> int:
        return 1 if self.pixels.ndim == 3 else int(self.pixels.shape[3])

    @property
    def size_ijk(self) -> tuple[int, int, int]:
        """Size of the pixels carried, (n_i, n_j, n_k)."""
        k, j, i = self.pixels.shape[:3]
        return int(i), int(j), int(k)

    @property
    def frame(self) -> np.ndarray:
        """The single slice ``(n_rows, n_cols[, n_components])``; raises if there are several."""
        if self.pixels.shape[0] != 1:
            raise ProtocolError(f"IMAGE {self.device_name!r} has {self.pixels.shape[0]} slices, not one")
        return self.pixels[0]

    def content_parts(self) -> list:
        px = self.pixels
        full = tuple(self.image_size) if self.image_size is not None else self.size_ijk
        m = self.ijk_to_world
        half = (np.asarray(full, dtype=np.float64) - 1.0) / 2.0
        centre = m[:3, :3] @ half + m[:3, 3]
        values = _matrix_to_12(m)
        values[9:12] = centre
        big = px.dtype.byteorder == ">" or (px.dtype.byteorder == "=" and sys.byteorder == "big")
        head = _IMAGE_HEADER.pack(
            1,
            self.n_components,
            _SCALAR_CODES[px.dtype.newbyteorder("=")],
            1 if big else 2,
            1 if self.coordinate == "RAS" else 2,
            *full,
            *values,
            *(int(v) for v in self.subvolume_offset),
            *self.size_ijk,
        )
        data = px if px.flags.c_contiguous else np.ascontiguousarray(px)
        return [head, memoryview(data).cast("B")]

    @classmethod
    def from_content(cls, content: memoryview, common: dict) -> ImageMessage:
        where = f"IMAGE {common.get('device_name', '')!r}"
        if len(content) < _IMAGE_HEADER.size:
            raise ProtocolError(f"{where}: content is {len(content)} bytes, shorter than the 72-byte image header")
        v = _IMAGE_HEADER.unpack_from(content, 0)
        _, ncomp, stype, endian, coord = v[:5]
        size = v[5:8]
        mat = v[8:20]
        offset = v[20:23]
        subsize = v[23:26]
        if stype not in _SCALAR_TYPES:
            raise ProtocolError(f"{where}: unknown scalar type {stype}")
        if endian not in (1, 2):
            raise ProtocolError(f"{where}: endian field {endian} (expected 1 big or 2 little)")
        if coord not in (1, 2):
            raise ProtocolError(f"{where}: coordinate field {coord} (expected 1 RAS or 2 LPS)")
        if ncomp < 1:
            raise ProtocolError(f"{where}: {ncomp} components")
        for a in range(3):
            if subsize[a] < 1 or offset[a] + subsize[a] > size[a]:
                raise ProtocolError(
                    f"{where}: sub-volume offset {offset} size {subsize} does not fit image size {size}"
                )
        dtype = _SCALAR_TYPES[stype].newbyteorder(">" if endian == 1 else "<")
        expected = int(np.prod(subsize)) * ncomp * dtype.itemsize
        actual = len(content) - _IMAGE_HEADER.size
        if actual != expected:
            raise ProtocolError(
                f"{where}: {actual} bytes of pixels, expected {expected} for size {subsize} x {ncomp} {dtype}"
            )
        px = np.frombuffer(content, dtype=dtype, offset=_IMAGE_HEADER.size)
        shape = (subsize[2], subsize[1], subsize[0]) + ((ncomp,) if ncomp > 1 else ())
        px = px.reshape(shape)
        if not dtype.isnative and dtype.itemsize > 1:
            px = px.astype(dtype.newbyteorder("="))
        m = _matrix_from_12(np.asarray(mat, dtype=np.float64))
        half = (np.asarray(size, dtype=np.float64) - 1.0) / 2.0
        m[:3, 3] = m[:3, 3] - m[:3, :3] @ half
        return cls(
            pixels=px,
            ijk_to_world=m,
            coordinate="RAS" if coord == 1 else "LPS",
            subvolume_offset=tuple(offset),
            image_size=tuple(size),
            **common,
        )

    def __str__(self) -> str:
        return f"{super().__str__()} pixels {self.pixels.shape} {self.pixels.dtype}"


@dataclass(eq=False)
class TransformMessage(Message):
    """TRANSFORM: one 4x4 matrix (sent as float32, last row implied ``0 0 0 1``).

    Attributes
    ----------
    matrix : (4, 4) float64
        ``<From>To<To>`` as named by the device name (PLUS: ``"ProbeToTracker"``).
    """

    TYPE: ClassVar[str] = "TRANSFORM"

    matrix: np.ndarray = field(default_factory=lambda: np.eye(4))

    def __post_init__(self):
        self.matrix = _check_matrix(self.matrix, "TRANSFORM matrix")

    def content_parts(self) -> list:
        return [_TRANSFORM.pack(*_matrix_to_12(self.matrix))]

    @classmethod
    def from_content(cls, content: memoryview, common: dict) -> TransformMessage:
        if len(content) != _TRANSFORM.size:
            raise ProtocolError(
                f"TRANSFORM {common.get('device_name', '')!r}: content is {len(content)} bytes, expected 48"
            )
        return cls(matrix=_matrix_from_12(np.asarray(_TRANSFORM.unpack(content), dtype=np.float64)), **common)


def _encode_text(text: str) -> tuple[bytes, int]:
    try:
        return text.encode("ascii"), IANA_US_ASCII
    except UnicodeEncodeError:
        return text.encode("utf-8"), IANA_UTF8


def _decode_text(raw: bytes, encoding: int) -> str:
    return bytes(raw).decode("ascii" if encoding == IANA_US_ASCII else "utf-8", errors="replace")


@dataclass(eq=False)
class StringMessage(Message):
    """STRING: text (at most 65535 bytes). PLUS commands travel as STRING ``CMD_<uid>``."""

    TYPE: ClassVar[str] = "STRING"

    text: str = ""
    encoding: int = 0  # 0 = choose (ASCII when possible, else UTF-8)

    def content_parts(self) -> list:
        raw, enc = _encode_text(self.text)
        if self.encoding and self.encoding != enc:
            enc = self.encoding
            raw = self.text.encode("utf-8")
        if len(raw) > 65535:
            raise ProtocolError(f"STRING {self.device_name!r} is {len(raw)} bytes; at most 65535 allowed")
        return [_STRING_HEADER.pack(enc, len(raw)), raw]

    @classmethod
    def from_content(cls, content: memoryview, common: dict) -> StringMessage:
        where = f"STRING {common.get('device_name', '')!r}"
        if len(content) < _STRING_HEADER.size:
            raise ProtocolError(f"{where}: content is {len(content)} bytes, shorter than the 4-byte string header")
        enc, length = _STRING_HEADER.unpack_from(content, 0)
        if length > len(content) - 4:
            raise ProtocolError(f"{where}: length field {length} exceeds the {len(content) - 4} bytes present")
        return cls(text=_decode_text(content[4 : 4 + length], enc), encoding=enc, **common)


@dataclass(eq=False)
class StatusMessage(Message):
    """STATUS: ``code`` (1 = OK), ``subcode``, ``error_name`` (<= 20 bytes), ``status`` text.

    PlusServer sends an empty-named STATUS OK as keep-alive when it has nothing else to send.
    """

    TYPE: ClassVar[str] = "STATUS"

    code: int = STATUS_OK
    subcode: int = 0
    error_name: str = ""
    status: str = ""

    def content_parts(self) -> list:
        return [
            _STATUS_HEADER.pack(
                int(self.code), int(self.subcode), _fixed_ascii(self.error_name, 20, "STATUS error name")
            ),
            self.status.encode("utf-8") + b"\x00",
        ]

    @classmethod
    def from_content(cls, content: memoryview, common: dict) -> StatusMessage:
        if len(content) < _STATUS_HEADER.size:
            raise ProtocolError(
                f"STATUS {common.get('device_name', '')!r}: content is {len(content)} bytes, expected at least 30"
            )
        code, subcode, name = _STATUS_HEADER.unpack_from(content, 0)
        text = _cstr(bytes(content[_STATUS_HEADER.size :]))
        return cls(code=code, subcode=subcode, error_name=_cstr(name), status=text, **common)


@dataclass(eq=False)
class TrackingDataElement:
    """One tool of a TDATA message: ``name`` (<= 20 bytes), ``type`` (1 tracker, 2 6D, 3 3D, 4 5D)."""

    name: str
    matrix: np.ndarray
    type: int = 2

    def __post_init__(self):
        self.matrix = _check_matrix(self.matrix, f"TDATA element {self.name!r} matrix")


@dataclass(eq=False)
class TrackingDataMessage(Message):
    """TDATA: several named tool matrices in one message."""

    TYPE: ClassVar[str] = "TDATA"

    elements: list = field(default_factory=list)

    def content_parts(self) -> list:
        return [
            _TDATA_ELEMENT.pack(
                _fixed_ascii(e.name, 20, "TDATA element name"), int(e.type), 0, *_matrix_to_12(e.matrix)
            )
            for e in self.elements
        ]

    @classmethod
    def from_content(cls, content: memoryview, common: dict) -> TrackingDataMessage:
        n, rest = divmod(len(content), _TDATA_ELEMENT.size)
        if rest:
            raise ProtocolError(
                f"TDATA {common.get('device_name', '')!r}: content is {len(content)} bytes, "
                f"not a multiple of the 70-byte element"
            )
        elements = []
        for index in range(n):
            v = _TDATA_ELEMENT.unpack_from(content, index * _TDATA_ELEMENT.size)
            elements.append(
                TrackingDataElement(
                    name=_cstr(v[0]), type=v[1], matrix=_matrix_from_12(np.asarray(v[3:], dtype=np.float64))
                )
            )
        return cls(elements=elements, **common)


@dataclass(eq=False)
class PositionMessage(Message):
    """POSITION: ``position`` (x, y, z) mm and unit ``quaternion`` (ox, oy, oz, w)."""

    TYPE: ClassVar[str] = "POSITION"

    position: np.ndarray = field(default_factory=lambda: np.zeros(3))
    quaternion: np.ndarray = field(default_factory=lambda: np.array([0.0, 0.0, 0.0, 1.0]))

    def __post_init__(self):
        self.position = np.asarray(self.position, dtype=np.float64).reshape(3)
        self.quaternion = np.asarray(self.quaternion, dtype=np.float64).reshape(4)

    @property
    def matrix(self) -> np.ndarray:
        """The pose as a 4x4 matrix (identity rotation for a zero quaternion)."""
        from scipy.spatial.transform import Rotation

        m = np.eye(4)
        if np.linalg.norm(self.quaternion) > 0:
            m[:3, :3] = Rotation.from_quat(self.quaternion).as_matrix()
        m[:3, 3] = self.position
        return m

    def content_parts(self) -> list:
        return [struct.pack(">7f", *self.position, *self.quaternion)]

    @classmethod
    def from_content(cls, content: memoryview, common: dict) -> PositionMessage:
        n = len(content)
        if n == 28:
            v = struct.unpack(">7f", content)
            return cls(position=v[:3], quaternion=v[3:], **common)
        if n == 24:
            v = struct.unpack(">6f", content)
            w = math.sqrt(max(0.0, 1.0 - v[3] ** 2 - v[4] ** 2 - v[5] ** 2))
            return cls(position=v[:3], quaternion=(*v[3:], w), **common)
        if n == 12:
            return cls(position=struct.unpack(">3f", content), **common)
        raise ProtocolError(
            f"POSITION {common.get('device_name', '')!r}: content is {n} bytes, expected 12, 24 or 28"
        )


@dataclass(eq=False)
class CommandMessage(Message):
    """COMMAND (OpenIGTLink 3): ``command_id``, ``command_name`` (<= 128 bytes), XML ``content``."""

    TYPE: ClassVar[str] = "COMMAND"

    command_id: int = 0
    command_name: str = ""
    content: str = ""

    def content_parts(self) -> list:
        raw, enc = _encode_text(self.content)
        return [
            _COMMAND_HEADER.pack(
                int(self.command_id) & 0xFFFFFFFF,
                _fixed_ascii(self.command_name, 128, f"{self.TYPE} command name"),
                enc,
                len(raw),
            ),
            raw,
        ]

    @classmethod
    def from_content(cls, content: memoryview, common: dict):
        where = f"{cls.TYPE} {common.get('device_name', '')!r}"
        if len(content) < _COMMAND_HEADER.size:
            raise ProtocolError(
                f"{where}: content is {len(content)} bytes, shorter than the 138-byte command header"
            )
        cid, name, enc, length = _COMMAND_HEADER.unpack_from(content, 0)
        if length > len(content) - _COMMAND_HEADER.size:
            raise ProtocolError(
                f"{where}: length field {length} exceeds the {len(content) - _COMMAND_HEADER.size} bytes present"
            )
        text = _decode_text(content[_COMMAND_HEADER.size : _COMMAND_HEADER.size + length], enc)
        return cls(command_id=cid, command_name=_cstr(name), content=text, **common)


@dataclass(eq=False)
class RTSCommandMessage(CommandMessage):
    """RTS_COMMAND: the reply to a COMMAND, same layout (PLUS: ``<CommandReply .../>``)."""

    TYPE: ClassVar[str] = "RTS_COMMAND"


@dataclass(eq=False)
class RawMessage(Message):
    """Any other type, body kept as bytes (GET_STATUS, STT_TDATA, POINT, ...)."""

    TYPE: ClassVar[str] = ""

    type_name: str = ""
    content: bytes = b""

    @property
    def type(self) -> str:
        return self.type_name

    def content_parts(self) -> list:
        return [bytes(self.content)]


#: Decoded types; everything else is a :class:`RawMessage` (or counted as unknown by a client).
MESSAGE_CLASSES: dict[str, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        ImageMessage,
        TransformMessage,
        StringMessage,
        StatusMessage,
        TrackingDataMessage,
        PositionMessage,
        CommandMessage,
        RTSCommandMessage,
    )
}


# -------------------------------------------------------------------------------------------
# Whole messages
# -------------------------------------------------------------------------------------------
def _metadata_parts(metadata: dict) -> tuple[bytes, bytes]:
    head = [struct.pack(">H", len(metadata))]
    body = []
    for key, value in metadata.items():
        k = str(key).encode("utf-8")
        v, enc = _encode_text(str(value))
        if len(k) > 65535:
            raise ProtocolError(f"metadata key {key!r} is longer than 65535 bytes")
        head.append(_META_ENTRY.pack(len(k), enc, len(v)))
        body.append(k + v)
    return b"".join(head), b"".join(body)


def encode_message_parts(message: Message, *, header_version: int = 1, timestamp_s: float | None = None) -> list:
    """Header + body of ``message`` as a list of buffers (pixels are not copied).

    Parameters
    ----------
    message : Message
    header_version : 1 or 2
        With 2 the body carries the extended header and ``message.metadata``.
    timestamp_s : float, optional
        Overrides ``message.timestamp_s``.
    """
    parts = message.content_parts()
    if header_version == 2:
        meta_head, meta_body = _metadata_parts(message.metadata)
        ext = _EXT_HEADER.pack(
            EXTENDED_HEADER_SIZE, len(meta_head), len(meta_body), int(message.message_id) & 0xFFFFFFFF
        )
        parts = [ext, *parts, meta_head, meta_body]
    elif header_version != 1:
        raise ProtocolError(f"header version must be 1 or 2, got {header_version}")
    size = 0
    crc = 0
    for part in parts:
        size += len(part) if not isinstance(part, memoryview) else part.nbytes
        crc = crc64(part, crc)
    ts = message.timestamp_s if timestamp_s is None else timestamp_s
    header = pack_header(header_version, message.type, message.device_name, ts, size, crc)
    return [header, *parts]


def encode_message(message: Message, *, header_version: int = 1, timestamp_s: float | None = None) -> bytes:
    """The complete message as bytes (see :func:`encode_message_parts`)."""
    return b"".join(encode_message_parts(message, header_version=header_version, timestamp_s=timestamp_s))


def split_body(header: Header, body) -> tuple[memoryview, dict, int]:
    """``(content, metadata, message_id)`` of a body; version 1 bodies are all content.

    Raises :class:`ProtocolError` when the extended header or metadata sizes do not fit.
    """
    view = memoryview(body)
    if header.version == 1:
        return view, {}, 0
    where = f"{header.type} {header.device_name!r}"
    if len(view) < EXTENDED_HEADER_SIZE:
        raise ProtocolError(f"{where}: version-2 body of {len(view)} bytes has no extended header")
    ext_size, meta_head_size, meta_size, message_id = _EXT_HEADER.unpack_from(view, 0)
    if ext_size < EXTENDED_HEADER_SIZE or ext_size + meta_head_size + meta_size > len(view):
        raise ProtocolError(
            f"{where}: extended header ({ext_size}) + metadata header ({meta_head_size}) + metadata "
            f"({meta_size}) exceed the body size {len(view)}"
        )
    end = len(view) - meta_head_size - meta_size
    content = view[ext_size:end]
    metadata = {}
    if meta_head_size:
        if meta_head_size < 2:
            raise ProtocolError(f"{where}: metadata header of {meta_head_size} bytes")
        (count,) = struct.unpack_from(">H", view, end)
        if 2 + count * _META_ENTRY.size != meta_head_size:
            raise ProtocolError(
                f"{where}: metadata header size {meta_head_size} does not match {count} entries "
                f"(expected {2 + count * _META_ENTRY.size})"
            )
        pos = end + meta_head_size
        stop = len(view)
        for index in range(count):
            ksize, enc, vsize = _META_ENTRY.unpack_from(view, end + 2 + index * _META_ENTRY.size)
            if pos + ksize + vsize > stop:
                raise ProtocolError(f"{where}: metadata entry {index} runs past the end of the body")
            key = bytes(view[pos : pos + ksize]).decode("utf-8", errors="replace")
            metadata[key] = _decode_text(view[pos + ksize : pos + ksize + vsize], enc)
            pos += ksize + vsize
        if pos != stop:
            raise ProtocolError(f"{where}: metadata sizes leave {stop - pos} unexplained bytes")
    elif meta_size:
        raise ProtocolError(f"{where}: {meta_size} bytes of metadata but no metadata header")
    return content, metadata, message_id


def decode_body(header: Header, body, *, check_crc: bool = True) -> Message:
    """Decode a body received after ``header``.

    Types without a codec come back as :class:`RawMessage`. Raises :class:`ProtocolError` for
    a CRC mismatch (when ``check_crc``) or content that does not match its type.
    """
    if len(body) != header.body_size:
        raise ProtocolError(
            f"{header.type} {header.device_name!r}: body is {len(body)} bytes, header says {header.body_size}"
        )
    if check_crc:
        actual = crc64(body)
        if actual != header.crc:
            raise ProtocolError(
                f"{header.type} {header.device_name!r}: CRC mismatch (header {header.crc:#018x}, body {actual:#018x})"
            )
    content, metadata, message_id = split_body(header, body)
    common = dict(
        device_name=header.device_name,
        timestamp_s=header.timestamp_s,
        metadata=metadata,
        message_id=message_id,
        header_version=header.version,
    )
    cls = MESSAGE_CLASSES.get(header.type)
    if cls is None:
        return RawMessage(type_name=header.type, content=bytes(content), **common)
    try:
        return cls.from_content(content, common)
    except (struct.error, ValueError) as exc:  # belt and braces: sizes are checked above
        raise ProtocolError(f"{header.type} {header.device_name!r}: {exc}") from exc
