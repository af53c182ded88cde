"""Headless live pipelines: a PLUS/OpenIGTLink stream handed frame by frame to consumers.

:func:`run_live` reads a :class:`~.client.IGTLClient`, pairs every image with its transforms
(:class:`~.pairing.FramePairer`) and hands each :class:`~.pairing.PairedFrame` to *sinks*
(callables; ``process()`` / ``idle()`` are called when the stream pauses, so a slow consumer
catches up in bulk). This is transport only (the ground floor); the consumers belong to the
capabilities:

- live reconstruction: :class:`FreehandUSLib.reconstruction.live.LiveReconstructionSink`
  (:func:`FreehandUSLib.reconstruction.live.live_reconstruct` wires it for one call);
- live N-wire calibration: :class:`NWireCalibrationLib.live_calibration.LiveCalibrationSink`
  (:func:`NWireCalibrationLib.live_calibration.live_calibrate`).

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

from .pairing import FramePairer

__all__ = ["LiveSummary", "run_live"]

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
