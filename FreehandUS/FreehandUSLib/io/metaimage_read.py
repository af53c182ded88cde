"""Reading PLUS sequence metafiles and MetaImage volumes, streamed slab by slab.

The pixel layout a header describes (``_Layout``), the raw and zlib data sources, the slab
reader, :func:`read_sequence_metafile` and :func:`read_volume_metafile`. The format and the
reading choices are described in :mod:`.metaimage`.
"""

from __future__ import annotations

import logging
import math
import os
import zlib
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, SequenceError, TransformError
from ..orientation import normalize_orientation
from ..sequence import FrameTransforms, TrackedSequence
from ..transforms import split_transform_name
from ..volume import Volume
from ._safety import MAX_INFLATE_RATIO, check_memory, data_file_beside, shown
from .metaimage_header import (
    _FRAME_KEY_RE,
    _FRAME_PREFIX,
    _IMAGE_STATUS_FIELDS,
    _MET_TYPES,
    _SEQUENCE_STRUCTURAL_KEYS,
    _TIMESTAMP,
    _VOLUME_STRUCTURAL_KEYS,
    read_metaimage_header,
)

try:  # ISA-L inflates the same zlib/gzip streams about 3x faster than zlib; zlib when absent
    from isal import isal_zlib as _inflate
except ImportError:  # pragma: no cover
    _inflate = zlib
_INFLATE_ERRORS = (zlib.error, _inflate.error)

__all__ = [
    "read_sequence_metafile",
    "read_volume_metafile",
]

# The format's one logger, named as before the reader and the writer were split.
logger = logging.getLogger(f"{__package__}.metaimage")

_CHUNK_BYTES = 1 << 20  # compressed bytes read at a time
_FIRST_ALLOCATION_BYTES = 64 << 20  # output allocated for compressed data before it grows, at least
# ... and up to this many times the compressed bytes: ultrasound frames deflate 2-10x, so a real
# recording is read into one allocation (growing an array fills its new part with zeros, which
# was a fifth of reading 1050 frames), while a header that promises more than its compressed
# data hold still costs at most this factor of the file before the data run out.
_FIRST_ALLOCATION_RATIO = 32
_MAX_CHANNELS = 1024  # ElementNumberOfChannels above this is not an image


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
        and header metadata as described in :mod:`.metaimage`.

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
        ``directions`` from ``TransformMatrix`` (see :mod:`.metaimage`); other header keys
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
