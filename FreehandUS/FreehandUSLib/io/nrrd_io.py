"""NRRD tracked sequences (PLUS ``.igs.nrrd``, Slicer ``.seq.nrrd``) and NRRD volumes (pynrrd).

Two sequence layouts are read, told apart by the ``kinds`` field, not by the file name:

**PLUS** (``vtkPlusNrrdSequenceIO`` / IGSIO): ``dimension: 3``, ``kinds: domain domain list``,
``sizes: W H N`` (``kinds: vector domain domain list`` with a leading channel axis for
multi-channel frames), ``space dimension: 2``. Per-frame values are NRRD key/value pairs named
like the fields of a PLUS sequence metafile::

    Seq_Frame0000_ProbeToTrackerTransform:=r11 r12 r13 tx ... 0 0 0 1
    Seq_Frame0000_ProbeToTrackerTransformStatus:=OK          (anything else: invalid)
    Seq_Frame0000_Timestamp:=345.627957
    Seq_Frame0000_Status:=OK                                 (image status)
    ultrasound image orientation:=MFA
    ultrasound image type:=BRIGHTNESS

PLUS's NRRD writer names the image status ``Status`` where its metafile writer says
``ImageStatus``; both are read into ``image_ok`` (the metafile reader does the same), so the
two readers give equal sequences. We write ``Status``, the name PLUS's NRRD reader looks for.
``ultrasound image type`` is kept as ``metadata["UltrasoundImageType"]``, the metafile name.
As in the metafile reader, ``metadata["SourceOrientation"]`` (the file's orientation, frames
are flipped to MF) and ``metadata["SourceElementType"]`` (the NRRD ``type`` when frames other
than uint8/float32 were converted to float32) describe the file read and are not written back.

**Slicer volume sequence** (Sequences module, ``vtkMRMLVolumeSequenceStorageNode``): a 4D image
``kinds: domain domain domain list`` (current Slicer) or ``list domain domain domain`` (older
Slicer), with ``axis 3 index values`` / ``axis 0 index values`` (URL-encoded, space separated:
one per frame), ``axis N index type``, ``DataNodeClassName``, ``space``, ``space directions``
and ``space origin``. Frames must be 2D slices (size 1 along the third spatial axis). Timestamps
are the index values when numeric; PLUS per-frame key/values, when present (we write them),
take precedence. The frame geometry is kept as ``metadata["IJKToRAS"]`` (16 numbers, row
major, Slicer's RAS) and the pixel spacing as ``pixel_spacing_mm``. A plain Slicer volume
sequence holds no transforms.

Both writers (``flavor="plus"`` / ``"slicer"``) write numbers as the shortest text that reads
back to the same float64 (``repr``), so a round trip is exact: frames bit for bit, transforms,
validity, timestamps, image status, other per-frame fields and metadata (except the
``Source*`` keys, which describe the file read, and ``IJKToRAS``, which a Slicer-flavor file
always gets). A pixel spacing of exactly 1 x 1 mm (what PLUS writes for "unknown", as
``ElementSpacing = 1 1 1`` in metafiles) reads back as ``pixel_spacing_mm = None``. Transform
status texts other than ``OK`` are written back as ``INVALID``.

Volumes are written with ``space: left-posterior-superior``: our volumes live in PLUS
Reference mm, which PLUS writes to ``.mha`` with no anatomical frame, and ITK (so Slicer) reads
every ``.mha`` as LPS. Declaring LPS in the NRRD makes Slicer put the NRRD at exactly the place it
puts the same volume saved as ``.mha`` (RAS = diag(-1, -1, 1) * the stored mm). On reading, RAS and
LAS files are converted to that LPS convention; ``3D-right-handed`` or no ``space`` is taken as
LPS, as ITK and so Slicer do (checked with slicer-core's storage nodes in the tests).

pynrrd parses the header (read line by line with a length limit); the data block is read here,
bounded by what the header implies: ``prod(sizes) * type size`` (Python ints, no wrap-around) is
checked against the file before anything is allocated, gzip/bzip2 data are inflated incrementally
and never past that size (a gzip bomb costs nothing), ``line skip`` stops at the end of the file,
``byte skip: -1`` is accepted with raw encoding only (as the NRRD format says), and a detached
``data file`` must be one regular file in the header's folder or below (no ``/dev/zero``, no
``../..``, no ``LIST``). The decompressed block is held in memory once (a 1500-frame 640x480
uint8 sequence is 460 MB of pixels); the PLUS metafile reader streams frame by frame where
memory matters.
"""

from __future__ import annotations

import bz2
import logging
import math
import os
import re
import zlib
from pathlib import Path
from urllib.parse import quote, unquote

import nrrd
import numpy as np

from ..errors import FileFormatError, FreehandUSError, SequenceError
from ..orientation import normalize_orientation, to_mf
from ..sequence import TrackedSequence
from ..transforms import split_transform_name
from ..volume import Volume
from ._safety import MAX_INFLATE_RATIO, check_memory, data_file_beside, shown

try:  # ISA-L inflates the same zlib/gzip streams about 3x faster than zlib; zlib when absent
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover
    _inflate = zlib
_INFLATE_ERRORS = (zlib.error, _inflate.error)

__all__ = ["read_sequence_nrrd", "write_sequence_nrrd", "read_volume_nrrd", "write_volume_nrrd"]

logger = logging.getLogger(__name__)

_FRAME_KEY_RE = re.compile(r"^Seq_Frame(\d{1,18})_(.+)$")
_AXIS_KEY_RE = re.compile(r"^axis (\d+) index (type|values)$")
_ORIENTATION_KEY = "ultrasound image orientation"
_IMAGE_TYPE_KEY = "ultrasound image type"
_IMAGE_TYPE_META = "UltrasoundImageType"
_IJK_TO_RAS_META = "IJKToRAS"
#: Metadata describing the file a sequence was read from (as the metafile reader sets them);
#: never written back.
_SOURCE_META = ("SourceOrientation", "SourceElementType")
_DATA_NODE_KEY = "DataNodeClassName"
_IMAGE_STATUS_FIELDS = ("Status", "ImageStatus")
_WRITTEN_IMAGE_STATUS = "Status"

#: Standard NRRD fields (never key/value pairs, so never metadata).
_NRRD_FIELDS = frozenset(
    "type|dimension|space dimension|space|sizes|space directions|kinds|endian|encoding|min|max|"
    "oldmin|old min|oldmax|old max|content|sample units|spacings|thicknesses|axis mins|axismins|"
    "axis maxs|axismaxs|centerings|labels|units|space units|space origin|measurement frame|"
    "data file|datafile|line skip|lineskip|byte skip|byteskip|number|block size|blocksize".split("|")
)

_FRAME_KINDS = ("list", "time")
_DOMAIN_KINDS = ("domain", "space")
#: Space names -> diagonal that maps the file's coordinates to LPS (and LPS to RAS for RAS).
_SPACE_TO_LPS = {
    "left-posterior-superior": (1.0, 1.0, 1.0),
    "lps": (1.0, 1.0, 1.0),
    "3d-right-handed": (1.0, 1.0, 1.0),
    "right-anterior-superior": (-1.0, -1.0, 1.0),
    "ras": (-1.0, -1.0, 1.0),
    "left-anterior-superior": (1.0, -1.0, 1.0),
    "las": (1.0, -1.0, 1.0),
}
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: gzip level. On NwirePhantomFreehand (49 MB of uint8 pixels): level 1 gives 780 kB in 0.10 s,
#: level 4 557 kB in 0.17 s, level 9 543 kB in 0.47 s.
_COMPRESSION_LEVEL = 4


# ------------------------------------------------------------------------------------------------
# low-level reading


#: NRRD type names (the format's list of synonyms) -> numpy type codes.
_NRRD_TYPES = {
    **dict.fromkeys(("signed char", "int8", "int8_t"), "i1"),
    **dict.fromkeys(("uchar", "unsigned char", "uint8", "uint8_t"), "u1"),
    **dict.fromkeys(
        ("short", "short int", "signed short", "signed short int", "int16", "int16_t"), "i2"
    ),
    **dict.fromkeys(
        ("ushort", "unsigned short", "unsigned short int", "uint16", "uint16_t"), "u2"
    ),
    **dict.fromkeys(("int", "signed int", "int32", "int32_t"), "i4"),
    **dict.fromkeys(("uint", "unsigned int", "uint32", "uint32_t"), "u4"),
    **dict.fromkeys(
        (
            "longlong",
            "long long",
            "long long int",
            "signed long long",
            "signed long long int",
            "int64",
            "int64_t",
        ),
        "i8",
    ),
    **dict.fromkeys(
        ("ulonglong", "unsigned long long", "unsigned long long int", "uint64", "uint64_t"), "u8"
    ),
    "float": "f4",
    "double": "f8",
}
_RAW = ("raw",)
_GZIP = ("gzip", "gz")
_BZIP2 = ("bzip2", "bz2")
_ASCII = ("ascii", "text", "txt")
_MAX_HEADER_LINE = 64 << 20  # bytes; a longer "line" is not a NRRD header line
_CHUNK = 1 << 20  # compressed bytes read at a time
#: pynrrd's parsers raise these on malformed field values (e.g. IndexError for an empty
#: ``space origin``); each becomes a FileFormatError naming the file.
_PARSE_ERRORS = (
    nrrd.NRRDError,
    ValueError,
    KeyError,
    IndexError,
    TypeError,
    OverflowError,
    AttributeError,
    UnicodeError,
)


def _read_header(path: Path, fh):
    """Parse the header (pynrrd) from lines read with a length limit; leave ``fh`` at the data.

    Returns the header with ``sizes`` checked: ``dimension`` positive integers, each at least 1.
    """
    lines = []
    while True:
        line = fh.readline(_MAX_HEADER_LINE)
        if not line:
            break
        if len(line) >= _MAX_HEADER_LINE and not line.endswith(b"\n"):
            raise FileFormatError(
                f"{path}: header line {len(lines) + 1} is longer than {_MAX_HEADER_LINE} bytes; "
                "not a NRRD header"
            )
        lines.append(line)
        if len(lines) > 1 and not line.rstrip() and not line.startswith(b"#"):
            break  # the blank line that ends the header
    if not lines:
        raise FileFormatError(f"{path}: empty file, expected a NRRD header")
    try:
        header = nrrd.read_header(lines)
    except StopIteration:
        raise FileFormatError(f"{path}: empty file, expected a NRRD header") from None
    except _PARSE_ERRORS as exc:
        raise FileFormatError(
            f"{path}: invalid NRRD header: {shown(str(exc), 160, quote=False)}"
        ) from None
    for key in ("dimension", "sizes", "type", "encoding"):
        if key not in header:
            raise FileFormatError(f"{path}: NRRD header lacks the required field {key!r}")
    try:
        sizes = [int(v) for v in np.asarray(header["sizes"]).reshape(-1)]
        dimension = int(header["dimension"])
    except (TypeError, ValueError, OverflowError):
        raise FileFormatError(
            f"{path}: 'sizes' {shown(header['sizes'])} is not a list of integers"
        ) from None
    if dimension != len(sizes):
        raise FileFormatError(
            f"{path}: 'dimension' is {dimension} but 'sizes' has {len(sizes)} values"
        )
    if any(v < 0 for v in sizes):
        raise FileFormatError(f"{path}: 'sizes' {shown(sizes)}: sizes must not be negative")
    if "kinds" in header and len(header["kinds"]) != len(sizes):
        raise FileFormatError(
            f"{path}: 'kinds' has {len(header['kinds'])} entries, expected {len(sizes)} (one per axis)"
        )
    header["sizes"] = np.asarray(sizes, dtype=np.int64) if max(sizes) < 2**63 else sizes
    return header


def _nrrd_int(header, keys, default: int, path: Path) -> int:
    for key in keys:
        if key in header:
            try:
                return int(header[key])
            except (TypeError, ValueError, OverflowError):
                raise FileFormatError(
                    f"{path}: {key!r} {shown(header[key])} is not an integer"
                ) from None
    return default


def _data_dtype(header, path: Path) -> np.dtype:
    type_name = str(header["type"]).strip().lower()
    if type_name not in _NRRD_TYPES:
        raise FileFormatError(
            f"{path}: 'type' {shown(header['type'])} is not supported (expected a NRRD integer or "
            "floating-point type)"
        )
    code = _NRRD_TYPES[type_name]
    encoding = str(header["encoding"]).strip().lower()
    if code[1] != "1" and encoding not in _ASCII:
        endian = str(header.get("endian", "")).strip().lower()
        if endian not in ("little", "big"):
            raise FileFormatError(
                f"{path}: 'endian' {shown(header.get('endian', 'missing'))}: a {type_name} "
                "data block needs 'endian: little' or 'endian: big'"
            )
        code = ("<" if endian == "little" else ">") + code
    return np.dtype(code)


def _read_data(path: Path, fh, header) -> np.ndarray:
    """The data block in C order (shape = reversed ``sizes``), read within the header's bounds.

    ``fh`` is positioned just after the header. The number of bytes the header implies
    (``prod(sizes) * type size``, as a Python int) is checked against the file before anything
    is allocated; compressed data are inflated incrementally and never beyond that size (plus
    ``byte skip``); ``line skip`` stops at the end of the file; a detached ``data file`` must lie
    beside the header (same folder or below) and be a regular file.
    """
    sizes = [int(v) for v in header["sizes"]]
    dtype = _data_dtype(header, path)
    encoding = str(header["encoding"]).strip().lower()
    if encoding not in _RAW + _GZIP + _BZIP2 + _ASCII:
        raise FileFormatError(
            f"{path}: 'encoding' {shown(header['encoding'])} is not supported (raw, gzip, bzip2 or ascii)"
        )
    line_skip = _nrrd_int(header, ("line skip", "lineskip"), 0, path)
    byte_skip = _nrrd_int(header, ("byte skip", "byteskip"), 0, path)
    if line_skip < 0:
        raise FileFormatError(f"{path}: 'line skip' is {line_skip}; it must be >= 0")
    if byte_skip < -1:
        raise FileFormatError(f"{path}: 'byte skip' is {byte_skip}; it must be >= -1")
    if byte_skip == -1 and encoding not in _RAW:
        raise FileFormatError(
            f"{path}: 'byte skip: -1' (data at the end of the file) is only valid with raw encoding, "
            f"not {encoding}"
        )
    data_file = header.get("data file", header.get("datafile"))
    describe = f"sizes {shown(sizes, quote=False)} of {header['type']} ({encoding})"
    if data_file is not None:
        name = str(data_file).strip()
        if name.upper().startswith("LIST") or len(name.split()) > 1:
            raise FileFormatError(
                f"{path}: 'data file' {shown(name)}: only one detached data file is supported"
            )
        data_path = data_file_beside(path, name, "data file")
        with open(data_path, "rb") as data_fh:
            return _read_block(path, data_fh, 0, sizes, dtype, encoding, line_skip, byte_skip, describe)
    return _read_block(path, fh, fh.tell(), sizes, dtype, encoding, line_skip, byte_skip, describe)


def _read_block(path, f, offset, sizes, dtype, encoding, line_skip, byte_skip, describe):
    n_values = math.prod(sizes)
    nbytes = n_values * dtype.itemsize
    size = os.fstat(f.fileno()).st_size
    f.seek(offset)
    if line_skip > size - offset:
        raise FileFormatError(
            f"{path}: 'line skip' {line_skip} is more lines than the {max(size - offset, 0)} bytes "
            "after the header can hold"
        )
    for number in range(line_skip):
        while True:
            line = f.readline(_CHUNK)
            if not line:
                raise FileFormatError(
                    f"{path}: the file ends after {number} of the {line_skip} lines of 'line skip'"
                )
            if line.endswith(b"\n"):
                break
    position = f.tell()
    available = size - position
    if encoding in _RAW:
        if byte_skip == -1:
            position = size - nbytes
        else:
            position += byte_skip
        if nbytes > size - position or position < 0:
            raise FileFormatError(
                f"{path}: NRRD data truncated or corrupt: {describe} need {nbytes} bytes, the file holds "
                f"{max(size - max(position, 0), 0)} after the header and skips"
            )
        check_memory(nbytes, path, f"the data ({describe})")
        out = np.empty(n_values, dtype=dtype)
        view = memoryview(out).cast("B")
        f.seek(position)
        filled = 0
        while filled < nbytes:
            got = f.readinto(view[filled:])
            if not got:
                raise FileFormatError(f"{path}: NRRD data truncated or corrupt after {filled} of {nbytes} bytes")
            filled += got
        return out.reshape(sizes[::-1])
    if encoding in _ASCII:
        check_memory(available * 24, path, f"the text data ({describe})")
        tokens = f.read(available).split()
        if len(tokens) < n_values:
            raise FileFormatError(
                f"{path}: NRRD text data truncated or corrupt: {describe} need {n_values} values, the file holds "
                f"{len(tokens)}"
            )
        try:
            values = np.array([float(t) for t in tokens[:n_values]], dtype=np.float64)
        except ValueError:
            raise FileFormatError(f"{path}: NRRD text data hold a value that is not a number") from None
        if dtype.kind in "iu":
            info = np.iinfo(dtype)
            if not (np.all(values == np.round(values)) and values.min() >= info.min and values.max() <= info.max):
                raise FileFormatError(f"{path}: NRRD text data do not fit the type {dtype}")
        return values.astype(dtype).reshape(sizes[::-1])
    # gzip / bzip2: inflate incrementally, never past byte skip + the data (skipped bytes are
    # dropped as they come), plus one byte that tells whether the data are longer
    want = byte_skip + nbytes
    if encoding in _GZIP and want > MAX_INFLATE_RATIO * max(available, 1):
        raise FileFormatError(
            f"{path}: {describe} need {nbytes} bytes"
            + (f" after a byte skip of {byte_skip}" if byte_skip else "")
            + f" but {available} gzip bytes cannot hold that much (gzip expands at most "
            f"{MAX_INFLATE_RATIO}x): 'sizes' and the data do not match"
        )
    check_memory(nbytes, path, f"the data ({describe})")
    decompressor = _inflate.decompressobj(zlib.MAX_WBITS | 32) if encoding in _GZIP else bz2.BZ2Decompressor()
    out = bytearray()
    produced = 0  # bytes inflated, skipped ones included
    pending = b""
    left = available
    while produced < want + 1:
        limit = min(want + 1 - produced, _CHUNK * 16)
        try:
            if encoding in _GZIP:
                if not pending:
                    pending = f.read(min(_CHUNK, left))
                    left -= len(pending)
                fed = bool(pending)
                # ISA-L may hold back inflated output: drained by calls without new input.
                piece = decompressor.decompress(pending, limit)
                pending = decompressor.unconsumed_tail
                done = decompressor.eof
                if not fed and not piece:
                    break
            else:
                data = b""
                if decompressor.needs_input:
                    data = f.read(min(_CHUNK, left))
                    left -= len(data)
                    if not data:
                        break
                piece = decompressor.decompress(data, limit)
                done = decompressor.eof
        except (*_INFLATE_ERRORS, OSError, EOFError, ValueError) as exc:
            raise FileFormatError(
                f"{path}: {encoding} data truncated or corrupt after {produced} bytes "
                f"({shown(str(exc), quote=False)})"
            ) from None
        skip = min(max(byte_skip - produced, 0), len(piece))
        out += memoryview(piece)[skip:]
        produced += len(piece)
        if done:
            break
    if produced < want:
        raise FileFormatError(
            f"{path}: NRRD data truncated or corrupt: {describe} need {nbytes} bytes"
            + (f" after a byte skip of {byte_skip}" if byte_skip else "")
            + f", the {encoding} data hold only {max(produced - byte_skip, 0)}"
        )
    if produced > want:
        raise FileFormatError(
            f"{path}: the {encoding} data hold more than the {nbytes} bytes {describe} need: "
            "'sizes' and the data do not match"
        )
    return np.frombuffer(out, dtype=dtype).reshape(sizes[::-1])


def _open(path) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    return path


def _space_directions(header, n_axes: int) -> np.ndarray | None:
    """``space directions`` as a ``(n_axes, space_dim)`` float array (NaN rows for ``none``)."""
    if "space directions" not in header:
        return None
    value = header["space directions"]
    if isinstance(value, np.ndarray):
        rows = value.astype(np.float64)
    else:  # pynrrd configured with SPACE_DIRECTIONS_TYPE = "double vector list"
        dim = max((len(v) for v in value if v is not None), default=0)
        rows = np.array([np.full(dim, np.nan) if v is None else np.asarray(v, float) for v in value])
    if rows.ndim != 2 or rows.shape[0] != n_axes:
        raise FileFormatError(f"'space directions' has {rows.shape[0]} entries, expected {n_axes}")
    return rows


def _space_flip(header, path: Path) -> np.ndarray:
    space = str(header.get("space", "")).strip().lower()
    if not space:
        return np.ones(3)
    if space not in _SPACE_TO_LPS:
        raise FileFormatError(
            f"{path}: 'space' {shown(header['space'])} is not supported; expected left-posterior-superior,"
            " right-anterior-superior, left-anterior-superior or 3D-right-handed"
        )
    return np.asarray(_SPACE_TO_LPS[space])


def _key_values(header) -> dict[str, str]:
    """Header entries that are not standard NRRD fields (the ``key:=value`` pairs)."""
    return {k: str(v) for k, v in header.items() if k not in _NRRD_FIELDS}


# ------------------------------------------------------------------------------------------------
# sequences: reading


def read_sequence_nrrd(path) -> TrackedSequence:
    """Read a PLUS ``.igs.nrrd`` or Slicer ``.seq.nrrd`` tracked sequence.

    Parameters
    ----------
    path : str or Path
        ``.nrrd`` (or ``.nhdr`` with detached data). The layout is found from ``kinds``.

    Returns
    -------
    TrackedSequence
        ``frames`` ``(n_frames, n_rows, n_cols[, n_channels])`` uint8 or float32 in MF (flipped
        according to ``ultrasound image orientation``; other integer/float types are converted
        to float32), timestamps in s, per-frame transforms with validity, ``image_ok``.

    Raises
    ------
    FileFormatError
        Missing file, bad header, unexpected ``dimension``/``kinds``, non-2D frames, a bad
        per-frame value, truncated or corrupt data. The message names the file and the field.
    SequenceError
        The file holds no frames.
    """
    path = _open(path)
    with open(path, "rb") as fh:
        header = _read_header(path, fh)
        layout = _sequence_layout(header, path)
        if layout["n_frames"] == 0:
            raise SequenceError(
                f"{path}: 'sizes' {shown(header['sizes'], quote=False)}: the sequence holds no frames"
            )
        data = _read_data(path, fh, header)

    frames, source_type = _frames_from_data(data, layout, path)
    key_values = _key_values(header)
    orientation = key_values.pop(_ORIENTATION_KEY, "MF")
    frames = np.ascontiguousarray(to_mf(frames, normalize_orientation(orientation, source=str(path))))

    n = frames.shape[0]
    per_frame, other = _split_frame_keys(key_values, n, path)
    slicer_keys = {k: other.pop(k) for k in list(other) if _AXIS_KEY_RE.match(k) or k == _DATA_NODE_KEY}
    transforms, timestamps, image_ok, frame_fields = _parse_frame_fields(per_frame, n, path)
    if not image_ok.all():  # a frame without an image carries zeros (the data model's rule)
        if not frames.flags.writeable:
            frames = frames.copy()
        frames[~image_ok] = 0

    metadata = {}
    for key, value in other.items():
        if key not in _SOURCE_META:  # describe the file read; ours are set below
            metadata[_IMAGE_TYPE_META if key == _IMAGE_TYPE_KEY else key] = value
    metadata["SourceOrientation"] = orientation
    if source_type is not None:
        metadata["SourceElementType"] = source_type

    if timestamps is None:
        timestamps, index_texts = _index_values(slicer_keys, layout["frame_axis"], n, path)
        if index_texts is not None:
            frame_fields.setdefault("IndexValue", index_texts)
    if timestamps is None:
        timestamps = np.arange(n, dtype=np.float64)

    pixel_spacing, ijk_to_ras = _frame_geometry(header, layout, path)
    if ijk_to_ras is not None:
        metadata[_IJK_TO_RAS_META] = _format_matrix(ijk_to_ras)

    seq = TrackedSequence(
        frames=frames,
        timestamps_s=timestamps,
        transforms=transforms,
        image_ok=image_ok,
        pixel_spacing_mm=pixel_spacing,
        frame_fields=frame_fields,
        metadata=metadata,
    )
    logger.info("read %s: %s", path, seq)
    return seq


def _sequence_layout(header, path: Path) -> dict:
    """Find the frame, spatial and channel axes; raise on anything else."""
    dim = int(header["dimension"])
    sizes = [int(s) for s in np.asarray(header["sizes"]).reshape(-1)]
    if dim not in (3, 4, 5):
        raise FileFormatError(
            f"{path}: 'dimension' is {dim}; a NRRD sequence has 3 (PLUS: i j frame), 4 (Slicer: i j k "
            "frame) or one more with a leading channel axis"
        )
    if "kinds" not in header:
        raise FileFormatError(
            f"{path}: 'kinds' is missing; cannot tell the frame axis (expected e.g. 'domain domain list')"
        )
    kinds = [str(k).lower() for k in header["kinds"]]
    frame_axes = [a for a, k in enumerate(kinds) if k in _FRAME_KINDS]
    domain_axes = [a for a, k in enumerate(kinds) if k in _DOMAIN_KINDS]
    other_axes = [a for a, k in enumerate(kinds) if a not in frame_axes and a not in domain_axes]
    expected = "'domain domain list', 'domain domain domain list' or 'list domain domain domain'"
    if len(frame_axes) != 1:
        raise FileFormatError(
            f"{path}: 'kinds' {' '.join(header['kinds'])}: expected exactly one 'list' (or 'time') frame "
            f"axis, as in {expected}"
        )
    if len(domain_axes) not in (2, 3):
        raise FileFormatError(
            f"{path}: 'kinds' {' '.join(header['kinds'])}: expected 2 or 3 spatial ('domain') axes, as in "
            f"{expected}"
        )
    if len(other_axes) > 1 or (other_axes and other_axes[0] != 0):
        raise FileFormatError(
            f"{path}: 'kinds' {' '.join(header['kinds'])}: only the first axis may be a channel axis "
            "(e.g. 'vector')"
        )
    if len(domain_axes) == 3 and sizes[domain_axes[2]] != 1:
        raise FileFormatError(
            f"{path}: 'sizes' {sizes}: frames must be 2D slices (size 1 along the third spatial axis), "
            f"got {sizes[domain_axes[2]]}"
        )
    return {
        "frame_axis": frame_axes[0],
        "domain_axes": domain_axes,
        "channel_axis": other_axes[0] if other_axes else None,
        "n_frames": sizes[frame_axes[0]],
        "sizes": sizes,
        "type": header["type"],
    }


def _frames_from_data(data_c: np.ndarray, layout: dict, path: Path):
    """``(frames (N, H, W[, C]) uint8/float32, the NRRD type if converted else None)``."""
    header_type = layout["type"]
    data = data_c.T  # axes in NRRD order (i fastest)
    i_ax, j_ax = layout["domain_axes"][:2]
    order = [layout["frame_axis"], j_ax, i_ax] + layout["domain_axes"][2:]
    if layout["channel_axis"] is not None:
        order.append(layout["channel_axis"])
    frames = data.transpose(order)
    if len(layout["domain_axes"]) == 3:
        frames = frames[:, :, :, 0]
    if frames.ndim == 4 and frames.shape[3] == 1:
        frames = frames[..., 0]
    if frames.dtype != np.uint8 and frames.dtype != np.float32:
        lossy = (frames.dtype.itemsize > 2 and frames.dtype.kind in "iu") or frames.dtype.itemsize > 4
        if frames.dtype.kind not in "iuf":
            raise FileFormatError(f"{path}: 'type' {frames.dtype} cannot hold ultrasound frames")
        (logger.warning if lossy else logger.info)(
            "%s: converting %s frames to float32%s",
            path,
            frames.dtype,
            " (may lose precision)" if lossy else "",
        )
        return np.ascontiguousarray(frames, dtype=np.float32), str(header_type)
    return np.ascontiguousarray(frames), None


def _split_frame_keys(key_values: dict[str, str], n: int, path: Path):
    found: dict[str, dict[int, str]] = {}
    other: dict[str, str] = {}
    for key, value in key_values.items():
        match = _FRAME_KEY_RE.match(key)
        if not match:
            other[key] = value
            continue
        index, name = int(match.group(1)), match.group(2)
        if index >= n:
            raise FileFormatError(
                f"{path}: {shown(key)} refers to frame {index} but the data holds {n} frames"
            )
        values = found.setdefault(name, {})
        if index in values:
            raise FileFormatError(f"{path}: frame {index} has field {shown(name)} twice")
        values[index] = value.strip()
    check_memory(
        len(found) * n * (8 + 16 * 8 + 1), path, f"the per-frame fields of {n} frames"
    )
    per_frame: dict[str, list[str | None]] = {}
    for name, values in found.items():
        column = per_frame[name] = [None] * n
        for index, value in values.items():
            column[index] = value
    return per_frame, other


def _parse_frame_fields(per_frame: dict[str, list], n: int, path: Path):
    """Split PLUS per-frame fields into transforms, timestamps, image status and other fields."""
    transforms = {}
    used = set()
    for name in per_frame:
        if not name.endswith("Transform"):
            continue
        try:
            split_transform_name(name)
        except FreehandUSError:
            logger.debug(
                "%s: per-frame field %s is not a <From>To<To> transform; kept as text", path, name
            )
            continue
        values = per_frame[name]
        status = per_frame.get(name + "Status", [None] * n)
        matrices = np.tile(np.eye(4), (n, 1, 1))
        valid = np.zeros(n, dtype=bool)
        for i, text in enumerate(values):
            if text is None:
                continue
            matrices[i] = _parse_matrix(text, f"Seq_Frame{i:04d}_{name}", path)
            valid[i] = status[i] is None or status[i].strip().upper() == "OK"
        transforms[name[: -len("Transform")]] = (matrices, valid)
        used.update((name, name + "Status"))
    for name in per_frame:
        if name not in used and name.endswith("TransformStatus") and _is_transform_field(name):
            logger.debug("%s: %s has no matching transform; dropped", path, name)
            used.add(name)

    timestamps = None
    if "Timestamp" in per_frame:
        values = per_frame["Timestamp"]
        missing = [i for i, v in enumerate(values) if v is None]
        if missing:
            raise FileFormatError(
                f"{path}: 'Timestamp' is missing for frame(s) {missing[:10]} (it is given for other frames)"
            )
        timestamps = np.array(
            [_parse_float(v, f"Seq_Frame{i:04d}_Timestamp", path) for i, v in enumerate(values)]
        )
        used.add("Timestamp")

    image_ok = np.ones(n, dtype=bool)
    for status_name in _IMAGE_STATUS_FIELDS:
        if status_name in per_frame:
            for i, v in enumerate(per_frame[status_name]):
                if v is not None and v.strip().upper() != "OK":
                    image_ok[i] = False
            used.add(status_name)

    frame_fields = {
        name: [("" if v is None else v) for v in values]
        for name, values in per_frame.items()
        if name not in used
    }
    return transforms, timestamps, image_ok, frame_fields


def _parse_matrix(text: str, key: str, path: Path) -> np.ndarray:
    try:
        values = [float(v) for v in text.split()]
    except ValueError:
        values = []
    if len(values) != 16:
        raise FileFormatError(
            f"{path}: {shown(key)} must hold 16 numbers (a 4x4 matrix, row major), got {shown(text)}"
        )
    return np.array(values, dtype=np.float64).reshape(4, 4)


def _parse_float(text: str, key: str, path: Path) -> float:
    try:
        return float(text)
    except ValueError:
        raise FileFormatError(f"{path}: {shown(key)} must be a number, got {shown(text)}") from None


def _index_values(slicer_keys: dict[str, str], frame_axis: int, n: int, path: Path):
    """Timestamps (or, for text indices, the texts) from Slicer's ``axis N index values``."""
    for axis in dict.fromkeys((frame_axis, 3, 0)):
        key = f"axis {axis} index values"
        if key in slicer_keys:
            break
    else:
        return None, None
    texts = [unquote(v) for v in slicer_keys[key].split()]
    if len(texts) != n:
        raise FileFormatError(f"{path}: {shown(key)} has {len(texts)} values, expected {n} (one per frame)")
    try:
        return np.array([float(t) for t in texts], dtype=np.float64), None
    except ValueError:
        logger.warning("%s: %r is not numeric; timestamps are frame indices", path, key)
        return None, texts


def _frame_geometry(header, layout: dict, path: Path):
    """``(pixel_spacing_mm or None, IJKToRAS or None)`` from the spatial axes."""
    try:
        rows = _space_directions(header, len(layout["sizes"]))
    except FileFormatError as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    domain = layout["domain_axes"]
    if rows is not None:
        dirs = rows[domain]
        if not np.all(np.isfinite(dirs)):
            raise FileFormatError(
                f"{path}: 'space directions' of a spatial axis is 'none' or not finite"
            )
        spacing = np.linalg.norm(dirs, axis=1)
    elif "spacings" in header:
        spacing = np.asarray(header["spacings"], dtype=np.float64)[domain]
        dirs = None
    else:
        spacing, dirs = np.ones(len(domain)), None
    if not np.all(np.isfinite(spacing[:2])) or np.any(spacing[:2] <= 0):
        raise FileFormatError(f"{path}: 'space directions' give a pixel spacing of {spacing[:2]} mm")
    pixel_spacing = None if np.all(spacing[:2] == 1.0) else (float(spacing[0]), float(spacing[1]))

    ijk_to_ras = None
    if dirs is not None and len(domain) == 3 and dirs.shape[1] == 3:
        m = np.eye(4)
        m[:3, :3] = dirs.T
        origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64).reshape(-1)
        if origin.shape != (3,) or not np.all(np.isfinite(origin)):
            raise FileFormatError(f"{path}: 'space origin' must be 3 finite numbers, got {origin}")
        m[:3, 3] = origin
        flip = _space_flip(header, path)
        ijk_to_ras = _LPS_TO_RAS @ (np.diag(np.append(flip, 1.0)) @ m)
    return pixel_spacing, ijk_to_ras


# ------------------------------------------------------------------------------------------------
# sequences: writing


def write_sequence_nrrd(
    seq: TrackedSequence, path, *, flavor: str | None = None, compress: bool = True
) -> Path:
    """Write a tracked sequence as a PLUS or Slicer NRRD sequence.

    Parameters
    ----------
    seq : TrackedSequence
        Frames ``(n, rows, cols[, channels])`` uint8/float32 in MF, written as MF (blank where
        ``image_ok`` is False, as PLUS writes them; the readers return zeros there).
    path : str or Path
        Output file; ``.nhdr`` writes a detached header plus a data file.
    flavor : {"plus", "slicer"}, optional
        ``"plus"`` (default unless the name ends in ``.seq.nrrd``/``.seq.nhdr``): the layout PLUS
        writes, ``sizes: [C] W H N``. ``"slicer"``: a volume sequence Slicer's Sequences module
        loads (``sizes: [C] W H 1 N``, ``kinds: [vector] domain domain domain list``, ``axis 3
        index values`` = timestamps, ``space: left-posterior-superior``, per-frame pixel spacing
        from ``seq.pixel_spacing_mm`` or 1 mm, or the geometry in ``metadata["IJKToRAS"]``), plus
        the PLUS per-frame key/values so transforms survive a round trip.
    compress : bool
        gzip the data (level 4), else ``raw``.

    Returns
    -------
    Path
        The file written (the header for ``.nhdr``).

    Raises
    ------
    SequenceError
        Empty sequence, or a metadata/frame-field name or value that cannot be stored in a NRRD
        header (newline, non-ASCII, ``:`` in a name, a name reserved for NRRD/PLUS/Slicer fields).
    FileFormatError
        The file cannot be written.
    """
    path = Path(path)
    if not isinstance(seq, TrackedSequence):
        raise TypeError(f"seq must be a TrackedSequence, got {type(seq).__name__}")
    name = path.name.lower()
    if flavor is None:
        flavor = "slicer" if name.endswith((".seq.nrrd", ".seq.nhdr")) else "plus"
    if flavor not in ("plus", "slicer"):
        raise ValueError(f"flavor must be 'plus' or 'slicer', got {flavor!r}")
    if seq.n_frames == 0:
        raise SequenceError(f"{path}: cannot write an empty sequence (0 frames)")

    multichannel = seq.frames.ndim == 4
    spacing = seq.pixel_spacing_mm or (1.0, 1.0)
    frames = seq.frames
    if not seq.image_ok.all():  # frames without an image are written blank, as PLUS does
        frames = frames.copy()
        frames[~seq.image_ok] = 0
    header: dict = {"encoding": "gzip" if compress else "raw"}
    if flavor == "plus":
        data = frames
        header["kinds"] = ["domain", "domain", "list"]
        header["space dimension"] = 2
        dirs = [[spacing[0], 0.0], [0.0, spacing[1]], [np.nan, np.nan]]
        header["space directions"] = np.array(([[np.nan, np.nan]] if multichannel else []) + dirs)
        header["space origin"] = np.zeros(2)
    else:
        data = frames[:, None]  # (N, 1, H, W[, C]): sizes [C] W H 1 N
        ijk_to_ras = _slicer_geometry(seq, spacing, path)
        ijk_to_lps = _LPS_TO_RAS @ ijk_to_ras
        header["space"] = "left-posterior-superior"
        header["kinds"] = ["domain", "domain", "domain", "list"]
        dirs = [list(ijk_to_lps[:3, a]) for a in range(3)] + [[np.nan] * 3]
        header["space directions"] = np.array(([[np.nan] * 3] if multichannel else []) + dirs)
        header["labels"] = ([""] if multichannel else []) + ["", "", "", "time"]
        header["units"] = ([""] if multichannel else []) + ["", "", "", "s"]
        header["space origin"] = ijk_to_lps[:3, 3].copy()
    if multichannel:
        header["kinds"] = ["vector"] + header["kinds"]

    key_values = {}
    if flavor == "slicer":
        key_values[_DATA_NODE_KEY] = (
            "vtkMRMLVectorVolumeNode" if multichannel else "vtkMRMLScalarVolumeNode"
        )
        key_values["axis 3 index type"] = "numeric"
        key_values["axis 3 index values"] = " ".join(
            quote(repr(float(t)), safe="") for t in seq.timestamps_s
        )
    key_values[_ORIENTATION_KEY] = "MF"
    for key, value in seq.metadata.items():
        if key in _SOURCE_META or (flavor == "slicer" and key == _IJK_TO_RAS_META):
            continue  # describes a file read earlier / written as the geometry itself
        file_key = _IMAGE_TYPE_KEY if key == _IMAGE_TYPE_META else key
        reserved = (
            file_key in key_values
            or key == _IMAGE_TYPE_KEY
            or file_key in _NRRD_FIELDS
            or _FRAME_KEY_RE.match(file_key)
            or _AXIS_KEY_RE.match(file_key)
        )
        if reserved:
            raise SequenceError(f"{path}: metadata key {key!r} is reserved for a NRRD/PLUS/Slicer field")
        key_values[file_key] = _header_text(file_key, value, "metadata", path)
    key_values.update(_frame_key_values(seq, path))
    header.update(key_values)

    _write_nrrd(path, data, header, compress)
    logger.info("wrote %s (%s flavor): %s", path, flavor, seq)
    return path


def _slicer_geometry(seq: TrackedSequence, spacing, path: Path) -> np.ndarray:
    """IJKToRAS for the Slicer flavor: ``metadata["IJKToRAS"]`` if given, else LPS-identity."""
    default = _LPS_TO_RAS @ np.diag([spacing[0], spacing[1], 1.0, 1.0])
    text = seq.metadata.get(_IJK_TO_RAS_META)
    if text is None:
        return default
    try:
        m = np.array([float(v) for v in text.split()], dtype=np.float64).reshape(4, 4)
    except ValueError:
        raise SequenceError(f"{path}: metadata 'IJKToRAS' must hold 16 numbers, got {text!r}") from None
    norms = np.linalg.norm(m[:3, :3], axis=0)
    if not np.all(np.isfinite(m)) or np.any(norms == 0) or abs(np.linalg.det(m[:3, :3])) < 1e-12:
        raise SequenceError(f"{path}: metadata 'IJKToRAS' is not an invertible geometry: {text!r}")
    if seq.pixel_spacing_mm is not None and not np.allclose(norms[:2], spacing, rtol=1e-9, atol=0):
        logger.warning(
            "%s: metadata IJKToRAS spacing %s differs from pixel_spacing_mm %s; using pixel_spacing_mm",
            path,
            norms[:2],
            spacing,
        )
        m[:3, 0] *= spacing[0] / norms[0]
        m[:3, 1] *= spacing[1] / norms[1]
    return m


def _frame_key_values(seq: TrackedSequence, path: Path) -> dict[str, str]:
    """``Seq_FrameNNNN_<Field>`` key/values in PLUS order (transforms, fields, timestamp, status)."""
    fields = {}
    for name, values in seq.frame_fields.items():
        if name in ("Timestamp",) + _IMAGE_STATUS_FIELDS or _is_transform_field(name):
            raise SequenceError(
                f"{path}: frame field {name!r} would be read back as a timestamp, image status or transform"
            )
        fields[name] = [
            _header_text(f"Seq_Frame0000_{name}", v, f"frame field {name!r}", path) for v in values
        ]
    texts = {
        name: ([_format_matrix(m) for m in ft.matrices], ["OK" if v else "INVALID" for v in ft.valid])
        for name, ft in seq.transforms.items()
    }
    out = {}
    for i in range(seq.n_frames):
        prefix = f"Seq_Frame{i:04d}_"
        for name, (mats, status) in texts.items():
            out[f"{prefix}{name}Transform"] = mats[i]
            out[f"{prefix}{name}TransformStatus"] = status[i]
        for name, values in fields.items():
            out[prefix + name] = values[i]
        out[prefix + "Timestamp"] = repr(float(seq.timestamps_s[i]))
        out[prefix + _WRITTEN_IMAGE_STATUS] = "OK" if seq.image_ok[i] else "INVALID"
    return out


def _is_transform_field(name: str) -> bool:
    """True for ``<From>To<To>Transform`` and ``<From>To<To>TransformStatus`` field names."""
    if name.endswith("TransformStatus"):
        name = name[: -len("Status")]
    if not name.endswith("Transform"):
        return False
    try:
        split_transform_name(name)
    except FreehandUSError:
        return False
    return True


def _header_text(key: str, value, what: str, path: Path) -> str:
    """``value`` as a one-line ASCII header value (edge spaces dropped, as readers drop them)."""
    value = str(value)
    if not key or ":" in key or "\n" in key or "\r" in key or key.startswith("#") or key != key.strip():
        raise SequenceError(
            f"{path}: {what} name {key!r} cannot be a NRRD key (no ':', newline, '#' or edge spaces)"
        )
    if "\n" in value or "\r" in value:
        raise SequenceError(f"{path}: {what} {key!r} holds a newline; NRRD header values are one line")
    if not (key + value).isascii():
        raise SequenceError(f"{path}: {what} {key!r} is not ASCII; NRRD headers are ASCII")
    return value.strip()


def _format_matrix(m: np.ndarray) -> str:
    return " ".join(repr(float(v) + 0.0) for v in np.asarray(m, dtype=np.float64).ravel())


def _write_nrrd(path: Path, data: np.ndarray, header: dict, compress: bool) -> None:
    try:
        nrrd.write(
            str(path),
            np.ascontiguousarray(data),
            header,
            index_order="C",
            compression_level=_COMPRESSION_LEVEL if compress else 1,
        )
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot write: {exc}") from exc


# ------------------------------------------------------------------------------------------------
# volumes


def read_volume_nrrd(path) -> Volume:
    """Read a 3D scalar or multi-channel NRRD volume.

    Parameters
    ----------
    path : str or Path
        ``.nrrd`` / ``.nhdr``: ``dimension: 3`` (``kinds`` domain x3 or absent), or 4 with a leading
        non-spatial channel axis (``vector``, ``RGB-color``...).

    Returns
    -------
    Volume
        ``voxels`` ``[k, j, i]`` or ``[k, j, i, c]`` in the file's type (native byte order),
        spacing/origin/directions in LPS-convention mm (RAS/LAS files are converted, see the
        module docstring), other key/value pairs as ``metadata``.

    Raises
    ------
    FileFormatError
        Missing file, wrong ``dimension``/``kinds``/``space``/``space directions``, truncated or
        corrupt data.
    """
    path = _open(path)
    with open(path, "rb") as fh:
        header = _read_header(path, fh)
        dim = int(header["dimension"])
        kinds = [str(k).lower() for k in header.get("kinds", ["domain"] * dim)]
        if dim not in (3, 4):
            raise FileFormatError(
                f"{path}: 'dimension' is {dim}; a volume has 3 (i j k) or 4 (channel i j k) axes"
            )
        domain = [a for a, k in enumerate(kinds) if k in _DOMAIN_KINDS]
        if domain != [dim - 3, dim - 2, dim - 1] or (dim == 4 and kinds[0] in _FRAME_KINDS):
            raise FileFormatError(
                f"{path}: 'kinds' {' '.join(header.get('kinds', []))}: expected 'domain domain domain' or a "
                "channel axis followed by three domain axes (a 'list'/'time' axis means a sequence)"
            )
        data = _read_data(path, fh, header)

    voxels = data  # C order: [k, j, i] or [k, j, i, c]
    if not voxels.dtype.isnative:
        voxels = voxels.astype(voxels.dtype.newbyteorder("="))
    try:
        rows = _space_directions(header, dim)
    except FileFormatError as exc:
        raise FileFormatError(f"{path}: {exc}") from None
    if rows is not None:
        if rows.shape[1] != 3:
            raise FileFormatError(f"{path}: 'space directions' must be 3D vectors, got {rows.shape[1]}D")
        axes = rows[domain].T  # columns i, j, k
        if not np.all(np.isfinite(axes)):
            raise FileFormatError(
                f"{path}: 'space directions' of a spatial axis is 'none' or not finite"
            )
    elif "spacings" in header:
        axes = np.diag(np.asarray(header["spacings"], dtype=np.float64)[domain])
    else:
        axes = np.eye(3)
    spacing = np.linalg.norm(axes, axis=0)
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise FileFormatError(
            f"{path}: 'space directions' give voxel spacing {spacing} mm; expected > 0"
        )
    origin = np.asarray(header.get("space origin", np.zeros(3)), dtype=np.float64).reshape(-1)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
        raise FileFormatError(f"{path}: 'space origin' must be 3 finite numbers, got {origin}")
    flip = _space_flip(header, path)
    volume = Volume(
        voxels=np.ascontiguousarray(voxels),
        spacing_mm=tuple(spacing),
        origin_mm=tuple(flip * origin + 0.0),
        directions=flip[:, None] * (axes / spacing) + 0.0,
        metadata=_key_values(header),
    )
    logger.info("read %s: %s", path, volume)
    return volume


def write_volume_nrrd(volume: Volume, path, *, compress: bool = True) -> Path:
    """Write a :class:`~FreehandUSLib.volume.Volume` as NRRD with ``space: left-posterior-superior``.

    Parameters
    ----------
    volume : Volume
        ``voxels`` ``[k, j, i]`` or ``[k, j, i, c]`` (bool is written as uint8).
    path : str or Path
        ``.nrrd`` (or ``.nhdr`` + detached data).
    compress : bool
        gzip (level 4) or raw.

    Returns
    -------
    Path

    Raises
    ------
    FreehandUSError
        Voxel type NRRD cannot hold, or metadata that cannot be a header key/value.
    FileFormatError
        The file cannot be written.
    """
    path = Path(path)
    if not isinstance(volume, Volume):
        raise TypeError(f"volume must be a Volume, got {type(volume).__name__}")
    voxels = volume.voxels
    if voxels.dtype == bool:
        voxels = voxels.astype(np.uint8)
    if (
        voxels.dtype.kind not in "iuf"
        or voxels.dtype.itemsize not in (1, 2, 4, 8)
        or voxels.dtype == np.float16
    ):
        raise FreehandUSError(f"{path}: volume voxels of type {voxels.dtype} cannot be stored in NRRD")
    multichannel = voxels.ndim == 4
    axes = volume.directions * np.asarray(volume.spacing_mm)[None, :]
    rows = [list(axes[:, a]) for a in range(3)]
    header = {
        "space": "left-posterior-superior",
        "kinds": (["vector"] if multichannel else []) + ["domain"] * 3,
        "space directions": np.array(([[np.nan] * 3] if multichannel else []) + rows),
        "space origin": np.asarray(volume.origin_mm, dtype=np.float64),
        "encoding": "gzip" if compress else "raw",
    }
    for key, value in volume.metadata.items():
        if key in _NRRD_FIELDS:
            raise FreehandUSError(f"{path}: metadata key {key!r} is a standard NRRD field name")
        try:
            header[key] = _header_text(key, value, "metadata", path)
        except SequenceError as exc:
            raise FreehandUSError(str(exc)) from None
    _write_nrrd(path, voxels, header, compress)
    logger.info("wrote %s: %s", path, volume)
    return path
