"""Lossless recording of a live OpenIGTLink stream into a PLUS sequence file.

:class:`StreamRecorder` takes the messages a client receives (IMAGE, TRANSFORM, TDATA, POSITION),
pairs every image with the transforms at its timestamp (:class:`~.pairing.FramePairer`: exact
samples as PlusServer sends them, interpolation for independent trackers, zero timestamps,
restarted sources) and writes one tracked frame per image:

- **No frame is dropped**: a frame without a usable transform is written with that transform
  marked ``INVALID`` (identity matrix, as PLUS does).
- **Crash safety.** Frames go to disk through :class:`IncrementalSequenceFile` (PLUS ``.mhd``
  header + ``.raw`` pixels; the header rewritten atomically after every frame), so killing the
  process loses at most the frames in flight (the newest image waits for the next one, which
  closes its transforms); Ctrl-C closes the file cleanly.

:func:`record_stream` connects a :class:`~.client.IGTLClient` and records for a duration or a
number of frames; the ``freehandus record`` command calls it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FileFormatError, FreehandUSError
from ..transforms import split_transform_name
from .pairing import FramePairer, PairedFrame
from .protocol import Message

__all__ = [
    "IncrementalSequenceFile",
    "StreamRecorder",
    "RecordingSummary",
    "record_stream",
]

logger = logging.getLogger(__name__)


# -------------------------------------------------------------------------------------------
# Incremental file
# -------------------------------------------------------------------------------------------
def _working_mhd(path: Path) -> Path:
    """The ``.mhd`` a recording to ``path`` is written to while it runs."""
    name = path.name
    lower = name.lower()
    for suffix in (".nrrd", ".nhdr", ".mha", ".mhd", ".h5", ".hdf5"):
        if lower.endswith(suffix):
            return path.with_name(name[: -len(suffix)] + ".mhd")
    return path.with_name(name + ".mhd")


class IncrementalSequenceFile:
    """A PLUS sequence file written frame by frame, valid on disk after every frame.

    Wraps :class:`FreehandUSLib.io.metaimage.SequenceMetafileWriter` (``.mhd`` + ``.raw``). When
    ``path`` is not a ``.mhd`` (``.igs.mha``, ``.igs.nrrd``...), the frames are recorded into the
    ``.mhd`` beside it and converted when :meth:`close` is called (the ``.mhd``/``.raw`` are then
    removed); after a crash that ``.mhd`` is the recording.

    Parameters
    ----------
    path : str or Path
    frame_shape : (n_rows, n_cols)
    dtype : numpy dtype
        uint8 is kept; any other type is stored as float32.
    n_channels : int
    transform_names : list of str
    pixel_spacing_mm : (sx, sy), optional
    header_every : int
        Rewrite the header every this many frames (1: a crash loses at most the frame in flight;
        the rewrite costs time proportional to the frames so far, ~1 ms per 1000 frames).
    metadata : dict, optional
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
        header_every: int = 1,
        metadata=None,
    ):
        from ..io import sequence_format
        from ..io.metaimage import SequenceMetafileWriter

        self.path = Path(path)
        sequence_format(self.path)  # raises FileFormatError for an unknown extension
        self.working_path = self.path if self.path.suffix.lower() == ".mhd" else _working_mhd(self.path)
        if self.working_path != self.path and self.working_path.exists():
            raise FileFormatError(f"{self.working_path} exists; it would be overwritten by the recording")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.dtype = np.dtype(np.uint8) if np.dtype(dtype) == np.uint8 else np.dtype(np.float32)
        self._writer = SequenceMetafileWriter(
            self.working_path,
            frame_shape=tuple(int(v) for v in frame_shape),
            dtype=self.dtype,
            n_channels=int(n_channels),
            transform_names=list(transform_names),
            header_every=int(header_every),
            metadata=dict(metadata or {}),
            pixel_spacing_mm=pixel_spacing_mm,
        )
        self.frame_shape = self._writer.frame_shape
        self._closed = False
        self._lock = threading.Lock()

    @property
    def n_frames(self) -> int:
        return self._writer.n_frames

    def append(self, frame, timestamp_s: float, transforms=None, *, fields=None) -> None:
        """Append one frame (MF): ``transforms`` is ``{name: (4x4, valid)}``."""
        frame = np.asarray(frame)
        if frame.dtype != self.dtype:
            frame = frame.astype(self.dtype)
        with self._lock:
            self._writer.append(frame, timestamp_s, transforms, fields=fields)

    def close(self) -> Path:
        """Finish the file (converting it when needed); returns the final path."""
        with self._lock:
            if self._closed:
                return self.path if self.path.exists() else self.working_path
            self._closed = True
            self._writer.close()
        if self.working_path == self.path:
            return self.path
        if self._writer.n_frames == 0:
            logger.warning("no frames recorded; %s left empty", self.working_path)
            return self.working_path
        from ..io import read_sequence, write_sequence

        try:
            write_sequence(read_sequence(self.working_path), self.path)
        except FreehandUSError:
            logger.exception(
                "could not convert %s to %s; the recording stays in the .mhd", self.working_path, self.path
            )
            return self.working_path
        for p in (self.working_path, self._writer.data_path):
            try:
                os.remove(p)
            except OSError:
                pass
        return self.path


# -------------------------------------------------------------------------------------------
# Summary
# -------------------------------------------------------------------------------------------
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

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [
            f"recorded {self.frames} frames to {self.path or '(nothing)'}",
            f"  {self.fps:.1f} fps over {self.duration_s:.2f} s; dropped {self.dropped}, rejected {self.rejected}"
            f", disconnects {self.disconnects}",
        ]
        if self.latency_ms:
            lat = self.latency_ms
            lines.append(
                f"  latency median {lat['median']:.1f} ms, p95 {lat['p95']:.1f} ms, max {lat['max']:.1f} ms"
            )
        for name, n in self.transforms.items():
            lines.append(f"  {name}: valid in {n}/{self.frames} frames")
        if self.zero_timestamps:
            lines.append(f"  {self.zero_timestamps} messages without timestamp (arrival time used)")
        if self.rejected_images:
            lines.append(f"  {self.rejected_images} images of a different size/type not written")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------
# Recorder
# -------------------------------------------------------------------------------------------
class StreamRecorder:
    """Pair images with transforms and write them incrementally (module docstring).

    Parameters
    ----------
    path : str or Path
        Output sequence file (``.igs.mhd`` is written incrementally; other formats are converted
        at :meth:`close`).
    image_device : str, optional
        Record only IMAGE messages of this device (default: the first image device seen).
    transform_names, name_map, max_gap_s, hold_s
        Pairing options, see :class:`~.pairing.FramePairer`.
    embedded_transform : str, optional
        Also record each image's own matrix under this name (e.g. ``"ImageToReference"``);
        valid unless the image's metadata ``<name>TransformStatus`` says otherwise.
    header_every : int
        See :class:`IncrementalSequenceFile`.
    metadata : dict, optional
        Extra header fields.
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
        header_every: int = 1,
        metadata=None,
    ):
        from ..io import sequence_format

        self.path = Path(path)
        sequence_format(self.path)
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
        self.header_every = int(header_every)
        self.metadata = dict(metadata or {})
        self._file: IncrementalSequenceFile | None = None
        self._frames = 0
        self._valid_counts: dict[str, int] = {}
        self._interpolated = 0
        self._rejected_images = 0
        self._first_t = None
        self._last_t = None
        self._latencies: list[float] = []
        self._closed = False
        self._final_path: Path | None = None

    @property
    def frames(self) -> int:
        """Frames written so far."""
        return self._frames

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
            header_every=self.header_every,
            metadata=self.metadata,
        )

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
        for name, (_, valid) in transforms.items():
            self._valid_counts[name] = self._valid_counts.get(name, 0) + int(valid)
        self._interpolated += len(paired.interpolated)
        self._file.append(frame, paired.timestamp_s, transforms)
        self._frames += 1
        self._first_t = paired.timestamp_s if self._first_t is None else self._first_t
        self._last_t = paired.timestamp_s
        if paired.latency_s is not None:
            self._latencies.append(paired.latency_s)

    def summary(self, **extra) -> RecordingSummary:
        """Counters so far (``extra`` fills dropped/rejected/disconnects from the client)."""
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
            **extra,
        )

    def close(self, **extra) -> RecordingSummary:
        """Write the frames still waiting, finish the file, return the summary."""
        if not self._closed:
            for frame in self.pairer.flush():
                self._write(frame)
            self._closed = True
            if self._file is not None:
                self._final_path = self._file.close()
        return self.summary(**extra)

    def __enter__(self) -> StreamRecorder:
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


def record_stream(
    host: str,
    port: int,
    path,
    *,
    duration_s: float | None = None,
    frames: int | None = None,
    connect_timeout_s: float = 10.0,
    stop_event: threading.Event | None = None,
    client_options=None,
    progress=None,
    drain_s: float = 1.0,
    **recorder_options,
) -> RecordingSummary:
    """Connect to ``host:port`` and record until ``duration_s`` passed or ``frames`` were written.

    Parameters
    ----------
    host, port : str, int
    path : str or Path
        Output sequence file.
    duration_s : float, optional
        Stop after this many seconds from the first connection.
    frames : int, optional
        Stop after this many frames.
    connect_timeout_s : float
        Give up (:class:`~.client.IGTLConnectionError`) when no connection is made in this time.
    stop_event : threading.Event, optional
        Set it to stop early (a signal handler can); Ctrl-C (KeyboardInterrupt) also stops
        cleanly and is re-raised after the file is closed.
    client_options : dict, optional
        Passed to :class:`~.client.IGTLClient`.
    progress : callable(frames_written), optional
    drain_s : float
        After the end is reached, wait at most this long for the transforms of the last images.
    **recorder_options
        Passed to :class:`StreamRecorder`.

    Returns
    -------
    RecordingSummary
    """
    from .client import IGTLClient, IGTLConnectionError

    if duration_s is None and frames is None:
        raise ValueError("give duration_s or frames (or both) so the recording can end")
    if duration_s is not None and duration_s <= 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    if frames is not None and frames < 1:
        raise ValueError(f"frames must be >= 1, got {frames}")
    stop_event = stop_event or threading.Event()
    recorder = StreamRecorder(path, **recorder_options)
    client = IGTLClient(host, port, **dict(client_options or {})).start()
    interrupted = None
    try:
        if not client.wait_for_state("connected", connect_timeout_s):
            raise IGTLConnectionError(
                f"no OpenIGTLink server answered at {host}:{port} within {connect_timeout_s:g} s "
                f"({client.stats().last_disconnect_reason or client.state})"
            )
        t_end = None if duration_s is None else time.monotonic() + duration_s
        t_drain = None  # once the end is reached: finish the frames in hand, then stop
        while not stop_event.is_set():
            now = time.monotonic()
            if t_drain is None and (
                (t_end is not None and now >= t_end) or (frames is not None and recorder.images_accepted >= frames)
            ):
                recorder.stop_images()
                t_drain = now + drain_s
            if t_drain is not None and (recorder.pending == 0 or now >= t_drain):
                break
            message = client.get(timeout_s=0.05)
            if message is None:
                if client.state == "closed":
                    break
                continue
            if recorder.add(message) and progress is not None:
                progress(recorder.frames)
    except KeyboardInterrupt as exc:
        interrupted = exc
    finally:
        client.close()
        stats = client.stats()
        summary = recorder.close(
            dropped=stats.dropped,
            rejected=sum(
                stats.stream.get(k, 0) for k in ("crc_errors", "malformed", "bad_headers", "unknown_types")
            ),
            disconnects=stats.disconnects,
        )
    if interrupted is not None:
        logger.info("recording interrupted: %s", summary)
        raise interrupted
    return summary
