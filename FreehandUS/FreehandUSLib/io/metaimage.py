"""PLUS sequence metafiles (``.igs.mha``, ``.igs.mhd``, ``.seq.mha``) and MetaImage volumes.

A MetaImage file is a text header of ``Key = Value`` lines ending with ``ElementDataFile``,
followed by the pixel data (``ElementDataFile = LOCAL``, ``.mha``) or with the pixel data in a
separate ``.raw``/``.zraw`` file (``.mhd``). PLUS stores a tracked ultrasound sequence as a
3D image (``DimSize = n_cols n_rows n_frames``) whose per-frame information lives in header
fields named ``Seq_Frame<index>_<FieldName>``:

- ``<From>To<To>Transform`` (16 numbers, row-major 4x4) and ``<From>To<To>TransformStatus``
  (``OK`` = valid, anything else = invalid);
- ``Timestamp`` (seconds);
- ``ImageStatus`` (older files: ``Status``): a frame whose status is not ``OK`` carries no image;
  its pixels still occupy space in the data (PLUS writes a blank frame) and are returned as zeros;
- any other field (``ProbePosition``...) is kept as text in ``TrackedSequence.frame_fields``.

Reading choices (documented because files in the wild differ):

- Frames are flipped to MF from ``UltrasoundImageOrientation`` (MF/MN/UF/UN, optional third
  letter; missing = MF). The original value is kept in ``metadata["SourceOrientation"]``.
- ``MET_UCHAR`` -> uint8 and ``MET_FLOAT`` -> float32 are read as they are. Other numeric
  element types (``MET_CHAR``, ``MET_SHORT``, ``MET_USHORT``, ``MET_INT``, ``MET_UINT``,
  ``MET_LONG``, ``MET_ULONG``, ``MET_LONG_LONG``, ``MET_ULONG_LONG``, ``MET_DOUBLE``) are converted to float32 frame by frame
  (the data model holds uint8 or float32 only) and the file's type is recorded in
  ``metadata["SourceElementType"]``. Anything else raises :class:`FileFormatError`.
- ``ElementSpacing`` is ``1 1 1`` in almost every PLUS file, where it means "unknown" (the
  geometry is in ImageToProbe). ``pixel_spacing_mm`` is therefore set only when the first two
  spacing values are not exactly ``1 1``.
- A transform field without a status is valid. A frame that lacks a transform field that other
  frames have gets an identity matrix marked invalid. A NaN/inf or non-16-number matrix raises
  :class:`FileFormatError` naming the frame and field, unless its status marks it invalid (an
  invalid transform is never used, and our own writer writes the NaN matrices the transform
  repository produces for invalid frames).
- Sequences without any ``Timestamp`` field get ``0, 1, 2, ...`` (the data model's default);
  a sequence where only some frames have one is rejected.
- The frame count is the last ``DimSize`` value (NDims 3; NDims 2 = one frame; NDims 4 with
  ``DimSize = cols rows 1 frames`` as PLUS writes it). The data must hold every frame, also
  those without an image; a ``Seq_Frame`` field of a frame beyond that count is an error.
- Header keys that describe the pixel layout (``DimSize``, ``ElementType``, ``Offset``,
  ``TransformMatrix``...) are regenerated on write and not kept; every other non-frame key is
  kept in ``metadata`` (``UltrasoundImageType``...). ``metadata["SourceOrientation"]`` and
  ``metadata["SourceElementType"]`` describe the file that was read and are not written back.

Writing (:func:`write_sequence_metafile`, :class:`SequenceMetafileWriter`) produces what PLUS
writes: MF frames, uint8 (``MET_UCHAR``) or float32 (``MET_FLOAT``), little-endian, header keys
in PLUS order with ``ElementDataFile`` last, numbers as the shortest text that reads back to the
same float64 (``repr``), compressed data streamed through ``zlib.compressobj``.

Reading streams: the output array is filled frame by frame, straight from the file
(``readinto``) or from a ``zlib.decompressobj`` fed in 1 MiB pieces; orientation flips are done
in place per frame. Peak memory is about the size of the frames plus a few MiB.

Header numbers are not trusted: ``DimSize`` and ``ElementNumberOfChannels`` (1 to 1024) are
multiplied as Python ints (no wrap-around) and the bytes they imply are checked against the data
file before anything is allocated (compressed data: against deflate's maximum ratio, and the
output grows as the data really decompress). The pixels are read *before* the per-frame arrays
(transforms, timestamps, status) are allocated, so those are sized by frames that exist. A
separate data file (``ElementDataFile``) must be a regular file in the header's folder or below
it (no absolute paths elsewhere, no ``..``, no device files, no links leading out). Values are
echoed in messages truncated to one short line.

Volumes (:func:`read_volume_metafile`): MetaIO's ``TransformMatrix`` (synonyms ``Rotation``,
``Orientation``) lists the direction matrix row by row of a matrix whose *rows* are the axes,
i.e. values ``3*a .. 3*a+2`` are the direction of axis ``a`` (i, j, k) in world coordinates.
ITK's MetaImageIO reads it that way (``SetDirection(a, values[a*n:(a+1)*n])``), so
``Volume.directions`` (columns = axes) is ``reshape(3, 3).T`` of the listed values.
``Offset`` (synonyms ``Position``, ``Origin``) is the world position of voxel (0, 0, 0) in mm.
"""

from __future__ import annotations

import logging
import math
import os
import re
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, SequenceError, TransformError
from ..orientation import normalize_orientation
from ..sequence import FrameTransforms, TrackedSequence
from ..transforms import split_transform_name
from ..volume import Volume
from ._safety import MAX_INFLATE_RATIO, check_memory, data_file_beside, format_bytes, shown

try:  # ISA-L inflates the same zlib/gzip streams about 3x faster than zlib; zlib when absent
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover
    _inflate = zlib
_INFLATE_ERRORS = (zlib.error, _inflate.error)

__all__ = [
    "parse_metaimage_header",
    "format_metaimage_header",
    "read_metaimage_header",
    "read_sequence_metafile",
    "write_sequence_metafile",
    "read_volume_metafile",
    "write_volume_metafile",
    "SequenceMetafileWriter",
]

logger = logging.getLogger(__name__)

#: MetaIO element types and the numpy types they are stored as (little-endian unless
#: ``BinaryDataByteOrderMSB``/``ElementByteOrderMSB`` is True).
_MET_TYPES = {
    "MET_CHAR": "i1",
    "MET_UCHAR": "u1",
    "MET_SHORT": "i2",
    "MET_USHORT": "u2",
    "MET_INT": "i4",
    "MET_UINT": "u4",
    "MET_LONG": "i4",
    "MET_ULONG": "u4",
    "MET_LONG_LONG": "i8",
    "MET_ULONG_LONG": "u8",
    "MET_FLOAT": "f4",
    "MET_DOUBLE": "f8",
}
_NUMPY_TO_MET = {
    "i1": "MET_CHAR",
    "u1": "MET_UCHAR",
    "i2": "MET_SHORT",
    "u2": "MET_USHORT",
    "i4": "MET_INT",
    "u4": "MET_UINT",
    "i8": "MET_LONG_LONG",
    "u8": "MET_ULONG_LONG",
    "f4": "MET_FLOAT",
    "f8": "MET_DOUBLE",
}

#: Keys that describe the pixel layout or the image geometry: never kept in ``metadata``
#: of a sequence, regenerated on write.
_SEQUENCE_STRUCTURAL_KEYS = frozenset(
    {
        "ObjectType",
        "NDims",
        "AnatomicalOrientation",
        "BinaryData",
        "BinaryDataByteOrderMSB",
        "ElementByteOrderMSB",
        "CenterOfRotation",
        "CompressedData",
        "CompressedDataSize",
        "DimSize",
        "Kinds",
        "ElementNumberOfChannels",
        "ElementSpacing",
        "ElementSize",
        "ElementType",
        "HeaderSize",
        "Offset",
        "Position",
        "Origin",
        "TransformMatrix",
        "Rotation",
        "Orientation",
        "UltrasoundImageOrientation",
        "ElementDataFile",
    }
)
#: Keys the reader adds to ``metadata`` to describe the file it read (not written back).
_READER_KEYS = frozenset({"SourceOrientation", "SourceElementType"})

#: For volumes the ultrasound/anatomical keys are plain metadata (a volume is not flipped).
_VOLUME_STRUCTURAL_KEYS = _SEQUENCE_STRUCTURAL_KEYS - {
    "AnatomicalOrientation",
    "UltrasoundImageOrientation",
}

_FRAME_PREFIX = "Seq_Frame"
_WHITESPACE_RE = re.compile(r"\s")
_FRAME_KEY_RE = re.compile(r"^Seq_Frame(\d{1,18})_(.+)$")
_TIMESTAMP = "Timestamp"
_IMAGE_STATUS_FIELDS = ("ImageStatus", "Status")

_MAX_LINE_BYTES = 1 << 20  # a header line longer than this is not a header line
_CHUNK_BYTES = 1 << 20  # compressed bytes read at a time
_FIRST_ALLOCATION_BYTES = 64 << 20  # output allocated for compressed data before it grows, at least
# ... and up to this many times the compressed bytes: ultrasound frames deflate 2-10x, so a real
# recording is read into one allocation (growing an array fills its new part with zeros, which
# was a fifth of reading 1050 frames), while a header that promises more than its compressed
# data hold still costs at most this factor of the file before the data run out.
_FIRST_ALLOCATION_RATIO = 32
_MAX_CHANNELS = 1024  # ElementNumberOfChannels above this is not an image
_SIZE_FIELD_WIDTH = 20  # reserved characters for the patched CompressedDataSize value
_DEFAULT_COMPRESSION_LEVEL = 6  # zlib's default, what PLUS uses


# -------------------------------------------------------------------------------------------
# Header text
# -------------------------------------------------------------------------------------------
def _where(source) -> str:
    return f"{source}: " if source else ""


def _parse_line(line: str, lineno: int, source) -> tuple[str, str] | None:
    """``(key, value)`` of one header line, None for a blank line; raise on malformed lines."""
    if line.endswith("\r"):
        line = line[:-1]
    if not line.strip():
        return None
    key, sep, value = line.partition("=")
    key = key.strip()
    if not sep:
        raise FileFormatError(
            f"{_where(source)}header line {lineno} {shown(line)} is not of the form 'Key = Value' (no '=')"
        )
    if not key:
        raise FileFormatError(f"{_where(source)}header line {lineno} {shown(line)} has an empty key")
    if _WHITESPACE_RE.search(key):
        raise FileFormatError(
            f"{_where(source)}header line {lineno} {shown(line)}: key {shown(key)} contains white space"
        )
    return key, value.strip()


def parse_metaimage_header(text: str, *, source: str = "") -> dict[str, str]:
    """Parse MetaImage header text into an ordered ``{key: raw value}`` dict.

    Lines are ``Key = Value``; keys and values are stripped of surrounding white space, blank
    lines are skipped, and parsing stops after the ``ElementDataFile`` line (the last field of
    a MetaImage header; whatever follows it is pixel data).

    Parameters
    ----------
    text : str
        Header text (``\\n`` or ``\\r\\n`` line ends).
    source : str, optional
        File name (or other origin) used in error messages.

    Returns
    -------
    dict[str, str]
        Keys in file order with their values as written (no type conversion).

    Raises
    ------
    FileFormatError
        A line without ``=``, with an empty key or a key containing white space, or a key that
        occurs twice; the message names the line number and the line.
    """
    fields: dict[str, str] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        item = _parse_line(line, lineno, source)
        if item is None:
            continue
        key, value = item
        if key in fields:
            raise FileFormatError(f"{_where(source)}header line {lineno}: key {shown(key)} occurs twice")
        fields[key] = value
        if key == "ElementDataFile":
            break
    return fields


def format_metaimage_header(fields: Mapping[str, object]) -> str:
    """Format ``{key: value}`` as MetaImage header text (``Key = Value\\n`` per field, in order).

    Raises
    ------
    FileFormatError
        A key that is empty or contains ``=`` or white space, or a value containing a line break
        (neither could be read back).
    """
    lines = []
    for key, value in fields.items():
        _check_key(key)
        lines.append(f"{key} = {_check_value(key, value)}\n")
    return "".join(lines)


def _check_key(key) -> str:
    if not isinstance(key, str) or not key or "=" in key or _WHITESPACE_RE.search(key):
        raise FileFormatError(
            f"MetaImage header key {shown(key)} must be a non-empty string without '=' or white space"
        )
    return key


def _check_value(key, value) -> str:
    text = str(value)
    if "\n" in text or "\r" in text:
        raise FileFormatError(
            f"MetaImage header field {shown(key)}: value {shown(text)} contains a line break"
        )
    return text.strip()


def read_metaimage_header(path) -> tuple[dict[str, str], int]:
    """Read the header of a MetaImage file without reading its pixel data.

    Parameters
    ----------
    path : str or Path
        ``.mha`` or ``.mhd`` file.

    Returns
    -------
    header : dict[str, str]
        As :func:`parse_metaimage_header` returns it.
    data_offset : int
        Byte offset just after the ``ElementDataFile`` line: where the pixel data starts when
        ``ElementDataFile = LOCAL``.

    Raises
    ------
    FileFormatError
        The file is missing, has no ``ElementDataFile`` line, or a header line is malformed.
    """
    path = Path(path)
    fields: dict[str, str] = {}
    try:
        with open(path, "rb") as f:
            lineno = 0
            while True:
                raw = f.readline(_MAX_LINE_BYTES)
                if not raw:
                    raise FileFormatError(
                        f"{path}: header ends without an ElementDataFile line (the required last "
                        f"field of a MetaImage header)"
                    )
                lineno += 1
                if not raw.endswith(b"\n") and len(raw) >= _MAX_LINE_BYTES:
                    raise FileFormatError(
                        f"{path}: header line {lineno} is longer than {_MAX_LINE_BYTES} bytes; "
                        f"not a MetaImage header"
                    )
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    line = raw.decode("latin-1")
                item = _parse_line(line.rstrip("\n"), lineno, path)
                if item is None:
                    continue
                key, value = item
                if key in fields:
                    raise FileFormatError(f"{path}: header line {lineno}: key {shown(key)} occurs twice")
                fields[key] = value
                if key == "ElementDataFile":
                    return fields, f.tell()
    except FileNotFoundError:
        raise FileFormatError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise FileFormatError(f"{path}: is a directory, not a MetaImage file") from None


# -------------------------------------------------------------------------------------------
# Pixel layout and streaming
# -------------------------------------------------------------------------------------------
def _ints(header, key, path, *, required=True) -> list[int] | None:
    text = header.get(key)
    if text is None:
        if required:
            raise FileFormatError(f"{path}: header field {key} is missing")
        return None
    try:
        values = [int(v) for v in text.split()]
    except ValueError:
        raise FileFormatError(
            f"{path}: header field {key} = {shown(text)} is not a list of integers"
        ) from None
    if any(v < 0 for v in values):
        raise FileFormatError(f"{path}: header field {key} = {shown(text)} holds negative values")
    return values


def _floats(header, key, path, count) -> list[float] | None:
    text = header.get(key)
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        raise FileFormatError(
            f"{path}: header field {key} = {shown(text)} is not a list of numbers"
        ) from None
    if len(values) != count or not all(np.isfinite(values)):
        raise FileFormatError(
            f"{path}: header field {key} = {shown(text)}: expected {count} finite numbers, got {len(values)}"
        )
    return values


def _bool(header, key, path, default=False) -> bool:
    text = header.get(key)
    if text is None:
        return default
    low = text.strip().lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise FileFormatError(f"{path}: header field {key} = {shown(text)} is not True or False")


class _Layout:
    """Where and how the pixel data of a MetaImage file is stored."""

    def __init__(self, path: Path, header: dict[str, str], data_offset: int):
        self.path = path
        ndims_text = header.get("NDims")
        dims = _ints(header, "DimSize", path)
        if ndims_text is not None:
            try:
                ndims = int(ndims_text)
            except ValueError:
                raise FileFormatError(
                    f"{path}: header field NDims = {shown(ndims_text)} is not an integer"
                ) from None
            if len(dims) != ndims:
                raise FileFormatError(
                    f"{path}: DimSize = {shown(header['DimSize'])} has {len(dims)} values but NDims = {ndims}"
                )
        self.ndims = len(dims)
        self.dims = dims
        if self.ndims not in (2, 3, 4):
            raise FileFormatError(f"{path}: NDims = {self.ndims} is not supported (2, 3 or 4)")

        n_channels = _ints(header, "ElementNumberOfChannels", path, required=False)
        if n_channels is not None and (
            len(n_channels) != 1 or not 1 <= n_channels[0] <= _MAX_CHANNELS
        ):
            raise FileFormatError(
                f"{path}: ElementNumberOfChannels = {shown(header['ElementNumberOfChannels'])} "
                f"is not an integer from 1 to {_MAX_CHANNELS}"
            )
        self.n_channels = n_channels[0] if n_channels else 1

        etype = header.get("ElementType")
        if etype is None:
            raise FileFormatError(f"{path}: header field ElementType is missing")
        if etype not in _MET_TYPES:
            raise FileFormatError(
                f"{path}: ElementType = {shown(etype)} is not supported; expected one of "
                f"{', '.join(_MET_TYPES)}"
            )
        self.element_type = etype
        msb = _bool(header, "BinaryDataByteOrderMSB", path) or _bool(
            header, "ElementByteOrderMSB", path
        )
        self.dtype = np.dtype((">" if msb else "<") + _MET_TYPES[etype])
        if not _bool(header, "BinaryData", path, default=True):
            raise FileFormatError(f"{path}: BinaryData = False (ASCII pixel data) is not supported")

        self.compressed = _bool(header, "CompressedData", path)
        self.compressed_size = None
        if self.compressed and "CompressedDataSize" in header:
            size = _ints(header, "CompressedDataSize", path)
            if len(size) != 1:
                raise FileFormatError(
                    f"{path}: CompressedDataSize = {shown(header['CompressedDataSize'])} is not one integer"
                )
            self.compressed_size = size[0]

        data_file = header.get("ElementDataFile")
        if data_file is None:
            raise FileFormatError(f"{path}: header field ElementDataFile is missing")
        self.header_size = None
        if data_file == "LOCAL":
            self.data_path = path
            self.data_offset = data_offset
        else:
            if data_file.upper() == "LIST" or "%" in data_file or not data_file:
                raise FileFormatError(
                    f"{path}: ElementDataFile = {shown(data_file)}: only LOCAL or one data file is supported"
                )
            self.data_path = data_file_beside(path, data_file, "ElementDataFile")
            self.data_offset = 0
            header_size = header.get("HeaderSize")
            if header_size is not None:
                try:
                    self.header_size = int(header_size)
                except ValueError:
                    raise FileFormatError(
                        f"{path}: HeaderSize = {shown(header_size)} is not an integer"
                    ) from None
                if self.header_size < -1:
                    raise FileFormatError(
                        f"{path}: HeaderSize = {shown(header_size)}: expected -1 (data at the end of "
                        f"the file) or a number of bytes >= 0"
                    )
                if self.header_size > 0:
                    self.data_offset = self.header_size
                size = self.data_path.stat().st_size
                if self.data_offset > size:
                    raise FileFormatError(
                        f"{path}: HeaderSize = {shown(header_size)} lies beyond the end of "
                        f"{self.data_path.name} ({size} bytes)"
                    )
        # Python ints: a product of header numbers cannot wrap around here.
        self.n_elements = math.prod(dims) * self.n_channels
        self.expected_bytes = self.n_elements * self.dtype.itemsize

    @property
    def element_bytes(self) -> int:
        return self.dtype.itemsize * self.n_channels

    def describe(self) -> str:
        return f"DimSize {shown(' '.join(map(str, self.dims)), quote=False)}, {self.element_type} x {self.n_channels} channel(s)"


class _RawSource:
    """Uncompressed pixel bytes read straight into caller buffers."""

    def __init__(self, layout: _Layout, f, expected_bytes: int):
        self.f = f
        self.layout = layout
        size = os.fstat(f.fileno()).st_size
        offset = layout.data_offset
        if layout.header_size == -1:  # MetaIO: the data are the last bytes of the file
            offset = max(size - expected_bytes, 0)
        available = size - offset
        if available < expected_bytes:
            raise FileFormatError(
                f"{layout.path}: pixel data truncated: {layout.describe()} needs {expected_bytes} "
                f"bytes, {layout.data_path.name} holds {max(available, 0)} bytes after offset {offset}"
            )
        if available > expected_bytes:
            logger.debug(
                "%s: %d bytes after the pixel data ignored",
                layout.data_path,
                available - expected_bytes,
            )
        f.seek(offset)

    def readinto(self, view: memoryview) -> int:
        filled = 0
        while filled < len(view):
            n = self.f.readinto(view[filled:])
            if not n:
                break
            filled += n
        return filled

    def finish(self, expected_bytes: int) -> None:
        pass


class _ZlibSource:
    """zlib-compressed pixel bytes, decompressed on the fly into caller buffers."""

    def __init__(self, layout: _Layout, f, expected_bytes: int):
        self.f = f
        self.layout = layout
        size = os.fstat(f.fileno()).st_size
        available = size - layout.data_offset
        self.left = available
        if layout.compressed_size is not None:
            if layout.compressed_size > available:
                raise FileFormatError(
                    f"{layout.path}: compressed pixel data truncated: CompressedDataSize = "
                    f"{layout.compressed_size} bytes but {layout.data_path.name} holds "
                    f"{max(available, 0)} bytes after offset {layout.data_offset}"
                )
            self.left = layout.compressed_size
        if expected_bytes > MAX_INFLATE_RATIO * max(self.left, 1):
            raise FileFormatError(
                f"{layout.path}: {layout.describe()} needs {expected_bytes} bytes but the "
                f"{self.left} compressed bytes cannot hold that much (zlib expands at most "
                f"{MAX_INFLATE_RATIO}x): DimSize and CompressedDataSize do not match"
            )
        f.seek(layout.data_offset)
        self.decompressor = _inflate.decompressobj(zlib.MAX_WBITS | 32)  # zlib or gzip stream
        self.produced = 0

    def _next_input(self) -> bytes:
        tail = self.decompressor.unconsumed_tail
        if tail:
            return tail
        if self.left <= 0:
            return b""
        data = self.f.read(min(_CHUNK_BYTES, self.left))
        self.left -= len(data)
        return data

    def readinto(self, view: memoryview) -> int:
        filled = 0
        while filled < len(view) and not self.decompressor.eof:
            data = self._next_input()
            try:
                # Bounded by what the caller can take (a bomb never inflates past it); ISA-L may
                # hold back output it has already inflated, drained by calls without new input.
                piece = self.decompressor.decompress(data, len(view) - filled)
            except _INFLATE_ERRORS as exc:
                raise FileFormatError(
                    f"{self.layout.path}: compressed pixel data are corrupt after "
                    f"{self.produced + filled} bytes ({exc})"
                ) from None
            if not data and not piece:
                break
            view[filled : filled + len(piece)] = piece
            filled += len(piece)
        self.produced += filled
        return filled

    def finish(self, expected_bytes: int) -> None:
        """Raise if the compressed stream holds more than ``expected_bytes``."""
        extra = bytearray(1)
        if self.readinto(memoryview(extra)):
            size = self.layout.compressed_size
            raise FileFormatError(
                f"{self.layout.path}: compressed pixel data (CompressedDataSize = "
                f"{size if size is not None else 'not given'}) hold more than the {expected_bytes} "
                f"bytes that {self.layout.describe()} needs: DimSize and the data do not match"
            )


def _read_slabs(layout: _Layout, shape: tuple[int, ...], dtype, *, on_slab=None) -> np.ndarray:
    """Fill an ``(n, ...) = shape`` array of ``dtype`` slab by slab from the file.

    ``out[i]`` receives the i-th ``prod(shape[1:])`` elements, converted from the file's
    element type when ``dtype`` differs. ``on_slab(i, out[i])`` runs after each slab. The data
    size is checked against the file before anything is allocated; uncompressed data are read
    into an array allocated once, compressed data into one that grows (doubling) as the data
    arrive (the first allocation sized from the compressed bytes, see
    ``_FIRST_ALLOCATION_RATIO``), so a header that promises more than its compressed data hold
    costs no more memory than a constant factor of the data.
    """
    n = shape[0]
    slab_elems = math.prod(shape[1:])
    slab_bytes = slab_elems * layout.dtype.itemsize
    out_slab_bytes = slab_elems * np.dtype(dtype).itemsize
    expected = n * slab_bytes
    dtype = np.dtype(dtype)
    direct = dtype == layout.dtype
    source_cls = _ZlibSource if layout.compressed else _RawSource
    with open(layout.data_path, "rb") as f:
        source = source_cls(layout, f, expected)
        if layout.compressed:
            first = max(_FIRST_ALLOCATION_BYTES, _FIRST_ALLOCATION_RATIO * source.left)
            capacity = min(n, max(1, first // max(out_slab_bytes, 1)))
        else:
            capacity = n
        check_memory(capacity * out_slab_bytes, layout.path, f"the pixel data ({layout.describe()})")
        out = np.empty((capacity,) + tuple(shape[1:]), dtype=dtype)
        scratch = None if direct else np.empty(shape[1:], dtype=layout.dtype)
        for i in range(n):
            if i == capacity:
                capacity = min(n, 2 * capacity)
                check_memory(
                    (capacity - i) * out_slab_bytes,
                    layout.path,
                    f"the pixel data ({layout.describe()})",
                )
                out.resize((capacity,) + tuple(shape[1:]), refcheck=False)
            target = out[i] if direct else scratch
            if slab_bytes:
                got = source.readinto(memoryview(target).cast("B"))
                if got < slab_bytes:
                    actual = i * slab_bytes + got
                    what = "decompress to" if layout.compressed else "hold"
                    raise FileFormatError(
                        f"{layout.path}: pixel data truncated: {layout.describe()} needs "
                        f"{expected} bytes, the data {what} only {actual} bytes "
                        f"(frame/slice {i} of {n} incomplete)"
                    )
            if not direct:
                out[i] = scratch
            if on_slab is not None:
                on_slab(i, out[i])
        if layout.compressed:
            source.finish(expected)
    return out


# -------------------------------------------------------------------------------------------
# Sequences: reading
# -------------------------------------------------------------------------------------------
def _parse_matrix(text: str, path, key) -> np.ndarray:
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        raise FileFormatError(f"{path}: {key} = {shown(text)} is not a list of 16 numbers") from None
    if len(values) != 16:
        raise FileFormatError(
            f"{path}: {key} has {len(values)} numbers, expected 16 (a 4x4 matrix)"
        )
    return np.asarray(values, dtype=np.float64).reshape(4, 4)


def _is_transform_name(field_name: str) -> bool:
    if not field_name.endswith("Transform") or field_name == "Transform":
        return False
    try:
        split_transform_name(field_name)
    except TransformError:
        return False
    return True


def read_sequence_metafile(path) -> TrackedSequence:
    """Read a PLUS sequence metafile (``.igs.mha``, ``.igs.mhd`` + ``.raw``/``.zraw``, ``.seq.mha``).

    Parameters
    ----------
    path : str or Path
        The ``.mha`` file, or the ``.mhd`` header (its ``ElementDataFile`` names the data file,
        relative to the header's folder).

    Returns
    -------
    TrackedSequence
        ``frames`` ``(n_frames, n_rows, n_cols[, n_channels])`` uint8 or float32 in MF
        orientation; transforms, validity, timestamps (s), image status, other per-frame fields
        and header metadata as described in the module docstring.

    Raises
    ------
    FileFormatError
        Missing/malformed header fields, unsupported element type, truncated or oversized pixel
        data (naming expected and actual bytes), malformed transforms or timestamps (naming the
        frame and field), a missing data file.
    SequenceError
        The file holds no frames (``DimSize`` frame count 0).
    """
    path = Path(path)
    header, data_offset = read_metaimage_header(path)
    layout = _Layout(path, header, data_offset)
    dims = layout.dims
    if layout.ndims == 2:
        n_cols, n_rows, n_frames = dims[0], dims[1], 1
    elif layout.ndims == 3:
        n_cols, n_rows, n_frames = dims
    else:
        if dims[2] != 1:
            raise FileFormatError(
                f"{path}: DimSize = {shown(header['DimSize'])}: sequences of 3D frames are not supported "
                f"(NDims 4 is read only with a third size of 1)"
            )
        n_cols, n_rows, n_frames = dims[0], dims[1], dims[3]
    if n_frames == 0:
        raise SequenceError(
            f"{path}: the sequence is empty (DimSize = {shown(header['DimSize'])} has 0 frames)"
        )
    if n_rows == 0 or n_cols == 0:
        raise FileFormatError(
            f"{path}: DimSize = {shown(header['DimSize'])}: frames of {n_cols} x {n_rows} pixels hold no image"
        )

    source_orientation = header.get("UltrasoundImageOrientation", "MF")
    orientation = normalize_orientation(source_orientation, source=str(path))

    metadata: dict[str, str] = {}
    per_frame: dict[str, dict[int, str]] = {}
    for key, value in header.items():
        match = _FRAME_KEY_RE.match(key)
        if match is None:
            if key.startswith(_FRAME_PREFIX):
                raise FileFormatError(
                    f"{path}: header field {shown(key)} is not of the form Seq_Frame<number>_<Name>"
                )
            if key not in _SEQUENCE_STRUCTURAL_KEYS:
                metadata[key] = value
            continue
        index, name = int(match.group(1)), match.group(2)
        if index >= n_frames:
            raise FileFormatError(
                f"{path}: header field {shown(key, quote=False)} refers to frame {index} but DimSize = "
                f"{shown(header['DimSize'])} has {n_frames} frame(s)"
            )
        values = per_frame.setdefault(name, {})
        if index in values:
            raise FileFormatError(f"{path}: frame {index} has field {shown(name)} twice")
        values[index] = value
    metadata["SourceOrientation"] = source_orientation

    spacing = None
    spacing_values = _floats_any(header, "ElementSpacing", path)
    if spacing_values is not None and len(spacing_values) >= 2:
        sx, sy = spacing_values[0], spacing_values[1]
        if not (sx > 0 and sy > 0):
            raise FileFormatError(
                f"{path}: ElementSpacing = {shown(header['ElementSpacing'])} must be positive"
            )
        if (sx, sy) != (1.0, 1.0):
            spacing = (sx, sy)

    # -- pixels first: they prove that the file holds n_frames frames, so the per-frame arrays
    # -- below are sized by data that exist, not by a header number alone
    no_image = set()  # frames whose status is not OK (a set: sized by the header's lines)
    for status_name in _IMAGE_STATUS_FIELDS:
        for index, value in per_frame.pop(status_name, {}).items():
            if value.upper() != "OK":
                no_image.add(index)
    frame_shape = (n_rows, n_cols) + ((layout.n_channels,) if layout.n_channels > 1 else ())
    if layout.element_type == "MET_UCHAR":
        out_dtype = np.dtype(np.uint8)
    else:
        out_dtype = np.dtype(np.float32)
        if layout.element_type != "MET_FLOAT":
            metadata["SourceElementType"] = layout.element_type
            logger.info("%s: %s pixels converted to float32", path, layout.element_type)
    flip_rows = orientation[1] == "N"
    flip_cols = orientation[0] == "U"

    def fix_frame(index, frame):
        if index in no_image:
            frame[...] = 0
            return
        if flip_rows:
            frame[...] = frame[::-1]
        if flip_cols:
            frame[...] = frame[:, ::-1]

    needs_fix = flip_rows or flip_cols or bool(no_image)
    frames = _read_slabs(
        layout, (n_frames,) + frame_shape, out_dtype, on_slab=fix_frame if needs_fix else None
    )

    # -- per-frame fields -----------------------------------------------------------------
    def key_of(index, name):
        return shown(f"Seq_Frame{index:04d}_{name}", quote=False)

    transform_names = [n for n in per_frame if _is_transform_name(n)]
    check_memory(
        n_frames * (len(transform_names) * (16 * 8 + 1) + 8 + 1),
        path,
        f"the per-frame transforms and timestamps of {n_frames} frames",
    )
    image_ok = np.ones(n_frames, dtype=bool)
    image_ok[sorted(no_image)] = False

    timestamps = None
    stamps = per_frame.pop(_TIMESTAMP, None)
    if stamps is not None:
        if len(stamps) < n_frames:
            index = next(i for i in range(n_frames) if i not in stamps)
            raise FileFormatError(
                f"{path}: frame {index} has no {_TIMESTAMP} field ({key_of(index, _TIMESTAMP)}) "
                f"while other frames have one"
            )
        timestamps = np.empty(n_frames, dtype=np.float64)
        for index in range(n_frames):
            try:
                timestamps[index] = float(stamps[index])
            except ValueError:
                timestamps[index] = np.nan
            if not np.isfinite(timestamps[index]):
                raise FileFormatError(
                    f"{path}: {key_of(index, _TIMESTAMP)} = {shown(stamps[index])} is not a finite number"
                )

    transforms: dict[str, FrameTransforms] = {}
    for name in transform_names:
        matrices_text = per_frame.pop(name)
        statuses = per_frame.pop(name + "Status", {})
        matrices = np.tile(np.eye(4), (n_frames, 1, 1))
        valid = np.zeros(n_frames, dtype=bool)
        for index, text in matrices_text.items():
            key = key_of(index, name)
            status = statuses.get(index, "OK")
            is_ok = status.upper() == "OK"
            matrix = _parse_matrix(text, path, key)
            if is_ok and not np.all(np.isfinite(matrix)):
                raise FileFormatError(
                    f"{path}: {key} (frame {index}) holds NaN or infinite values but its status is OK"
                )
            matrices[index] = matrix
            valid[index] = is_ok
        transforms[name[: -len("Transform")]] = FrameTransforms(matrices, valid)

    check_memory(
        n_frames * len(per_frame) * 64, path, f"the per-frame text fields of {n_frames} frames"
    )
    frame_fields = {
        name: [values.get(i, "") for i in range(n_frames)] for name, values in per_frame.items()
    }

    return TrackedSequence(
        frames=frames,
        timestamps_s=timestamps,
        transforms=transforms,
        image_ok=image_ok,
        pixel_spacing_mm=spacing,
        frame_fields=frame_fields,
        metadata=metadata,
    )


def _floats_any(header, key, path) -> list[float] | None:
    text = header.get(key)
    if text is None:
        return None
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        raise FileFormatError(
            f"{path}: header field {key} = {shown(text)} is not a list of numbers"
        ) from None
    if not all(np.isfinite(values)):
        raise FileFormatError(f"{path}: header field {key} = {shown(text)} holds NaN or infinite values")
    return values


# -------------------------------------------------------------------------------------------
# Writing
# -------------------------------------------------------------------------------------------
def _num(x) -> str:
    """Shortest text that reads back as exactly ``x`` (``1`` rather than ``1.0``)."""
    x = float(x)
    if x.is_integer() and abs(x) < 2.0**53:
        return str(int(x))
    return repr(x)


def _nums(values) -> str:
    return " ".join(_num(v) for v in np.asarray(values, dtype=np.float64).ravel())


def _data_names(path: Path, compress: bool) -> tuple[str, str | None]:
    """(``ElementDataFile`` value, data file name or None for LOCAL) from the header's name."""
    suffix = path.suffix.lower()
    if suffix == ".mha":
        return "LOCAL", None
    if suffix == ".mhd":
        name = path.name[: -len(path.suffix)] + (".zraw" if compress else ".raw")
        return name, name
    raise FileFormatError(f"{path}: a MetaImage file name must end in .mha or .mhd")


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.part")


def _write_metaimage(
    path: Path,
    header_items: list[tuple[str, str]],
    slabs: Iterable[np.ndarray],
    *,
    compress: bool,
    level: int = _DEFAULT_COMPRESSION_LEVEL,
) -> Path:
    """Write header (``ElementDataFile`` appended here) + pixel slabs, streaming, atomically.

    ``header_items`` must contain ``("CompressedDataSize", "")`` when ``compress`` is True: its
    value is reserved as a fixed-width field and patched once the compressed size is known.
    """
    path = Path(path)
    data_file_value, data_name = _data_names(path, compress)
    items = list(header_items) + [("ElementDataFile", data_file_value)]
    for key, value in items:
        _check_key(key)
        _check_value(key, value)

    def header_bytes(compressed_size):
        text = []
        patch_at = None
        for key, value in items:
            if key == "CompressedDataSize":
                prefix = "".join(text) + f"{key} = "
                patch_at = len(prefix.encode("utf-8"))
                value = ("0" if compressed_size is None else str(compressed_size)).ljust(
                    _SIZE_FIELD_WIDTH
                )
            text.append(f"{key} = {value}\n")
        return "".join(text).encode("utf-8"), patch_at

    def write_data(f) -> int:
        written = 0
        compressor = zlib.compressobj(level) if compress else None
        for slab in slabs:
            buf = memoryview(np.ascontiguousarray(slab)).cast("B")
            if compressor is None:
                f.write(buf)
                written += len(buf)
            else:
                chunk = compressor.compress(buf)
                f.write(chunk)
                written += len(chunk)
        if compressor is not None:
            chunk = compressor.flush()
            f.write(chunk)
            written += len(chunk)
        return written

    tmp_files = []
    try:
        if data_name is None:
            tmp = _tmp_path(path)
            tmp_files.append(tmp)
            with open(tmp, "wb") as f:
                head, patch_at = header_bytes(None)
                f.write(head)
                size = write_data(f)
                if compress:
                    f.seek(patch_at)
                    f.write(str(size).ljust(_SIZE_FIELD_WIDTH).encode("ascii"))
            os.replace(tmp, path)
        else:
            data_path = path.with_name(data_name)
            tmp_data = _tmp_path(data_path)
            tmp_files.append(tmp_data)
            with open(tmp_data, "wb") as f:
                size = write_data(f)
            tmp = _tmp_path(path)
            tmp_files.append(tmp)
            with open(tmp, "wb") as f:
                f.write(header_bytes(size if compress else None)[0])
            os.replace(tmp_data, data_path)
            os.replace(tmp, path)
    finally:
        for tmp in tmp_files:
            if tmp.exists():
                tmp.unlink()
    return path


def _frame_items(
    index: int,
    transforms: Iterable[tuple[str, np.ndarray, bool]],
    fields: Iterable[tuple[str, str]],
    timestamp_s: float,
    image_ok: bool,
) -> list[tuple[str, str]]:
    """Header items of one frame in PLUS order: transforms + status, fields, Timestamp, ImageStatus."""
    prefix = f"Seq_Frame{index:04d}_"
    items = []
    for name, matrix, valid in transforms:
        items.append((f"{prefix}{name}Transform", _nums(matrix)))
        items.append((f"{prefix}{name}TransformStatus", "OK" if valid else "INVALID"))
    for name, value in fields:
        items.append((prefix + name, _check_value(prefix + name, value)))
    items.append((prefix + _TIMESTAMP, _num(timestamp_s)))
    items.append((prefix + "ImageStatus", "OK" if image_ok else "INVALID"))
    return items


def _sequence_header(
    *,
    n_frames: int,
    frame_shape: tuple[int, ...],
    dtype,
    compress: bool,
    pixel_spacing_mm,
    metadata: Mapping[str, str],
) -> list[tuple[str, str]]:
    n_rows, n_cols = frame_shape[:2]
    n_channels = frame_shape[2] if len(frame_shape) == 3 else 1
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        etype = "MET_UCHAR"
    elif dtype == np.float32:
        etype = "MET_FLOAT"
    else:
        raise SequenceError(f"frames must be uint8 or float32 to be written, got {dtype}")
    spacing = "1 1 1" if pixel_spacing_mm is None else f"{_nums(pixel_spacing_mm)} 1"
    dims = f"{n_cols} {n_rows} {n_frames}"
    items = [
        ("ObjectType", "Image"),
        ("NDims", "3"),
        ("AnatomicalOrientation", "RAI"),
        ("BinaryData", "True"),
        ("BinaryDataByteOrderMSB", "False"),
        ("CenterOfRotation", "0 0 0"),
        ("CompressedData", "True" if compress else "False"),
    ]
    if compress:
        items.append(("CompressedDataSize", ""))
    items += [
        ("DimSize", dims),
        ("Kinds", "domain domain list"),
        ("ElementNumberOfChannels", str(n_channels)),
        ("ElementSpacing", spacing),
        ("ElementType", etype),
        ("Offset", "0 0 0"),
        ("TransformMatrix", "1 0 0 0 1 0 0 0 1"),
        ("UltrasoundImageOrientation", "MF"),
    ]
    for key, value in metadata.items():
        if key in _SEQUENCE_STRUCTURAL_KEYS or key in _READER_KEYS:
            continue
        if key.startswith(_FRAME_PREFIX):
            raise FileFormatError(
                f"metadata key {shown(key)} starts with {shown(_FRAME_PREFIX)} and would be read back as a "
                f"per-frame field; put per-frame values in frame_fields"
            )
        items.append((key, value))
    return items


def _check_frame_field_names(seq_or_names) -> None:
    reserved = {_TIMESTAMP, *_IMAGE_STATUS_FIELDS}
    for name in seq_or_names:
        _check_key(name)
        if name in reserved:
            raise FileFormatError(
                f"frame field {shown(name)} is reserved (written from timestamps/image_ok)"
            )


def write_sequence_metafile(seq: TrackedSequence, path, *, compress: bool = True) -> Path:
    """Write a tracked sequence as a PLUS sequence metafile.

    The header follows PLUS: structural keys first (``ObjectType``, ``NDims``, ...,
    ``CompressedDataSize``, ``DimSize``, ...), ``UltrasoundImageOrientation = MF`` (frames are MF
    in memory and written as they are), ``metadata``, then per frame the transforms with their
    status, other frame fields, ``Timestamp`` and ``ImageStatus``, and ``ElementDataFile`` last.
    Numbers are written with the shortest text that reads back exactly (``repr``). Frames whose
    ``image_ok`` is False are written blank, as PLUS does. Compressed data are streamed frame by
    frame through ``zlib.compressobj`` and ``CompressedDataSize`` (a reserved fixed-width field)
    is patched afterwards, so the compressed bytes are never held in memory. Files are written
    under a temporary name and renamed, so a failed write leaves no partial file.

    Parameters
    ----------
    seq : TrackedSequence
    path : str or Path
        ``.mha`` (data inline) or ``.mhd`` (data in ``<name>.raw``, or ``<name>.zraw`` when
        compressed, beside it).
    compress : bool
        zlib-compress the pixel data (``CompressedData = True``).

    Returns
    -------
    Path
        The header file written.
    """
    path = Path(path)
    if seq.n_frames == 0:
        raise SequenceError(f"{path}: cannot write an empty sequence")
    _check_frame_field_names(seq.frame_fields)
    for name in seq.transforms:
        _check_key(name)
    items = _sequence_header(
        n_frames=seq.n_frames,
        frame_shape=seq.frames.shape[1:],
        dtype=seq.frames.dtype,
        compress=compress,
        pixel_spacing_mm=seq.pixel_spacing_mm,
        metadata=seq.metadata,
    )
    for index in range(seq.n_frames):
        items += _frame_items(
            index,
            ((name, ft.matrices[index], ft.valid[index]) for name, ft in seq.transforms.items()),
            ((name, values[index]) for name, values in seq.frame_fields.items()),
            seq.timestamps_s[index],
            seq.image_ok[index],
        )
    little = seq.frames.dtype.newbyteorder("<")
    blank = np.zeros(seq.frames.shape[1:], dtype=little)

    def slabs():
        for index in range(seq.n_frames):
            if seq.image_ok[index]:
                yield seq.frames[index].astype(little, copy=False)
            else:
                yield blank

    return _write_metaimage(path, items, slabs(), compress=compress)


class SequenceMetafileWriter:
    """Record a sequence metafile frame by frame (``.mhd`` header + ``.raw``/``.zraw`` data).

    Each :meth:`append` adds the frame's pixels to the data file and, every ``header_every``
    frames, rewrites the header (written to a temporary file and renamed over the old one), so
    that after a crash the files on disk read as a valid sequence of all frames up to the last
    header rewrite: with ``header_every=1`` at most the frame in flight is lost. Compressed
    data are flushed (``Z_SYNC_FLUSH``) after every frame so that the bytes on disk always
    decompress to whole frames. Rewriting the header costs time proportional to the number of
    frames so far; for long recordings use ``header_every`` > 1.

    Parameters
    ----------
    path : str or Path
        The ``.mhd`` header to write (the data go to ``<name>.raw`` or ``<name>.zraw``).
    frame_shape : (n_rows, n_cols)
        Pixel size of every frame.
    dtype : uint8 or float32
    n_channels : int
    transform_names : sequence of str
        Transforms written for every frame in this order (``"ProbeToTracker"``, the
        ``Transform`` suffix optional). A frame that lacks one writes it as identity, INVALID.
        Names first seen in :meth:`append` are added.
    compress : bool
    header_every : int
        Rewrite the header after this many appended frames (and always on :meth:`close`).
    metadata : dict[str, str], optional
        Extra header fields (``UltrasoundImageType``...).
    pixel_spacing_mm : (sx, sy), optional

    Examples
    --------
    >>> with SequenceMetafileWriter(out, frame_shape=(480, 640), dtype=np.uint8,
    ...                             transform_names=["ProbeToTracker"]) as writer:  # doctest: +SKIP
    ...     writer.append(frame, 12.5, {"ProbeToTracker": (matrix, True)})
    """

    def __init__(
        self,
        path,
        *,
        frame_shape,
        dtype,
        n_channels: int = 1,
        transform_names=(),
        compress: bool = False,
        header_every: int = 1,
        metadata=None,
        pixel_spacing_mm=None,
    ):
        self.path = Path(path)
        if self.path.suffix.lower() != ".mhd":
            raise FileFormatError(
                f"{self.path}: the incremental writer writes .mhd (header) + .raw/.zraw (data) files"
            )
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.uint8), np.dtype(np.float32)):
            raise SequenceError(f"{self.path}: dtype must be uint8 or float32, got {self.dtype}")
        rows, cols = (int(v) for v in frame_shape)
        self.n_channels = int(n_channels)
        if rows < 1 or cols < 1 or self.n_channels < 1:
            raise SequenceError(
                f"{self.path}: frame_shape {tuple(frame_shape)} and n_channels {n_channels} must be positive"
            )
        self.frame_shape = (rows, cols) + ((self.n_channels,) if self.n_channels > 1 else ())
        self.compress = bool(compress)
        if int(header_every) < 1:
            raise ValueError(f"header_every must be >= 1, got {header_every}")
        self.header_every = int(header_every)
        self.transform_names = [_strip_transform_suffix(n) for n in transform_names]
        for name in self.transform_names:
            split_transform_name(name)
        self.metadata = dict(metadata or {})
        self.pixel_spacing_mm = (
            None if pixel_spacing_mm is None else tuple(float(v) for v in pixel_spacing_mm)
        )
        data_value, data_name = _data_names(self.path, self.compress)
        self._data_file_value = data_value
        self.data_path = self.path.with_name(data_name)
        self._frame_items: list[bytes] = []  # encoded header lines of each frame
        self._data_bytes = 0
        self._compressor = zlib.compressobj(_DEFAULT_COMPRESSION_LEVEL) if self.compress else None
        self._little = self.dtype.newbyteorder("<")
        self._data = open(self.data_path, "wb")
        self._closed = False
        self._write_header()

    @property
    def n_frames(self) -> int:
        """Frames appended so far."""
        return len(self._frame_items)

    def append(
        self, frame, timestamp_s: float, transforms=None, *, image_ok: bool = True, fields=None
    ) -> None:
        """Add one frame.

        Parameters
        ----------
        frame : (n_rows, n_cols[, n_channels]) array, MF orientation
            Converted to the writer's dtype (values must fit).
        timestamp_s : float
            Seconds.
        transforms : dict[str, (4x4 array, bool)], optional
            ``{name: (matrix, valid)}``.
        image_ok : bool
            False writes a blank frame with ``ImageStatus = INVALID``.
        fields : dict[str, str], optional
            Other per-frame text fields.
        """
        if self._closed:
            raise SequenceError(f"{self.path}: append after close")
        frame = np.asarray(frame)
        if frame.shape != self.frame_shape:
            raise SequenceError(
                f"{self.path}: frame {self.n_frames} has shape {frame.shape}, expected {self.frame_shape}"
            )
        timestamp_s = float(timestamp_s)
        if not np.isfinite(timestamp_s):
            raise SequenceError(
                f"{self.path}: frame {self.n_frames} timestamp {timestamp_s} is not finite"
            )
        given = {}
        for name, value in (transforms or {}).items():
            matrix, valid = value
            matrix = np.asarray(matrix, dtype=np.float64)
            if matrix.shape != (4, 4):
                raise SequenceError(
                    f"{self.path}: frame {self.n_frames} transform {shown(name)} has shape {matrix.shape}, expected (4, 4)"
                )
            name = _strip_transform_suffix(name)
            split_transform_name(name)
            if name not in self.transform_names:
                self.transform_names.append(name)
            given[name] = (matrix, bool(valid) and bool(np.all(np.isfinite(matrix))))
        fields = dict(fields or {})
        _check_frame_field_names(fields)
        identity = np.eye(4)
        items = _frame_items(
            self.n_frames,
            ((n, *given.get(n, (identity, False))) for n in self.transform_names),
            fields.items(),
            timestamp_s,
            bool(image_ok),
        )
        line = "".join(f"{k} = {v}\n" for k, v in items).encode("utf-8")

        pixels = (
            frame.astype(self._little, copy=False)
            if image_ok
            else np.zeros(self.frame_shape, self._little)
        )
        buf = memoryview(np.ascontiguousarray(pixels)).cast("B")
        if self._compressor is None:
            self._data.write(buf)
            self._data_bytes += len(buf)
        else:
            for chunk in (
                self._compressor.compress(buf),
                self._compressor.flush(zlib.Z_SYNC_FLUSH),
            ):
                self._data.write(chunk)
                self._data_bytes += len(chunk)
        self._data.flush()
        self._frame_items.append(line)
        if self.n_frames % self.header_every == 0:
            self._write_header()

    def _write_header(self) -> None:
        items = _sequence_header(
            n_frames=self.n_frames,
            frame_shape=self.frame_shape,
            dtype=self.dtype,
            compress=self.compress,
            pixel_spacing_mm=self.pixel_spacing_mm,
            metadata=self.metadata,
        )
        head = []
        for key, value in items:
            if key == "CompressedDataSize":
                value = str(self._data_bytes)
            head.append(f"{key} = {_check_value(key, value)}\n")
        tmp = _tmp_path(self.path)
        with open(tmp, "wb") as f:
            f.write("".join(head).encode("utf-8"))
            f.writelines(self._frame_items)
            f.write(f"ElementDataFile = {self._data_file_value}\n".encode("utf-8"))
        os.replace(tmp, self.path)

    def close(self) -> Path:
        """Finish the data stream, write the final header and close. Returns the header path."""
        if self._closed:
            return self.path
        self._closed = True
        try:
            if self._compressor is not None:
                chunk = self._compressor.flush(zlib.Z_FINISH)
                self._data.write(chunk)
                self._data_bytes += len(chunk)
        finally:
            self._data.close()
        self._write_header()
        return self.path

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False


def _strip_transform_suffix(name: str) -> str:
    return name[: -len("Transform")] if name.endswith("Transform") else name


# -------------------------------------------------------------------------------------------
# Volumes
# -------------------------------------------------------------------------------------------
def _first_present(header, keys):
    for key in keys:
        if key in header:
            return key
    return None


def read_volume_metafile(path) -> Volume:
    """Read a 3D MetaImage volume (``.mha``/``.mhd``), e.g. a PLUS reconstruction.

    Parameters
    ----------
    path : str or Path

    Returns
    -------
    Volume
        ``voxels`` ``(n_k, n_j, n_i[, n_channels])`` in the file's element type (native byte
        order); ``spacing_mm`` from ``ElementSpacing``, ``origin_mm`` from ``Offset``,
        ``directions`` from ``TransformMatrix`` (see the module docstring); other header keys
        in ``metadata``. A 2D image is returned as one slice (``n_k = 1``).

    Raises
    ------
    FileFormatError
        As for :func:`read_sequence_metafile`; also NDims other than 2 or 3.
    """
    path = Path(path)
    header, data_offset = read_metaimage_header(path)
    layout = _Layout(path, header, data_offset)
    if layout.ndims not in (2, 3):
        raise FileFormatError(
            f"{path}: NDims = {layout.ndims}: volumes must have 2 or 3 dimensions"
        )
    if 0 in layout.dims:
        raise FileFormatError(
            f"{path}: DimSize = {shown(header['DimSize'])}: a volume needs at least one voxel along each axis"
        )
    nd = layout.ndims
    dims = list(layout.dims) + [1] * (3 - nd)
    spacing_key = _first_present(header, ("ElementSpacing", "ElementSize"))
    spacing = _floats(header, spacing_key, path, nd) if spacing_key else [1.0] * nd
    if min(spacing) <= 0:
        raise FileFormatError(f"{path}: {spacing_key} = {shown(header[spacing_key])} must be positive")
    offset_key = _first_present(header, ("Offset", "Position", "Origin"))
    origin = _floats(header, offset_key, path, nd) if offset_key else [0.0] * nd
    matrix_key = _first_present(header, ("TransformMatrix", "Rotation", "Orientation"))
    directions = np.eye(3)
    if matrix_key:
        values = _floats(header, matrix_key, path, nd * nd)
        directions[:nd, :nd] = np.asarray(values).reshape(nd, nd).T
    shape = (dims[2], dims[1], dims[0]) + ((layout.n_channels,) if layout.n_channels > 1 else ())
    voxels = _read_slabs(layout, shape, layout.dtype.newbyteorder("="))
    metadata = {k: v for k, v in header.items() if k not in _VOLUME_STRUCTURAL_KEYS}
    return Volume(
        voxels=voxels,
        spacing_mm=tuple(spacing) + (1.0,) * (3 - nd),
        origin_mm=tuple(origin) + (0.0,) * (3 - nd),
        directions=directions,
        metadata=metadata,
    )


def write_volume_metafile(volume: Volume, path, *, compress: bool = False) -> Path:
    """Write a :class:`Volume` as a 3D MetaImage (``.mha`` inline or ``.mhd`` + ``.raw/.zraw``).

    ``TransformMatrix`` is written as the transpose of ``directions`` flattened (axis by axis,
    the MetaIO/ITK convention), ``Offset`` = ``origin_mm``, ``ElementSpacing`` = ``spacing_mm``.
    ``metadata`` entries follow the geometry; keys that describe the layout are regenerated.

    Returns
    -------
    Path
        The header file written.
    """
    path = Path(path)
    voxels = np.asarray(volume.voxels)
    code = voxels.dtype.kind + str(voxels.dtype.itemsize)
    if voxels.dtype == np.bool_:
        voxels = voxels.view(np.uint8)
        code = "u1"
    if code not in _NUMPY_TO_MET:
        raise FileFormatError(f"{path}: voxel type {voxels.dtype} cannot be written to MetaImage")
    n_k, n_j, n_i = voxels.shape[:3]
    n_channels = voxels.shape[3] if voxels.ndim == 4 else 1
    items = [
        ("ObjectType", "Image"),
        ("NDims", "3"),
        ("BinaryData", "True"),
        ("BinaryDataByteOrderMSB", "False"),
        ("CompressedData", "True" if compress else "False"),
    ]
    if compress:
        items.append(("CompressedDataSize", ""))
    items += [
        ("TransformMatrix", _nums(np.asarray(volume.directions).T)),
        ("Offset", _nums(volume.origin_mm)),
        ("CenterOfRotation", "0 0 0"),
        ("ElementSpacing", _nums(volume.spacing_mm)),
        ("DimSize", f"{n_i} {n_j} {n_k}"),
        ("ElementNumberOfChannels", str(n_channels)),
        ("ElementType", _NUMPY_TO_MET[code]),
    ]
    for key, value in volume.metadata.items():
        if key not in _VOLUME_STRUCTURAL_KEYS:
            items.append((key, value))
    little = voxels.dtype.newbyteorder("<")
    slabs = (voxels[k].astype(little, copy=False) for k in range(n_k))
    return _write_metaimage(path, items, slabs, compress=compress)
