"""Writing PLUS sequence metafiles and MetaImage volumes, as PLUS writes them.

Header items in PLUS order, numbers as the shortest text that reads back exactly, pixel data
streamed (through ``zlib.compressobj`` when compressed) and written atomically:
:func:`write_sequence_metafile`, the frame-by-frame :class:`SequenceMetafileWriter` and
:func:`write_volume_metafile`. The format and the writing choices are described in
:mod:`.metaimage`.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, SequenceError
from ..sequence import TrackedSequence
from ..transforms import split_transform_name
from ..volume import Volume
from ._safety import shown
from .metaimage_header import (
    _FRAME_PREFIX,
    _IMAGE_STATUS_FIELDS,
    _NUMPY_TO_MET,
    _READER_KEYS,
    _SEQUENCE_STRUCTURAL_KEYS,
    _TIMESTAMP,
    _VOLUME_STRUCTURAL_KEYS,
    _check_key,
    _check_value,
)

__all__ = [
    "write_sequence_metafile",
    "SequenceMetafileWriter",
    "write_volume_metafile",
]

_SIZE_FIELD_WIDTH = 20  # reserved characters for the patched CompressedDataSize value
_DEFAULT_COMPRESSION_LEVEL = 6  # zlib's default, what PLUS uses


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
