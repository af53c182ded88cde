"""MetaImage header text: the shared model of PLUS sequence metafiles and MetaImage volumes.

The ``Key = Value`` header (parsed, formatted, read from a file without its pixel data), the
MetaIO element types, and the header keys that describe the pixel layout, which the reader
(:mod:`.metaimage_read`) does not keep and the writer (:mod:`.metaimage_write`) regenerates. The
format and the reading and writing choices are described in :mod:`.metaimage`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from ..errors import FileFormatError
from ._safety import shown

__all__ = [
    "parse_metaimage_header",
    "format_metaimage_header",
    "read_metaimage_header",
]

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


