"""Live reconstruction from a PLUS/OpenIGTLink stream, and PLUS's ``ReconstructVolume`` command.

:class:`LiveReconstructionSink` is a sink of :func:`FreehandUSLib.igtl.live.run_live` (the
ground floor's stream transport): it feeds paired frames into an
:class:`~.reconstructor.IncrementalReconstructor`; :func:`live_reconstruct` wires a client, the
sink and ``run_live`` for one call. :func:`reconstruct_for_command` answers ``ReconstructVolume``
for a :class:`FreehandUSLib.igtl.replay.ReplayServer` given it as ``reconstruct_command`` (the
``freehandus serve`` command does).

The sink's ImageToReference comes either

- from the IMAGE itself (``pose="embedded"``, the default): PlusServer's ``Image_Reference``
  carries ImageToReference, exactly what Slicer's live reconstruction uses; frames whose
  version-2 metadata marks it invalid are skipped as "no pose" by the reconstructor; or
- from the TRANSFORM stream (``pose="transforms"``): ImageToReference resolved per frame from the
  received transforms (ProbeToTracker, ReferenceToTracker...) plus fixed ones (``ImageToProbe``
  from a calibration or a PLUS config), like the offline reconstruction.

Frames are queued with :meth:`~.reconstructor.IncrementalReconstructor.submit` and inserted in
batches whenever the stream pauses or a batch is full; frames more than ``max_lag_s`` behind are
dropped *and counted* (PLUS gives up when 3 s behind).
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import numpy as np

from ..errors import FreehandUSError, TransformError
from ..igtl.live import run_live
from ..igtl.pairing import PairedFrame
from ..igtl.protocol import ImageMessage
from ..transforms import TransformRepository
from .reconstructor import options_from_plus_config  # noqa: F401  (serve's hooks: see FreehandUSLib.igtl.cli)

__all__ = [
    "LiveReconstructionSink",
    "live_reconstruct",
    "options_from_plus_config",
    "reconstruct_for_command",
    "volume_message",
]

logger = logging.getLogger(__name__)


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
        from .reconstructor import IncrementalReconstructor

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
        from .errors import NoUsableFramesError

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
    from ..igtl.client import IGTLClient, IGTLConnectionError

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


def reconstruct_for_command(server, attributes: dict, context) -> tuple[bool, str]:
    """Execute PLUS's ``ReconstructVolume`` for a :class:`FreehandUSLib.igtl.replay.ReplayServer`
    (pass it as the server's ``reconstruct_command``).

    Attributes used: ``InputSeqFilename`` (a file in the server's output folder; default: the
    replayed sequence), ``OutputVolFilename`` (a new ``.mha``/``.nrrd`` in the output folder; an
    existing name is refused, never replaced), ``OutputVolDeviceName``
    (send the volume to the requesting client as an IMAGE of that name), ``OutputSpacing``
    ("sx sy sz" mm). ImageToProbe comes from the server's fixed transforms.
    """
    from ..io import read_sequence, write_volume
    from .config import ReconstructionOptions

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
        from .reconstructor import reconstruct_volume

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
