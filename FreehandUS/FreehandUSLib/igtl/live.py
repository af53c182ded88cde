"""Headless live pipelines: a PLUS/OpenIGTLink stream into reconstruction (and other consumers).

:func:`run_live` reads a :class:`~.client.IGTLClient`, pairs every image with its transforms
(:class:`~.pairing.FramePairer`) and hands each :class:`~.pairing.PairedFrame` to *sinks*
(callables). :class:`LiveReconstructionSink` feeds
:class:`FreehandUSLib.reconstruction.IncrementalReconstructor`; its ImageToReference comes either

- from the IMAGE itself (``pose="embedded"``, the default): PlusServer's ``Image_Reference``
  carries ImageToReference, exactly what Slicer's live reconstruction uses; frames whose
  version-2 metadata marks it invalid are skipped as "no pose" by the reconstructor; or
- from the TRANSFORM stream (``pose="transforms"``): ImageToReference resolved per frame from the
  received transforms (ProbeToTracker, ReferenceToTracker...) plus fixed ones (``ImageToProbe``
  from a calibration or a PLUS config), like the offline reconstruction.

Frames are queued with :meth:`~FreehandUSLib.reconstruction.IncrementalReconstructor.submit` and
inserted in batches whenever the stream pauses or a batch is full, so a reconstruction slower
than the probe catches up in bulk; frames more than ``max_lag_s`` behind are dropped *and
counted* (PLUS gives up when 3 s behind). :func:`live_reconstruct` wires it all for one call.

The N-wire calibration keyframe collector is another sink
(:class:`NWireCalibrationLib.live_calibration.LiveCalibrationSink`, wired for one call by
:func:`NWireCalibrationLib.live_calibration.live_calibrate`); any callable taking a :class:`~.pairing.PairedFrame` can be.

In Slicer
---------
Inside Slicer, SlicerOpenIGTLink does the networking; the modules observe the MRML nodes it
updates. From the Python console::

    connector = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLIGTLConnectorNode")
    connector.SetTypeClient("localhost", 18944)       # PlusServer or `freehandus serve`
    connector.Start()
    # After the first frames: an Image_Reference volume node (ImageToReference in its IJKToRAS)
    # and linear transform nodes ProbeToTracker, ReferenceToTracker... appear in the scene.
    image = slicer.util.getNode("Image_Reference")
    tag = image.AddObserver(slicer.vtkMRMLVolumeNode.ImageDataModifiedEvent,
                            lambda caller, event: print("new frame"))

The FreehandUS module's Logic observes those nodes in the same way for live reconstruction.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import FreehandUSError, TransformError
from ..transforms import TransformRepository
from .pairing import FramePairer, PairedFrame
from .protocol import ImageMessage

__all__ = [
    "LiveSummary",
    "LiveReconstructionSink",
    "run_live",
    "live_reconstruct",
    "reconstruct_for_command",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class LiveSummary:
    """How a live run went.

    Attributes
    ----------
    frames : int
        Paired frames handed to the sinks.
    seconds : float
        Wall time of the run.
    dropped : int
        Messages the client dropped because the pipeline fell behind.
    rejected : int
        Malformed/CRC/unknown messages skipped by the client.
    disconnects : int
    sinks : dict
        ``status()`` of each sink that has one, by its position.
    """

    frames: int
    seconds: float
    dropped: int = 0
    rejected: int = 0
    disconnects: int = 0
    sinks: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        rate = self.frames / self.seconds if self.seconds > 0 else 0.0
        return (
            f"live: {self.frames} frames in {self.seconds:.2f} s ({rate:.1f} frames/s); "
            f"dropped {self.dropped}, rejected {self.rejected}, disconnects {self.disconnects}"
        )


class LiveReconstructionSink:
    """Feed paired frames into an :class:`~FreehandUSLib.reconstruction.IncrementalReconstructor`.

    Parameters
    ----------
    reconstructor : IncrementalReconstructor, optional
        Made on the first frame from ``options`` (frame size and type from that frame).
    options : ReconstructionOptions, optional
    pose : "embedded" or "transforms"
        Where ImageToReference comes from (module docstring).
    fixed_transforms : dict name -> (4, 4), optional
        For ``pose="transforms"``: e.g. ``{"ImageToProbe": calibration}``.
    image_to_reference : str, optional
        Name of the transform to resolve with ``pose="transforms"`` (default: the options'
        ``image_to_reference_transform``, else ``"ImageToReference"``).
    batch_frames : int
        Insert queued frames once this many are waiting (and whenever :meth:`process` is called).
    max_lag_s : float
        Frames this much older than the newest are dropped (counted) when inserting.
    """

    def __init__(
        self,
        reconstructor=None,
        *,
        options=None,
        pose: str = "embedded",
        fixed_transforms=None,
        image_to_reference: str | None = None,
        batch_frames: int = 8,
        max_lag_s: float = 3.0,
    ):
        if pose not in ("embedded", "transforms"):
            raise ValueError(f"pose must be 'embedded' or 'transforms', got {pose!r}")
        self.reconstructor = reconstructor
        self.options = options
        self.pose = pose
        self.fixed_transforms = {
            k: np.asarray(v, dtype=np.float64) for k, v in dict(fixed_transforms or {}).items()
        }
        if image_to_reference is None:
            image_to_reference = getattr(options, "image_to_reference_transform", None) or "ImageToReference"
        self.image_to_reference = image_to_reference
        self.batch_frames = max(1, int(batch_frames))
        self.max_lag_s = float(max_lag_s)
        self.frames_without_pose = 0
        self._warned = False

    def _make(self, frame: np.ndarray):
        from ..reconstruction import IncrementalReconstructor

        dtype = np.uint8 if frame.dtype == np.uint8 else np.float32
        return IncrementalReconstructor(
            self.options,
            image_shape=frame.shape[:2],
            n_channels=frame.shape[2] if frame.ndim == 3 else 1,
            dtype=dtype,
            max_lag_s=self.max_lag_s,
        )

    def pose_of(self, paired: PairedFrame) -> np.ndarray:
        """ImageToReference of a frame, ``(4, 4)``; NaN when it is not known for that frame."""
        if self.pose == "embedded":
            status = str(paired.metadata.get(f"{self.image_to_reference}TransformStatus", "OK")).upper()
            ok = status == "OK" and np.all(np.isfinite(paired.image_to_world))
            return paired.image_to_world if ok else np.full((4, 4), np.nan)
        per_frame = {name: (m[None], np.array([valid])) for name, (m, valid) in paired.transforms.items()}
        try:
            repo = TransformRepository(per_frame, fixed=self.fixed_transforms, n_frames=1)
            return repo.get(self.image_to_reference)[0]
        except TransformError as exc:
            if not self._warned:
                self._warned = True
                logger.warning(
                    "cannot resolve %s from the stream (%s); frames are skipped", self.image_to_reference, exc
                )
            return np.full((4, 4), np.nan)

    def __call__(self, paired: PairedFrame) -> None:
        frame = paired.frame
        if self.reconstructor is None:
            self.reconstructor = self._make(frame)
        if frame.dtype != self.reconstructor.dtype:
            frame = frame.astype(self.reconstructor.dtype)
        matrix = self.pose_of(paired)
        if not np.all(np.isfinite(matrix)):
            self.frames_without_pose += 1
        self.reconstructor.submit(frame, matrix, timestamp_s=paired.timestamp_s)
        if self.reconstructor.pending >= self.batch_frames:
            self.process()

    def process(self) -> int:
        """Insert the queued frames now; returns how many went into the volume."""
        if self.reconstructor is None:
            return 0
        return self.reconstructor.process_pending()

    def idle(self) -> None:
        """The stream paused: catch up."""
        self.process()

    def result(self, *, fill_holes: bool | None = None):
        """The volume so far (:class:`~FreehandUSLib.reconstruction.ReconstructionResult`)."""
        from ..reconstruction import NoUsableFramesError

        self.process()
        if self.reconstructor is None:
            raise NoUsableFramesError("no frame has been received yet")
        return self.reconstructor.result(fill_holes=fill_holes)

    def status(self) -> dict:
        base = {"frames_without_pose": self.frames_without_pose}
        if self.reconstructor is not None:
            base.update(self.reconstructor.status())
        return base

    def close(self) -> None:
        if self.reconstructor is not None:
            self.reconstructor.close()


def run_live(
    client,
    sinks,
    *,
    frames: int | None = None,
    duration_s: float | None = None,
    stop_event: threading.Event | None = None,
    pairer: FramePairer | None = None,
    idle_s: float = 0.02,
    drain_s: float = 1.0,
) -> LiveSummary:
    """Pair the client's messages into frames and hand each to every sink until told to stop.

    Parameters
    ----------
    client : IGTLClient
        Started (it may still be connecting).
    sinks : list of callables(PairedFrame)
        A sink may also have ``idle()`` (called when the stream pauses and at the end, to catch
        up) and ``status()`` (reported); ``close()`` is *not* called here (the caller owns the
        sinks).
    frames, duration_s : optional
        Stop after this many frames / seconds; without either, run until ``stop_event`` is set
        or the client closes.
    stop_event : threading.Event, optional
    pairer : FramePairer, optional
        Pairing options (default: first image device, all transforms).
    idle_s : float
        How long to wait for a message before calling the sinks' ``idle()``.
    drain_s : float
        After the last image, wait at most this long for its transforms.
    """
    pairer = pairer or FramePairer()
    stop_event = stop_event or threading.Event()
    sinks = list(sinks)
    t0 = time.monotonic()
    t_end = None if duration_s is None else t0 + duration_s
    count = 0

    def deliver(done):
        nonlocal count
        for paired in done:
            if frames is not None and count >= frames:
                return
            for sink in sinks:
                sink(paired)
            count += 1

    idle_called = False
    t_drain = None  # once the last image is in: finish its transforms, then stop
    while not stop_event.is_set():
        now = time.monotonic()
        if t_end is not None and now >= t_end:
            break
        if frames is not None and t_drain is None and pairer.images_accepted >= frames:
            pairer.stop_images()
            t_drain = now + drain_s
        if t_drain is not None and (pairer.pending == 0 or now >= t_drain):
            break
        message = client.get(timeout_s=idle_s)
        if message is None:
            if not idle_called:
                for sink in sinks:
                    getattr(sink, "idle", lambda: None)()
                idle_called = True
            if client.state == "closed":
                break
            continue
        idle_called = False
        deliver(pairer.add(message))
    deliver(pairer.flush())
    for sink in sinks:
        getattr(sink, "idle", lambda: None)()
    stats = client.stats()
    return LiveSummary(
        frames=count,
        seconds=time.monotonic() - t0,
        dropped=stats.dropped,
        rejected=sum(stats.stream.get(k, 0) for k in ("crc_errors", "malformed", "bad_headers", "unknown_types")),
        disconnects=stats.disconnects,
        sinks={str(i): s.status() for i, s in enumerate(sinks) if hasattr(s, "status")},
    )


def live_reconstruct(
    host: str,
    port: int,
    *,
    options=None,
    pose: str = "embedded",
    fixed_transforms=None,
    frames: int | None = None,
    duration_s: float | None = None,
    connect_timeout_s: float = 10.0,
    stop_event: threading.Event | None = None,
    fill_holes: bool | None = None,
    client_options=None,
):
    """Connect, reconstruct live until ``frames``/``duration_s``/``stop_event``; return the result.

    Returns
    -------
    (ReconstructionResult, LiveSummary)
    """
    from .client import IGTLClient, IGTLConnectionError

    if frames is None and duration_s is None and stop_event is None:
        raise ValueError("give frames, duration_s or stop_event so the live reconstruction can end")
    sink = LiveReconstructionSink(options=options, pose=pose, fixed_transforms=fixed_transforms)
    client = IGTLClient(host, port, **dict(client_options or {})).start()
    try:
        if not client.wait_for_state("connected", connect_timeout_s):
            raise IGTLConnectionError(
                f"no OpenIGTLink server answered at {host}:{port} within {connect_timeout_s:g} s"
            )
        summary = run_live(client, [sink], frames=frames, duration_s=duration_s, stop_event=stop_event)
        result = sink.result(fill_holes=fill_holes)
    finally:
        client.close()
        sink.close()
    return result, summary


# -------------------------------------------------------------------------------------------
# ReconstructVolume for the replay server
# -------------------------------------------------------------------------------------------
def _floats(text: str, n: int, name: str) -> tuple:
    try:
        values = tuple(float(v) for v in str(text).replace(",", " ").split())
    except ValueError as exc:
        raise FreehandUSError(f"{name}: expected {n} numbers, got {text!r}") from exc
    if len(values) != n:
        raise FreehandUSError(f"{name}: expected {n} numbers, got {text!r}")
    return values


def volume_message(volume, device_name: str) -> ImageMessage:
    """An IMAGE carrying a :class:`~FreehandUSLib.volume.Volume` (voxels ``(k, j, i)``)."""
    m = np.eye(4)
    m[:3, :3] = np.asarray(volume.directions, dtype=np.float64) * np.asarray(volume.spacing_mm, dtype=np.float64)
    m[:3, 3] = volume.origin_mm
    return ImageMessage(pixels=np.ascontiguousarray(volume.voxels), ijk_to_world=m, device_name=device_name,
                        timestamp_s=time.time())  # fmt: skip


def reconstruct_for_command(server, reconstruct_volume, attributes: dict, context) -> tuple[bool, str]:
    """Execute PLUS's ``ReconstructVolume`` for a :class:`~.replay.ReplayServer`.

    Attributes used: ``InputSeqFilename`` (a file in the server's output folder; default: the
    replayed sequence), ``OutputVolFilename`` (a new ``.mha``/``.nrrd`` in the output folder; an
    existing name is refused, never replaced), ``OutputVolDeviceName``
    (send the volume to the requesting client as an IMAGE of that name), ``OutputSpacing``
    ("sx sy sz" mm). ImageToProbe comes from the server's fixed transforms.
    """
    from ..io import read_sequence, write_volume
    from ..reconstruction import ReconstructionOptions

    try:
        if attributes.get("InputSeqFilename"):
            sequence = read_sequence(server._safe_path(attributes["InputSeqFilename"], "", new=False))
        else:
            sequence = server.sequence
        options = server.reconstruction_options or ReconstructionOptions()
        if attributes.get("OutputSpacing"):
            import dataclasses

            options = dataclasses.replace(
                options, output_spacing_mm=_floats(attributes["OutputSpacing"], 3, "OutputSpacing")
            )
        result = reconstruct_volume(sequence, server.fixed_transforms or None, options)
        messages = [f"{result.frames_used} frames, volume {'x'.join(str(d) for d in result.grid.dims)}"]
        if attributes.get("OutputVolFilename"):
            path = server._create(attributes["OutputVolFilename"], ".mha", lambda p: write_volume(result.volume, p))
            messages.insert(0, str(Path(path)))
        if attributes.get("OutputVolDeviceName"):
            name = attributes["OutputVolDeviceName"]
            if not server.server.send_to(context.client_id, volume_message(result.volume, name)):
                return False, f"volume reconstructed but client {context.client_id} is gone"
            messages.append(f"sent as {name}")
        return True, "; ".join(messages)
    except FreehandUSError as exc:
        return False, f"ReconstructVolume failed: {exc}"
