"""Lossless recording of a live OpenIGTLink stream into a PLUS sequence file.

:class:`StreamRecorder` takes the messages a client receives (IMAGE, TRANSFORM, TDATA, POSITION),
pairs every image with the transforms at its timestamp (:class:`~.pairing.FramePairer`: exact
samples as PlusServer sends them, interpolation for independent trackers, zero timestamps,
restarted sources) and writes one tracked frame per image:

- **No frame is dropped**: a frame without a usable transform is written with that transform
  marked ``INVALID`` (identity matrix, as PLUS does).
- **Crash safety.** Frames go to disk through :class:`IncrementalSequenceFile` (PLUS ``.mhd``
  header + ``.raw`` pixels that only grow, each frame at a cost independent of the recording's
  length), so killing the process loses at most the frames in flight (the newest image waits
  for the next one, which closes its transforms); Ctrl-C closes the file cleanly.
- **Nothing is replaced**: an existing output (or an unfinished recording to it) is refused
  unless ``overwrite`` moves it to a backup folder first.
- **Gaps are counted**: frames absent from the stream (a stalled server, a lost connection,
  drops) are estimated from the image timestamps and reported in the summary and the file.

:func:`record_stream` connects a :class:`~.client.IGTLClient` and records for a duration or a
number of frames; the ``freehandus record`` command calls it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, FreehandUSError, SequenceError
from ..transforms import split_transform_name
from .pairing import FramePairer, PairedFrame
from .protocol import Message

__all__ = [
    "IncrementalSequenceFile",
    "RecordingExistsError",
    "RecordingStatus",
    "StreamRecorder",
    "RecordingSummary",
    "prepare_output",
    "recording_files",
    "record_stream",
]

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------
# Incremental file
# -------------------------------------------------------------------------------------------
_PAGE_BYTES = 4096  # the smallest page size: a write that stays inside one page is never torn
_MAX_LISTED = 64  # transforms written in every frame (more are written only where valid)
_FIELD_NAME_RE = re.compile(r"^[A-Za-z0-9_]+$")
_LAYOUT_KEYS = frozenset(
    {
        "ObjectType", "NDims", "AnatomicalOrientation", "BinaryData", "BinaryDataByteOrderMSB",
        "ElementByteOrderMSB", "CenterOfRotation", "CompressedData", "CompressedDataSize", "DimSize",
        "Kinds", "ElementNumberOfChannels", "ElementSpacing", "ElementSize", "ElementType", "HeaderSize",
        "Offset", "Position", "Origin", "TransformMatrix", "Rotation", "Orientation",
        "UltrasoundImageOrientation", "ElementDataFile", "SourceOrientation", "SourceElementType",
    }
)  # fmt: skip


class RecordingExistsError(FreehandUSError):
    """A recording would replace a file (the output, its data file, or an unfinished recording).

    Attributes
    ----------
    path : Path
        The file that exists.
    target : Path
        The output that was asked for.
    """

    def __init__(self, message: str, *, path, target):
        super().__init__(message)
        self.path = Path(path)
        self.target = Path(target)


def _working_mhd(path: Path) -> Path:
    """The ``.mhd`` a recording to ``path`` is written to while it runs."""
    name = path.name
    lower = name.lower()
    for suffix in (".nrrd", ".nhdr", ".mha", ".mhd", ".h5", ".hdf5"):
        if lower.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".mhd")
    return path.with_name(name + ".mhd")


def _raw_of(mhd: Path) -> Path:
    return mhd.with_name(mhd.name[: -len(".mhd")] + ".raw")


def recording_files(path) -> list[Path]:
    """Every file a recording to ``path`` writes or would replace: the output, its data file
    (``.mhd`` -> ``.raw``/``.zraw``), and the ``.mhd`` + ``.raw`` it is recorded into while it
    runs when the output is another format."""
    path = Path(path)
    files = [path]
    lower = path.name.lower()
    if lower.endswith(".mhd"):
        files += [_raw_of(path), path.with_name(path.name[: -len(".mhd")] + ".zraw")]
    elif lower.endswith(".nhdr"):
        stem = path.name[: -len(".nhdr")]
        files += [path.with_name(stem + ".raw"), path.with_name(stem + ".raw.gz")]
    working = _working_mhd(path)
    if working != path:
        files += [working, _raw_of(working)]
    return files


def prepare_output(path, *, overwrite: bool = False) -> Path | None:
    """Make sure a recording to ``path`` replaces nothing.

    Parameters
    ----------
    path : str or Path
        The output sequence file.
    overwrite : bool
        False: raise :class:`RecordingExistsError` when any of :func:`recording_files` exists.
        True: move those files, unchanged and with their names (so a ``.mhd`` still finds its
        ``.raw``), into a new folder ``<name>.backup-<YYYYmmdd-HHMMSS>`` beside ``path``.

    Returns
    -------
    Path or None
        The backup folder, None when nothing existed.
    """
    path = Path(path)
    existing = [p for p in recording_files(path) if os.path.lexists(p)]
    if not existing:
        return None
    first = existing[0]
    if not overwrite:
        if first == path:
            message = f"{path} exists; a recording never replaces a file"
        elif first.suffix.lower() == ".mhd" and first != path:
            message = (
                f"{first} exists: an unfinished recording to {path.name} (it loads as it is); "
                f"a recording never replaces a file"
            )
        else:
            message = f"{first} exists and would be replaced by a recording to {path.name}"
        raise RecordingExistsError(message, path=first, target=path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    backup = path.with_name(f"{path.name}.backup-{stamp}")
    k = 1
    while os.path.lexists(backup):
        k += 1
        backup = path.with_name(f"{path.name}.backup-{stamp}-{k}")
    backup.mkdir(parents=True)
    for p in existing:
        os.rename(p, backup / p.name)
    logger.warning("moved the existing %s to %s", ", ".join(p.name for p in existing), backup)
    return backup


def _num(x: float) -> str:
    """Shortest text that reads back as exactly ``x``."""
    x = float(x)
    if x.is_integer() and abs(x) < 2.0**53:
        return str(int(x))
    return repr(x)


def _pwrite_all(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class IncrementalSequenceFile:
    """A PLUS sequence file written frame by frame, valid on disk after every frame.

    The frames go to a PLUS ``.mhd`` header + ``.raw`` pixels that only grow: each frame appends
    its pixels to the ``.raw`` and its header lines just before the header's last two lines
    (``DimSize``, ``ElementDataFile``), which are written anew after them; the old two lines are
    then blanked with one write inside a single disk page (which a kill cannot tear). So the cost
    of a frame does not grow with the recording's length or its number of transform names, and
    a process killed at any moment leaves a file that loads with every frame but the one in
    flight. :meth:`close` rewrites the header once without the blank lines (``DimSize`` in its
    usual place).

    A transform listed in ``transform_names``, or among the first 64 names that occur, is
    written in every frame from then on (identity, INVALID when the frame lacks it), as PLUS
    writes them; any other only in the frames where it is valid (a frame without it reads as
    INVALID), so a stream with thousands of names stays cheap.

    When ``path`` is not a ``.mhd`` (``.igs.mha``, ``.igs.nrrd``...), the frames are recorded
    into the ``.mhd`` beside it and converted when :meth:`close` is called (the ``.mhd``/``.raw``
    are then removed); after a crash that ``.mhd`` is the recording.

    Nothing is ever replaced: every file is created exclusively, and an existing output, data
    file or unfinished recording raises :class:`RecordingExistsError` unless ``overwrite`` moves
    it to a backup folder first (:func:`prepare_output`).

    Parameters
    ----------
    path : str or Path
    frame_shape : (n_rows, n_cols)
    dtype : numpy dtype
        uint8 is kept; any other type is stored as float32.
    n_channels : int
    transform_names : list of str
        Written in every frame.
    pixel_spacing_mm : (sx, sy), optional
    metadata : dict, optional
        Extra header fields.
    overwrite : bool
        Move existing files to a backup folder (:attr:`backup`) instead of refusing.
    """

    def __init__(
        self,
        path,
        *,
        frame_shape,
        dtype,
        n_channels: int = 1,
        transform_names=(),
        pixel_spacing_mm=None,
        metadata=None,
        overwrite: bool = False,
    ):
        from ..io import sequence_format

        self.path = Path(path)
        sequence_format(self.path)  # raises FileFormatError for an unknown extension
        self.working_path = self.path if self.path.name.lower().endswith(".mhd") else _working_mhd(self.path)
        self.data_path = _raw_of(self.working_path)
        self.dtype = np.dtype(np.uint8) if np.dtype(dtype) == np.uint8 else np.dtype(np.float32)
        self._little = self.dtype.newbyteorder("<")
        rows, cols = (int(v) for v in frame_shape)
        n_channels = int(n_channels)
        if rows < 1 or cols < 1 or n_channels < 1:
            raise SequenceError(f"{self.path}: frame shape {tuple(frame_shape)} x {n_channels} channel(s) is empty")
        self.frame_shape = (rows, cols) + ((n_channels,) if n_channels > 1 else ())
        self._dims = f"{cols} {rows}"
        self.transform_names = []
        self._bases: dict[str, str] = {}  # name as given -> checked name without "Transform"
        for name in transform_names:
            name = self._check_name(name)
            if name not in self.transform_names:
                self.transform_names.append(name)
        self._listed = set(self.transform_names)
        spacing = "1 1 1" if pixel_spacing_mm is None else " ".join(_num(v) for v in pixel_spacing_mm) + " 1"
        self._layout = [
            ("ObjectType", "Image"),
            ("NDims", "3"),
            ("AnatomicalOrientation", "RAI"),
            ("BinaryData", "True"),
            ("BinaryDataByteOrderMSB", "False"),
            ("CenterOfRotation", "0 0 0"),
            ("CompressedData", "False"),
        ]
        self._geometry = [
            ("Kinds", "domain domain list"),
            ("ElementNumberOfChannels", str(n_channels)),
            ("ElementSpacing", spacing),
            ("ElementType", "MET_UCHAR" if self.dtype == np.uint8 else "MET_FLOAT"),
            ("Offset", "0 0 0"),
            ("TransformMatrix", "1 0 0 0 1 0 0 0 1"),
            ("UltrasoundImageOrientation", "MF"),
        ]
        self.metadata = self._check_metadata(metadata)
        self.backup = prepare_output(self.path, overwrite=overwrite)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._data = open(self.data_path, "xb")
        except FileExistsError as exc:
            raise RecordingExistsError(
                f"{self.data_path} appeared while the recording started; a recording never replaces a file",
                path=self.data_path, target=self.path,
            ) from exc  # fmt: skip
        try:
            self._fd = os.open(self.working_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError as exc:
            self._data.close()
            os.remove(self.data_path)
            raise RecordingExistsError(
                f"{self.working_path} appeared while the recording started; a recording never replaces a file",
                path=self.working_path, target=self.path,
            ) from exc  # fmt: skip
        head = "".join(f"{k} = {v}\n" for k, v in self._layout + self._geometry + list(self.metadata.items()))
        head = head.encode("utf-8")
        _pwrite_all(self._fd, head, 0)
        self._body_at = len(head)
        self._tail_at = len(head)
        self._tail_len = 0
        self._end = len(head)
        self._n_frames = 0
        self._commit(b"")
        self._closed = False
        self._lock = threading.Lock()

    @property
    def n_frames(self) -> int:
        """Frames on disk."""
        return self._n_frames

    def _check_name(self, name: str) -> str:
        base = self._bases.get(name)
        if base is None:
            base = name[: -len("Transform")] if name.endswith("Transform") else name
            split_transform_name(base)
            if not _FIELD_NAME_RE.match(base):
                raise FileFormatError(f"transform name {base!r}: only letters, digits and _ can be written")
            self._bases[name] = base
        return base

    @staticmethod
    def _check_metadata(metadata) -> dict:
        out = {}
        for key, value in dict(metadata or {}).items():
            if key in _LAYOUT_KEYS:
                continue
            text = str(value)
            if not _FIELD_NAME_RE.match(str(key)) or key.startswith("Seq_Frame"):
                raise FileFormatError(f"metadata key {key!r}: expected letters, digits and _ (not Seq_Frame...)")
            if "\n" in text or "\r" in text:
                raise FileFormatError(f"metadata {key!r}: the value contains a line break")
            out[key] = text.strip()
        return out

    def _commit(self, lines: bytes) -> None:
        """Append ``lines`` (one frame) and make them part of the header (class docstring)."""
        tail = f"DimSize = {self._dims} {self._n_frames}\nElementDataFile = {self.data_path.name}\n".encode()
        at = self._end + len(lines)
        pad = b""
        if at // _PAGE_BYTES != (at + len(tail) - 1) // _PAGE_BYTES:
            pad = b" " * (_PAGE_BYTES - at % _PAGE_BYTES - 1) + b"\n"  # a blank line up to the next page
        _pwrite_all(self._fd, lines + pad + tail, self._end)  # after the old end: not read yet
        if self._tail_len:
            _pwrite_all(self._fd, b" " * (self._tail_len - 1) + b"\n", self._tail_at)  # the switch
        self._tail_at = self._end + len(lines) + len(pad)
        self._tail_len = len(tail)
        self._end = self._tail_at + self._tail_len

    def append(self, frame, timestamp_s: float, transforms=None, *, fields=None) -> None:
        """Write one frame.

        Parameters
        ----------
        frame : (n_rows, n_cols[, n_channels]) array, MF orientation
        timestamp_s : float
            Seconds.
        transforms : dict name -> (4x4 matrix, valid bool), optional
            A non-finite matrix is written as the identity, INVALID.
        fields : dict[str, str], optional
            Other per-frame fields (written only in this frame).
        """
        frame = np.asarray(frame)
        if frame.shape != self.frame_shape:
            raise SequenceError(f"{self.path}: frame has shape {frame.shape}, expected {self.frame_shape}")
        timestamp_s = float(timestamp_s)
        if not np.isfinite(timestamp_s):
            raise SequenceError(f"{self.path}: frame timestamp {timestamp_s} is not finite")
        given = {}
        listed = self._listed
        for name, (matrix, valid) in (transforms or {}).items():
            name = self._check_name(name)
            if not valid and name not in listed:
                continue  # left out: reads as INVALID
            matrix = np.asarray(matrix, dtype=np.float64)
            if matrix.shape != (4, 4):
                raise SequenceError(f"{self.path}: transform {name!r} has shape {matrix.shape}, expected (4, 4)")
            finite = bool(np.all(np.isfinite(matrix)))
            given[name] = (matrix if finite else np.eye(4), bool(valid) and finite)
        text = []
        with self._lock:
            if self._closed:
                raise SequenceError(f"{self.path}: append after close")
            prefix = f"Seq_Frame{self._n_frames:04d}_"
            for name, (_, ok) in given.items():
                if ok and name not in listed and len(listed) < _MAX_LISTED:
                    self.transform_names.append(name)  # written in every frame from now on
                    listed.add(name)
            names = self.transform_names + [n for n, (_, ok) in given.items() if ok and n not in listed]
            for name in names:
                matrix, valid = given.get(name, (None, False))
                numbers = "1 0 0 0 0 1 0 0 0 0 1 0 0 0 0 1" if matrix is None else " ".join(map(_num, matrix.ravel()))
                text.append(f"{prefix}{name}Transform = {numbers}\n")
                text.append(f"{prefix}{name}TransformStatus = {'OK' if valid else 'INVALID'}\n")
            for key, value in (fields or {}).items():
                value = str(value)
                if not _FIELD_NAME_RE.match(str(key)) or "\n" in value or "\r" in value:
                    raise SequenceError(f"{self.path}: frame field {key!r} = {value!r} cannot be written")
                text.append(f"{prefix}{key} = {value.strip()}\n")
            text.append(f"{prefix}Timestamp = {_num(timestamp_s)}\n{prefix}ImageStatus = OK\n")
            pixels = np.ascontiguousarray(frame, dtype=self._little)
            self._data.write(memoryview(pixels).cast("B"))
            self._data.flush()  # the pixels reach the kernel before the header names them
            self._n_frames += 1
            self._commit("".join(text).encode("utf-8"))

    def _compact(self, metadata: dict) -> None:
        """Rewrite the header without blank lines, with ``metadata`` added (atomic replace)."""
        items = self._layout + [("DimSize", f"{self._dims} {self._n_frames}")] + self._geometry
        items += list({**self.metadata, **metadata}.items())
        tmp = self.working_path.with_name(f".{self.working_path.name}.{os.getpid()}.part")
        try:
            with open(self.working_path, "rb") as src, open(tmp, "wb") as dst:
                dst.write("".join(f"{k} = {v}\n" for k, v in items).encode("utf-8"))
                src.seek(self._body_at)
                left = self._tail_at - self._body_at
                rest = b""
                while left > 0:
                    chunk = src.read(min(left, 1 << 20))
                    if not chunk:
                        break
                    left -= len(chunk)
                    rest += chunk
                    cut = rest.rfind(b"\n")
                    if cut >= 0:
                        dst.writelines(line + b"\n" for line in rest[:cut].split(b"\n") if line.strip())
                        rest = rest[cut + 1 :]
                dst.write(f"ElementDataFile = {self.data_path.name}\n".encode())
            os.replace(tmp, self.working_path)
        finally:
            if tmp.exists():
                tmp.unlink()

    def close(self, metadata=None) -> Path | None:
        """Finish the file (converting it when needed); returns the final path.

        ``metadata`` (dict) is added to the header. Returns None when no frame was written (the
        empty files are removed); the ``.mhd`` when converting failed (the recording stays there).
        """
        with self._lock:
            if self._closed:
                return self._final
            self._closed = True
            self._final = None
            self._data.close()
            os.close(self._fd)
        if self._n_frames == 0:
            for p in (self.working_path, self.data_path):
                with contextlib.suppress(OSError):
                    os.remove(p)
            logger.warning("no frames recorded; nothing written to %s", self.path)
            return None
        try:
            self._compact(self._check_metadata(metadata))
        except OSError as exc:  # e.g. a full disk: the appended header is valid as it is
            logger.error("could not compact the header of %s (%s); it stays as recorded", self.working_path, exc)
        self._final = self.working_path
        if self.working_path == self.path:
            return self.path
        from ..io import read_sequence, write_sequence

        detached = self.path.name.lower().endswith(".nhdr")
        tmp = self.path if detached else self.path.with_name(f".partial-{os.getpid()}-{self.path.name}")
        try:
            if os.path.lexists(self.path):
                raise RecordingExistsError(f"{self.path} appeared during the recording", path=self.path,
                                           target=self.path)  # fmt: skip
            write_sequence(read_sequence(self.working_path), tmp)
            if not detached:
                os.link(tmp, self.path)  # fails when the name was taken meanwhile: nothing replaced
        except (FreehandUSError, OSError) as exc:
            logger.error("could not write %s (%s); the recording stays in %s", self.path, exc, self.working_path)
            return self.working_path
        finally:
            if not detached and tmp.exists():
                tmp.unlink()
        for p in (self.working_path, self.data_path):
            with contextlib.suppress(OSError):
                os.remove(p)
        self._final = self.path
        return self.path


# -------------------------------------------------------------------------------------------
# Summary
# -------------------------------------------------------------------------------------------
_SHOWN_NAMES = 10  # transforms listed one per line in the text summary


@dataclass(frozen=True, eq=False)
class RecordingSummary:
    """What a recording wrote and how the stream behaved.

    Attributes
    ----------
    path : str
        The file written ("" when no image arrived).
    frames : int
        Frames written (every image received, none dropped by the recorder).
    transforms : dict[str, int]
        Frames in which each transform is valid.
    invalid_frames : dict[str, int]
        Frames in which each transform is INVALID.
    interpolated : int
        Transform values interpolated (not taken from a sample at the image's time).
    dropped : int
        Messages the client dropped because the recorder fell behind (0 for a lossless run).
    rejected : int
        Malformed/CRC/unknown messages the client skipped.
    rejected_images : int
        Images not written because their size or type changed mid-recording.
    zero_timestamps : int
        Messages that came without a timestamp (stamped with their arrival time).
    duration_s : float
        Span of the image timestamps.
    fps : float
        Frames per second over that span.
    latency_ms : dict
        ``median``, ``p95``, ``max`` of arrival time minus image timestamp (meaningful when the
        sender's clock is this machine's, e.g. the replay server); empty without timestamps or
        when the two clocks are more than a minute apart.
    disconnects : int
        Connections lost during the recording.
    missing_frames : int
        Frames absent from the recording whatever the cause (never sent during a server stall,
        lost with a connection, dropped by a server or by the client): estimated from the gaps
        in the image timestamps, each gap of ``k`` frame intervals counting ``k - 1`` frames.
    gaps : int
        Such gaps; ``largest_gap_s`` the longest (seconds of stream time).
    stopped : str
        Why the recording ended: ``"frames"``, ``"duration"``, ``"stopped"`` (signal or
        ``stop_event``), ``"server gone: ..."`` (no connection for ``reconnect_timeout_s``) or
        ``"closed"`` (the client gave up), ``"cannot write ..."`` (a full disk...); "" when the
        recorder was used directly.
    backup : str
        Folder the files that were in the way were moved to (``overwrite``), else "".
    """

    path: str
    frames: int
    transforms: dict = field(default_factory=dict)
    invalid_frames: dict = field(default_factory=dict)
    interpolated: int = 0
    dropped: int = 0
    rejected: int = 0
    rejected_images: int = 0
    zero_timestamps: int = 0
    duration_s: float = 0.0
    fps: float = 0.0
    latency_ms: dict = field(default_factory=dict)
    disconnects: int = 0
    missing_frames: int = 0
    gaps: int = 0
    largest_gap_s: float = 0.0
    stopped: str = ""
    backup: str = ""

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"recorded {self.frames} frames to {self.path or '(nothing)'}",
            f"  {self.fps:.1f} fps over {self.duration_s:.2f} s; dropped {self.dropped}, "
            f"missing {self.missing_frames} frame(s) in {self.gaps} gap(s), rejected {self.rejected}, "
            f"disconnects {self.disconnects}",
        ]
        if self.gaps:
            lines.append(f"  largest gap {self.largest_gap_s:.2f} s (frames absent from the stream)")
        if self.stopped.startswith("server gone"):
            lines.append(f"  stopped early: {self.stopped}")
        if self.latency_ms:
            lat = self.latency_ms
            lines.append(
                f"  latency median {lat['median']:.1f} ms, p95 {lat['p95']:.1f} ms, max {lat['max']:.1f} ms"
            )
        names = list(self.transforms.items())
        for name, n in names[:_SHOWN_NAMES]:
            lines.append(f"  {name}: valid in {n}/{self.frames} frames")
        if len(names) > _SHOWN_NAMES:
            lines.append(f"  ... and {len(names) - _SHOWN_NAMES} more transforms")
        if self.zero_timestamps:
            lines.append(f"  {self.zero_timestamps} messages without timestamp (arrival time used)")
        if self.rejected_images:
            lines.append(f"  {self.rejected_images} images of a different size/type not written")
        if self.backup:
            lines.append(f"  the files that were in the way are in {self.backup}")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# Recorder
# -------------------------------------------------------------------------------------------
_RATE_WINDOW = 50  # frame intervals the expected interval is the median of
_GAP_FACTOR = 1.5  # an interval this many times the expected one is a gap


class StreamRecorder:
    """Pair images with transforms and write them incrementally (module docstring).

    Parameters
    ----------
    path : str or Path
        Output sequence file (``.igs.mhd`` is written incrementally; other formats are converted
        at :meth:`close`). An existing file is never replaced (:class:`RecordingExistsError`,
        raised here, before anything is recorded).
    image_device : str, optional
        Record only IMAGE messages of this device (default: the first image device seen).
    transform_names, name_map, max_gap_s, hold_s
        Pairing options, see :class:`~.pairing.FramePairer`.
    embedded_transform : str, optional
        Also record each image's own matrix under this name (e.g. ``"ImageToReference"``);
        valid unless the image's metadata ``<name>TransformStatus`` says otherwise.
    metadata : dict, optional
        Extra header fields.
    overwrite : bool
        Move the files in the way to a backup folder (:func:`prepare_output`) when the first
        frame is written, instead of refusing.

    Gaps in the image timestamps (an interval more than 1.5 times the median of the last 50)
    are counted as missing frames (:class:`RecordingSummary`); the frame after a gap carries the
    per-frame field ``MissingFramesBefore``, and the header of the finished file
    ``RecordingMissingFrames``, ``RecordingGaps``, ``RecordingDroppedMessages`` and
    ``RecordingDisconnects``.
    """

    def __init__(
        self,
        path,
        *,
        image_device: str | None = None,
        transform_names=None,
        name_map=None,
        max_gap_s: float | None = None,
        hold_s: float = 0.5,
        embedded_transform: str | None = None,
        metadata=None,
        overwrite: bool = False,
    ):
        from ..io import sequence_format

        self.path = Path(path)
        sequence_format(self.path)
        self.overwrite = bool(overwrite)
        if not self.overwrite:
            prepare_output(self.path)  # refuse now, before anything is recorded
        self.pairer = FramePairer(
            image_device=image_device,
            transform_names=transform_names,
            name_map=name_map,
            max_gap_s=max_gap_s,
            hold_s=hold_s,
        )
        if embedded_transform is not None:
            embedded_transform = (
                embedded_transform[: -len("Transform")]
                if embedded_transform.endswith("Transform")
                else embedded_transform
            )
            split_transform_name(embedded_transform)
        self.embedded_transform = embedded_transform
        self.metadata = dict(metadata or {})
        self._file: IncrementalSequenceFile | None = None
        self._frames = 0
        self._valid_counts: dict[str, int] = {}
        self._interpolated = 0
        self._rejected_images = 0
        self._first_t = None
        self._last_t = None
        self._intervals: deque = deque(maxlen=_RATE_WINDOW)
        self._missing = 0
        self._gaps = 0
        self._largest_gap = 0.0
        self._latencies: list[float] = []
        self._closed = False
        self._final_path: Path | None = None

    @property
    def frames(self) -> int:
        """Frames written so far."""
        return self._frames

    @property
    def missing_frames(self) -> int:
        """Frames estimated absent from the stream so far (class docstring)."""
        return self._missing

    @property
    def pending(self) -> int:
        """Images received but not yet written (waiting for their transforms)."""
        return self.pairer.pending

    @property
    def images_accepted(self) -> int:
        return self.pairer.images_accepted

    def stop_images(self) -> None:
        """Ignore images from now on; transforms still complete the frames in hand."""
        self.pairer.stop_images()

    def add(self, message: Message) -> int:
        """Feed one received message; returns the number of frames written by this call."""
        if self._closed:
            raise FreehandUSError(f"{self.path}: recorder is closed")
        done = self.pairer.add(message)
        for frame in done:
            self._write(frame)
        return len(done)

    def _open(self, frame: np.ndarray) -> None:
        names = self.pairer.names
        if self.embedded_transform and self.embedded_transform not in names:
            names.append(self.embedded_transform)
        self._file = IncrementalSequenceFile(
            self.path,
            frame_shape=frame.shape[:2],
            dtype=frame.dtype,
            n_channels=frame.shape[2] if frame.ndim == 3 else 1,
            transform_names=names,
            metadata=self.metadata,
            overwrite=self.overwrite,
        )

    def _gap_fields(self, t: float) -> dict:
        """Count the frames missing before an image at ``t``; the per-frame fields to write."""
        if self._last_t is None:
            return {}
        dt = t - self._last_t
        if dt < 0:  # a restarted source: learn its rate again
            self._intervals.clear()
            return {}
        if len(self._intervals) >= 5:
            expected = float(np.median(self._intervals))
            missing = int(round(dt / expected)) - 1 if expected > 0 else 0
            if dt > _GAP_FACTOR * expected and missing >= 1:
                self._missing += missing
                self._gaps += 1
                self._largest_gap = max(self._largest_gap, dt)
                logger.warning("%.2f s without images before t = %.3f s: about %d frame(s) missing",
                               dt, t, missing)  # fmt: skip
                return {"MissingFramesBefore": str(missing)}
        if dt > 0:
            self._intervals.append(dt)
        return {}

    def _write(self, paired: PairedFrame) -> None:
        frame = paired.frame
        if self._file is None:
            self._open(frame)
        if frame.shape != self._file.frame_shape:
            self._rejected_images += 1
            logger.warning("image size %s differs from the recording's %s; frame not written",
                           frame.shape, self._file.frame_shape)  # fmt: skip
            return
        transforms = dict(paired.transforms)
        if self.embedded_transform is not None:
            status = paired.metadata.get(f"{self.embedded_transform}TransformStatus", "OK")
            transforms[self.embedded_transform] = (paired.image_to_world, str(status).upper() == "OK")
        fields = self._gap_fields(paired.timestamp_s)
        self._file.append(frame, paired.timestamp_s, transforms, fields=fields)
        for name, (_, valid) in transforms.items():
            self._valid_counts[name] = self._valid_counts.get(name, 0) + int(valid)
        self._interpolated += len(paired.interpolated)
        self._frames += 1
        self._first_t = paired.timestamp_s if self._first_t is None else self._first_t
        self._last_t = paired.timestamp_s
        if paired.latency_s is not None:
            self._latencies.append(paired.latency_s)

    def summary(self, **extra) -> RecordingSummary:
        """Counters so far (``extra`` fills dropped/rejected/disconnects/stopped from the client)."""
        names = list(self._valid_counts)
        duration = (self._last_t - self._first_t) if self._frames > 1 else 0.0
        fps = (self._frames - 1) / duration if duration > 0 else 0.0
        latency = {}
        ms = np.asarray(self._latencies) * 1000.0
        if ms.size and abs(np.median(ms)) < 60_000:  # else the sender's clock is not ours
            latency = {
                "median": float(np.median(ms)),
                "p95": float(np.percentile(ms, 95)),
                "max": float(ms.max()),
            }
        path = self._final_path or (self._file.path if self._file is not None else None)
        backup = self._file.backup if self._file is not None else None
        return RecordingSummary(
            path=str(path) if path is not None else "",
            frames=self._frames,
            transforms={n: self._valid_counts.get(n, 0) for n in names},
            # frames written before a transform was first seen lack it: they count as invalid
            invalid_frames={n: self._frames - self._valid_counts.get(n, 0) for n in names},
            interpolated=self._interpolated,
            rejected_images=self._rejected_images + self.pairer.images_rejected,
            zero_timestamps=self.pairer.zero_timestamps,
            duration_s=float(duration),
            fps=float(fps),
            latency_ms=latency,
            missing_frames=self._missing,
            gaps=self._gaps,
            largest_gap_s=float(self._largest_gap),
            backup=str(backup) if backup is not None else "",
            **extra,
        )

    def close(self, **extra) -> RecordingSummary:
        """Write the frames still waiting, finish the file, return the summary.

        ``extra``: ``dropped``, ``rejected``, ``disconnects`` (the client's counters, also written
        to the file's header) and ``stopped``.
        """
        if not self._closed:
            try:
                for frame in self.pairer.flush():
                    self._write(frame)
            except OSError as exc:  # a full disk: the frames written so far stay valid
                logger.error("could not write the last frame(s) to %s: %s", self.path, exc)
            self._closed = True
            if self._file is not None:
                self._final_path = self._file.close(
                    metadata={
                        "RecordingMissingFrames": self._missing,
                        "RecordingGaps": self._gaps,
                        "RecordingDroppedMessages": int(extra.get("dropped", 0)),
                        "RecordingDisconnects": int(extra.get("disconnects", 0)),
                    }
                )
        return self.summary(**extra)

    def __enter__(self) -> StreamRecorder:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


@dataclass(frozen=True)
class RecordingStatus:
    """A running recording, as ``record_stream(monitor=...)`` reports it a few times a second.

    ``frames`` written, ``elapsed_s`` since the connection, ``fps`` written over the last
    second or so, ``dropped`` messages, ``missing_frames``, ``state`` of the connection
    (``connected``, ``disconnected``, ``connecting``), ``reconnecting_s`` (seconds without a
    connection, 0 when connected).
    """

    frames: int
    elapsed_s: float
    fps: float
    dropped: int
    missing_frames: int
    state: str
    reconnecting_s: float


def record_stream(
    host: str,
    port: int,
    path,
    *,
    duration_s: float | None = None,
    frames: int | None = None,
    connect_timeout_s: float = 10.0,
    reconnect_timeout_s: float = 60.0,
    stop_event: threading.Event | None = None,
    client_options=None,
    progress=None,
    monitor=None,
    monitor_interval_s: float = 0.25,
    drain_s: float = 1.0,
    overwrite: bool = False,
    **recorder_options,
) -> RecordingSummary:
    """Connect to ``host:port`` and record until ``duration_s`` passed or ``frames`` were written.

    Parameters
    ----------
    host, port : str, int
    path : str or Path
        Output sequence file; never replaced (:class:`RecordingExistsError`) unless ``overwrite``.
    duration_s : float, optional
        Stop after this many seconds from the first connection.
    frames : int, optional
        Stop after this many frames.
    connect_timeout_s : float
        Give up (:class:`~.client.IGTLConnectionError`) when no connection is made in this time.
    reconnect_timeout_s : float
        After a lost connection the client reconnects (logged once, as a warning); when no
        connection is back within this many seconds the recording stops, keeping its frames
        (``summary.stopped`` starts with ``"server gone"``).
    stop_event : threading.Event, optional
        Set it to stop early (a signal handler can); Ctrl-C (KeyboardInterrupt) also stops
        cleanly and is re-raised after the file is closed.
    client_options : dict, optional
        Passed to :class:`~.client.IGTLClient`.
    progress : callable(frames_written), optional
        Called after each written frame.
    monitor : callable(RecordingStatus), optional
        Called every ``monitor_interval_s`` seconds (a status line, e.g.).
    drain_s : float
        After the end is reached, wait at most this long for the transforms of the last images.
    overwrite : bool
        See :class:`StreamRecorder`.
    **recorder_options
        Passed to :class:`StreamRecorder`.

    Returns
    -------
    RecordingSummary
    """
    from .client import IGTLClient, IGTLConnectionError

    if duration_s is None and frames is None:
        raise ValueError("give duration_s or frames (or both) so the recording can end")
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if frames is not None and frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    if not reconnect_timeout_s > 0:
        raise ValueError(f"reconnect_timeout_s must be > 0, got {reconnect_timeout_s}")
    stop_event = stop_event or threading.Event()
    recorder = StreamRecorder(path, overwrite=overwrite, **recorder_options)
    client = IGTLClient(host, port, **dict(client_options or {})).start()
    interrupted = None
    stopped = ""
    try:
        first_wait = min(1.0, connect_timeout_s)
        if not client.wait_for_state("connected", first_wait) and connect_timeout_s > first_wait:
            logger.warning("no OpenIGTLink server at %s:%d yet (%s); retrying for up to %g s", host, port,
                           client.stats().last_disconnect_reason or client.state, connect_timeout_s)  # fmt: skip
        if not client.wait_for_state("connected", connect_timeout_s - first_wait):
            raise IGTLConnectionError(
                f"no OpenIGTLink server answered at {host}:{port} within {connect_timeout_s:g} s "
                f"({client.stats().last_disconnect_reason or client.state})"
            )
        t_start = time.monotonic()
        t_end = None if duration_s is None else t_start + duration_s
        t_drain = None  # once the end is reached: finish the frames in hand, then stop
        lost_at = None
        next_status = t_start
        rate = deque(maxlen=8)  # (time, frames) of the last status reports
        while True:
            now = time.monotonic()
            if stop_event.is_set():
                stopped = stopped or "stopped"
                break
            if t_drain is None:
                if t_end is not None and now >= t_end:
                    stopped = "duration"
                elif frames is not None and recorder.images_accepted >= frames:
                    stopped = "frames"
                if stopped:
                    recorder.stop_images()
                    t_drain = now + drain_s
            if t_drain is not None and (recorder.pending == 0 or now >= t_drain):
                break
            state = client.state
            if state == "connected":
                if lost_at is not None:
                    logger.warning("reconnected to %s:%d after %.1f s", host, port, now - lost_at)
                    lost_at = None
            elif state == "closed":
                stopped = stopped or "closed"
                break
            elif lost_at is None:
                lost_at = now
                logger.warning("lost the connection to %s:%d (%s); reconnecting for up to %g s",
                               host, port, client.stats().last_disconnect_reason, reconnect_timeout_s)  # fmt: skip
            elif now - lost_at > reconnect_timeout_s and t_drain is None:
                stopped = f"server gone: no connection to {host}:{port} for {reconnect_timeout_s:g} s"
                logger.warning("%s; stopping with the %d frame(s) recorded", stopped, recorder.frames)
                break
            if monitor is not None and now >= next_status:
                next_status = now + monitor_interval_s
                rate.append((now, recorder.frames))
                t0, f0 = rate[0]
                monitor(
                    RecordingStatus(
                        frames=recorder.frames,
                        elapsed_s=now - t_start,
                        fps=(recorder.frames - f0) / (now - t0) if now > t0 else 0.0,
                        dropped=client.stats().dropped,
                        missing_frames=recorder.missing_frames,
                        state=state,
                        reconnecting_s=0.0 if lost_at is None else now - lost_at,
                    )
                )
            message = client.get(timeout_s=0.05)
            if message is None:
                continue
            try:
                written = recorder.add(message)
            except OSError as exc:  # a full disk, a removed folder: keep what is on disk
                stopped = f"cannot write {recorder.path}: {exc.strerror or exc}"
                logger.error("%s; stopping with the %d frame(s) recorded", stopped, recorder.frames)
                break
            if written and progress is not None:
                progress(recorder.frames)
    except KeyboardInterrupt as exc:
        interrupted = exc
        stopped = "stopped"
    finally:
        client.close()
        stats = client.stats()
        summary = recorder.close(
            dropped=stats.dropped,
            rejected=sum(
                stats.stream.get(k, 0) for k in ("crc_errors", "malformed", "bad_headers", "unknown_types")
            ),
            disconnects=stats.disconnects,
            stopped=stopped,
        )
    if interrupted is not None:
        logger.info("recording interrupted: %s", summary)
        raise interrupted
    return summary
