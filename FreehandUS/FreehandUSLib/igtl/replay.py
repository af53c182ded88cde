"""A PLUS-like replay server: stream a recorded tracked sequence as PlusServer streams live data.

What a client (Slicer's OpenIGTLink connector, :class:`~.client.IGTLClient`, the recorder) sees,
per tracked frame, all with the frame's timestamp:

- one IMAGE named ``<Image>_<Reference>`` (PLUS's ``<Image Name="Image"
  EmbeddedTransformToFrame="Reference"/>``: device ``Image_Reference``) whose matrix is
  ImageToReference, resolved like PLUS's transform repository from the sequence's per-frame
  transforms plus fixed ones (``ImageToProbe`` from a calibration or a PLUS config). Frames where
  that chain is invalid carry the identity (and, with header version 2, metadata
  ``ImageToReferenceTransformStatus = INVALID``). If ImageToReference cannot be resolved at all
  (no ImageToProbe given) the image is sent as ``Image_Image`` with the identity, and a warning
  says which transform is missing;
- one TRANSFORM per requested transform name (default: the sequence's own, e.g.
  ``ProbeToTracker``, ``ReferenceToTracker``), **only where it is valid** (PlusServer's
  ``SendValidTransformsOnly``); derived names (``ProbeToReference``) may be requested too;
- an empty-named keep-alive STATUS when nothing else was sent for 0.25 s (e.g. after the end).

Timestamps: ``"live"`` (default) sends ``t_start + offset`` in seconds since 1970, where
``offset`` follows the pacing, so receivers can measure latency as with a live PlusServer (which
sends UTC); ``"original"`` sends the file's own timestamps (shifted by whole passes when looping,
so they keep increasing).

Pacing: ``fps=None`` follows the file's timestamps (real time), ``fps=N`` sends N frames per
second, ``fps=0`` sends as fast as the slowest client takes them (back-pressure, for benchmarks).
The replay starts when the first client connects (``wait_for_clients``), so nothing is streamed
into the void.

PLUS remote-control commands (STRING ``CMD_<uid>`` or COMMAND, see :mod:`.commands`):

``StartRecording``     ``OutputFilename`` (optional): record the frames as they are sent into
                       ``output_dir`` (file name only; a client cannot pick other folders).
                       ``.mhd`` files are written incrementally; ``.mha``/``.nrrd`` are written
                       as ``.mhd`` while recording and converted at StopRecording.
``StopRecording``      Finish the file; the reply message is its path.
``RequestChannelIds``  ``TrackedVideoStream``
``RequestDeviceIds``   ``TrackedVideoDevice,CaptureDevice[,VolumeReconstructorDevice]``; the
                       ``DeviceType`` attribute (``VirtualCapture``, ``VirtualVolumeReconstructor``)
                       filters.
``ReconstructVolume``  Reconstruct ``InputSeqFilename`` (in ``output_dir``) or, without it, the
                       replayed sequence, write ``OutputVolFilename`` and, with
                       ``OutputVolDeviceName``, send the volume as an IMAGE to the requester.
                       Answered by the server's ``reconstruct_command`` (``freehandus serve``
                       gives :func:`FreehandUSLib.reconstruction.live.reconstruct_for_command`);
                       without one the reply is FAIL and ``RequestDeviceIds`` lists no
                       reconstructor. The transport itself knows nothing of reconstruction.

**What a client can do to this machine.** There is no authentication (as with PlusServer): any
client that reaches the port receives the images and transforms and can write new sequence and
volume files into ``output_dir`` and spend CPU time on reconstructions. It cannot replace or
delete a file: a name that exists there (or a link) is refused with FAIL, and files are created
exclusively. ``output_dir`` defaults to a fresh folder (``freehandus-serve-<date>-<time>-<pid>``
in the current folder, created when first written), never the folder of the served file.

**Slow clients.** Frames are broadcast at their pace (``fps`` > 0 or None): a client that does
not keep up misses frames (counted) and one that takes nothing for ``send_timeout_s`` is
disconnected, without delaying the others (:class:`~.server.IGTLServer`). With ``fps=0`` the
replay waits for the slowest client that still takes data.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import ConfigError, FreehandUSError, SequenceError, TransformError
from ..sequence import TrackedSequence
from .protocol import ImageMessage, TransformMessage
from .recorder import IncrementalSequenceFile
from .server import CommandContext, IGTLServer

__all__ = ["ReplayServer", "ReplayStats", "CHANNEL_ID", "DEVICE_IDS", "plus_server_settings"]

logger = logging.getLogger(__name__)

CHANNEL_ID = "TrackedVideoStream"
DEVICE_IDS = {
    "TrackedVideoDevice": "VirtualMixer",
    "CaptureDevice": "VirtualCapture",
    "VolumeReconstructorDevice": "VirtualVolumeReconstructor",
}
_DEFAULT_FPS = 30.0


@dataclass
class ReplayStats:
    """Counters of a replay: ``frames_sent`` (tracked frames broadcast), ``passes`` completed,
    ``transforms_sent``, ``invalid_transforms_skipped``, ``recording`` (file or "")."""

    frames_sent: int = 0
    passes: int = 0
    transforms_sent: int = 0
    invalid_transforms_skipped: int = 0
    recording: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def plus_server_settings(path) -> dict:
    """What a PLUS config's ``<PlusOpenIGTLinkServer>`` asks to stream.

    Returns ``{"transform_names": [...], "image_name": ..., "embedded_frame": ..., "port": ...}``
    with only the keys the file sets (``DefaultClientInfo/TransformNames``, the first
    ``ImageNames/Image``, ``ListeningPort``); an empty dict when the element is absent.
    """
    import xml.etree.ElementTree as ET

    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError) as exc:
        raise ConfigError(f"{path}: cannot read the PLUS configuration ({exc})") from exc
    server = root.find(".//PlusOpenIGTLinkServer")
    if server is None:
        return {}
    out: dict = {}
    if server.get("ListeningPort"):
        try:
            out["port"] = int(server.get("ListeningPort"))
        except ValueError as exc:
            raise ConfigError(f"{path}: PlusOpenIGTLinkServer ListeningPort is not an integer") from exc
    names = [
        t.get("Name") for t in server.findall("./DefaultClientInfo/TransformNames/Transform") if t.get("Name")
    ]
    if names:
        out["transform_names"] = names
    image = server.find("./DefaultClientInfo/ImageNames/Image")
    if image is not None and image.get("Name"):
        out["image_name"] = image.get("Name")
        out["embedded_frame"] = image.get("EmbeddedTransformToFrame", "Reference")
    return out


class ReplayServer:
    """Stream a :class:`~FreehandUSLib.sequence.TrackedSequence` like PlusServer (module docstring).

    Parameters
    ----------
    sequence : TrackedSequence
    host, port : str, int
        ``port=0`` picks a free port (:attr:`port` after :meth:`start`).
    fps : float or None
        None = follow the file's timestamps; 0 = as fast as clients take frames.
    loop : bool
        Start again after the last frame (until :meth:`stop`).
    image_name, embedded_frame : str
        The IMAGE is ``<image_name>_<embedded_frame>`` carrying ``<image_name>To<embedded_frame>``.
    fixed_transforms : dict name -> (4, 4), optional
        E.g. ``{"ImageToProbe": calibration}`` or ``PlusConfig.coordinate_definitions.repository_fixed()``.
    transform_names : list of str, optional
        TRANSFORM messages to send per frame (default: the sequence's per-frame transforms).
    timestamps : "live" or "original"
    wait_for_clients : int
        Clients that must be connected before the first frame is sent (0 = start at once).
    output_dir : path, optional
        Where StartRecording/ReconstructVolume write (default: a fresh folder in the current one,
        see the module docstring); created when first written.
    image_to_probe : (4, 4), optional
        The calibration; same as ``fixed_transforms={"ImageToProbe": ...}``.
    reconstruction_options : ReconstructionOptions, optional
        Used by ReconstructVolume (e.g. ``options_from_plus_config(config)``).
    reconstruct_command : callable(server, attributes, context) -> (ok, message), optional
        What answers ``ReconstructVolume`` (e.g.
        :func:`FreehandUSLib.reconstruction.live.reconstruct_for_command`); None: the command
        fails and no VolumeReconstructorDevice is listed.
    **server_options
        Passed to :class:`~.server.IGTLServer` (``keepalive_interval_s``, ``send_timeout_s``...).
    """

    def __init__(
        self,
        sequence: TrackedSequence,
        *,
        host: str = "127.0.0.1",
        port: int = 18944,
        fps: float | None = None,
        loop: bool = False,
        image_name: str = "Image",
        embedded_frame: str = "Reference",
        fixed_transforms=None,
        transform_names=None,
        timestamps: str = "live",
        wait_for_clients: int = 1,
        output_dir=None,
        image_to_probe=None,
        reconstruction_options=None,
        reconstruct_command=None,
        **server_options,
    ):
        if sequence.n_frames == 0:
            raise SequenceError("cannot replay an empty sequence")
        if timestamps not in ("live", "original"):
            raise ValueError(f"timestamps must be 'live' or 'original', got {timestamps!r}")
        if fps is not None and (not np.isfinite(fps) or fps < 0):
            raise ValueError(f"fps must be >= 0 (0 = as fast as possible) or None, got {fps}")
        self.sequence = sequence
        self.fps = None if fps is None else float(fps)
        self.loop = bool(loop)
        self.timestamps = timestamps
        self.wait_for_clients = int(wait_for_clients)
        if output_dir is None:
            output_dir = Path.cwd() / time.strftime(f"freehandus-serve-%Y%m%d-%H%M%S-{os.getpid()}")
        self.output_dir = Path(output_dir)
        fixed = {k: np.asarray(v, dtype=np.float64) for k, v in dict(fixed_transforms or {}).items()}
        if image_to_probe is not None:
            fixed.setdefault("ImageToProbe", np.asarray(image_to_probe, dtype=np.float64))
        self.fixed_transforms = fixed
        self.reconstruction_options = reconstruction_options
        self.reconstruct_command = reconstruct_command
        repo = sequence.repository(fixed=fixed)

        names = list(sequence.transforms) if transform_names is None else list(transform_names)
        self._transforms: list[tuple[str, np.ndarray, np.ndarray]] = []
        for name in names:
            base = name[: -len("Transform")] if name.endswith("Transform") else name
            if len(base.encode()) > 20:
                raise ConfigError(f"transform name {base!r} is longer than OpenIGTLink's 20-byte device name")
            try:
                mats = repo.get(base)
            except TransformError as exc:
                raise ConfigError(f"cannot stream transform {base!r}: {exc}") from exc
            valid = np.all(np.isfinite(mats), axis=(1, 2))
            self._transforms.append((base, mats, valid))

        image_transform = f"{image_name}To{embedded_frame}"
        try:
            image_mats = repo.get(image_transform)
            self.image_device = f"{image_name}_{embedded_frame}"
        except TransformError as exc:
            logger.warning(
                "%s cannot be resolved (%s); images are sent as %s_%s with the identity matrix. "
                "Give the calibration (ImageToProbe) to send %s_%s.",
                image_transform, exc, image_name, image_name, image_name, embedded_frame,
            )  # fmt: skip
            image_mats = np.broadcast_to(np.eye(4), (sequence.n_frames, 4, 4))
            self.image_device = f"{image_name}_{image_name}"
            image_transform = f"{image_name}To{image_name}"
        if len(self.image_device.encode()) > 20:
            raise ConfigError(f"image device name {self.image_device!r} is longer than 20 bytes")
        self.image_transform = image_transform
        self._image_valid = np.all(np.isfinite(image_mats), axis=(1, 2))
        self._image_mats = np.where(self._image_valid[:, None, None], image_mats, np.eye(4))

        self._period_s, self._offsets_s, self._file_period_s = self._schedule()
        self.server = IGTLServer(host, port, command_handler=self._handle_command, **server_options)
        self.stats = ReplayStats()
        self.finished = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._record_lock = threading.Lock()
        self._recording: IncrementalSequenceFile | None = None
        self._t_start = 0.0

    # -- schedule ----------------------------------------------------------------------------
    def _schedule(self) -> tuple[float, np.ndarray, float]:
        """(pass duration, per-frame send offsets, file period) in seconds.

        The file period (span of the timestamps plus one frame interval) shifts the ``original``
        timestamps of each further pass so that they keep increasing.
        """
        n = self.sequence.n_frames
        ts = self.sequence.timestamps_s
        dt = np.diff(ts)
        if n > 1 and np.all(dt > 0):
            file_offsets = ts - ts[0]
            file_period = float(file_offsets[-1] + np.median(dt))
        else:
            if self.fps is None:
                logger.warning("sequence timestamps do not increase; replaying at %g fps", _DEFAULT_FPS)
            file_offsets = np.arange(n) / _DEFAULT_FPS
            file_period = n / _DEFAULT_FPS
        if self.fps is None:
            return file_period, file_offsets, file_period
        if self.fps > 0:
            return n / self.fps, np.arange(n) / self.fps, file_period
        return 0.0, np.zeros(n), file_period

    # -- lifecycle ---------------------------------------------------------------------------
    @property
    def port(self) -> int | None:
        return self.server.port

    @property
    def host(self) -> str:
        return self.server.host

    def start(self) -> ReplayServer:
        """Listen and start the replay thread; returns self."""
        self.server.start()
        self._thread = threading.Thread(target=self._run, name=f"igtl-replay-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0, *, flush_s: float = 0.0) -> None:
        """Stop streaming, finish any server-side recording and close every connection.

        With ``flush_s`` > 0, frames already queued for the clients are sent first (waiting at
        most that long), so a clean shutdown loses nothing.
        """
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
        if flush_s > 0:
            self.server.flush(flush_s)
        with self._record_lock:
            if self._recording is not None:
                try:
                    self._recording.close()
                finally:
                    self._recording = None
        self.server.stop(timeout_s)

    def __enter__(self) -> ReplayServer:
        return self.start()

    def __exit__(self, *exc) -> bool:
        self.stop()
        return False

    def wait_finished(self, timeout_s: float | None = None) -> bool:
        """Block until the last frame of a non-looping replay was handed to the clients."""
        return self.finished.wait(timeout_s)

    # -- streaming ---------------------------------------------------------------------------
    def frame_messages(self, index: int, timestamp_s: float) -> list:
        """The IMAGE and valid TRANSFORM messages of frame ``index`` stamped ``timestamp_s``."""
        seq = self.sequence
        image_ok = bool(self._image_valid[index])
        messages = [
            ImageMessage.from_frame(
                seq.frames[index],
                self._image_mats[index],
                device_name=self.image_device,
                timestamp_s=timestamp_s,
                metadata={f"{self.image_transform}TransformStatus": "OK" if image_ok else "INVALID"},
            )
        ]
        for name, mats, valid in self._transforms:
            if valid[index]:
                messages.append(
                    TransformMessage(
                        matrix=mats[index],
                        device_name=name,
                        timestamp_s=timestamp_s,
                        metadata={"TransformStatus": "OK"},
                    )
                )
                self.stats.transforms_sent += 1
            else:
                self.stats.invalid_transforms_skipped += 1
        return messages

    def _timestamp(self, index: int, pass_index: int, offset_s: float) -> float:
        if self.timestamps == "original":
            return float(self.sequence.timestamps_s[index]) + pass_index * self._file_period_s
        return self._t_start + offset_s

    def _run(self) -> None:
        try:
            if self.wait_for_clients > 0:
                while not self._stop.is_set():
                    if self.server.wait_for_clients(self.wait_for_clients, 0.2):
                        break
            self._t_start = time.time()
            t0 = time.monotonic()
            pass_index = 0
            while not self._stop.is_set():
                for index in range(self.sequence.n_frames):
                    if self.fps == 0:  # as fast as the clients take frames
                        if self._stop.is_set():
                            return
                        offset = time.monotonic() - t0
                    else:
                        offset = pass_index * self._period_s + float(self._offsets_s[index])
                        delay = t0 + offset - time.monotonic()
                        if delay > 0 and self._stop.wait(delay):
                            return
                    timestamp = self._timestamp(index, pass_index, offset)
                    # paced: a slow client misses frames, nobody waits for it; fps=0: back-pressure
                    self.server.broadcast(self.frame_messages(index, timestamp), timeout_s=None if self.fps == 0 else 0)
                    self.stats.frames_sent += 1
                    self._record(index, timestamp)
                pass_index += 1
                self.stats.passes = pass_index
                if not self.loop:
                    break
            logger.info("replay finished: %d frames sent", self.stats.frames_sent)
        except Exception:
            logger.exception("replay thread failed")
        finally:
            self.finished.set()

    # -- server-side recording ---------------------------------------------------------------
    def _record(self, index: int, timestamp_s: float) -> None:
        if self._recording is None:
            return
        with self._record_lock:
            if self._recording is None:
                return
            transforms = {name: (mats[index], bool(valid[index])) for name, mats, valid in self._transforms}
            try:
                self._recording.append(self.sequence.frames[index], timestamp_s, transforms)
            except (OSError, FreehandUSError) as exc:  # a full disk must not stop the stream
                recording, self._recording = self._recording, None
                logger.error("server-side recording to %s stopped: %s", recording.path, exc)
                recording.close()

    def _safe_path(self, filename: str | None, default_suffix: str, *, new: bool = True) -> Path:
        """``filename`` in :attr:`output_dir` (its last component only).

        ``new``: the name must not exist there (nothing is replaced); else it must be a file in
        the folder itself (a link pointing elsewhere is refused)."""
        if not filename:
            filename = time.strftime("Recording_%Y%m%d_%H%M%S") + default_suffix
        name = Path(str(filename).replace("\\", "/")).name
        if not name or name in (".", "..") or any(ord(c) < 32 for c in name):
            raise FreehandUSError(f"invalid file name {filename!r}")
        path = self.output_dir / name
        if new:
            if os.path.lexists(path):
                raise FreehandUSError(f"{name} exists in the output folder; a remote command never replaces a file")
            self.output_dir.mkdir(parents=True, exist_ok=True)
        elif not path.is_file() or path.resolve().parent != self.output_dir.resolve():
            raise FreehandUSError(f"{name} is not a file in the output folder")
        return path

    def _create(self, filename: str | None, default_suffix: str, write) -> Path:
        """Write a new one-file output ``filename`` in :attr:`output_dir` with ``write(tmp_path)``.

        The file is written under a temporary name and linked to its name, which fails when
        the name was taken meanwhile: an existing file is never replaced."""
        path = self._safe_path(filename, default_suffix)
        if path.name.lower().endswith((".mhd", ".nhdr")):
            raise FreehandUSError(f"{path.name}: remote outputs are one file (.mha, .nrrd), not header + data")
        tmp = path.with_name(f".partial-{os.getpid()}-{threading.get_ident()}-{path.name}")
        try:
            write(tmp)
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise FreehandUSError(
                    f"{path.name} exists in the output folder; a remote command never replaces a file"
                ) from None
        finally:
            if tmp.exists():
                tmp.unlink()
        return path

    # -- commands ----------------------------------------------------------------------------
    def _handle_command(self, name: str, attributes: dict, context: CommandContext) -> tuple[bool, str]:
        key = name.lower()
        if key == "startrecording":
            with self._record_lock:
                if self._recording is not None:
                    return False, f"Recording is already in progress to {self._recording.path}"
                seq = self.sequence
                try:
                    path = self._safe_path(attributes.get("OutputFilename"), ".igs.mhd")
                    self._recording = IncrementalSequenceFile(
                        path,
                        frame_shape=seq.frames.shape[1:3],
                        dtype=seq.frames.dtype,
                        n_channels=seq.n_channels,
                        transform_names=[n for n, _, _ in self._transforms],
                        pixel_spacing_mm=seq.pixel_spacing_mm,
                    )  # refuses every existing file it would write (output, data, working .mhd)
                except FreehandUSError as exc:
                    return False, f"StartRecording refused: {exc}"
                self.stats.recording = str(path)
            return True, str(path)
        if key == "stoprecording":
            with self._record_lock:
                if self._recording is None:
                    return False, "Recording is not in progress"
                recording, self._recording = self._recording, None
            final = recording.close()
            if final is None:
                return True, "no frames were recorded; nothing written"
            return True, str(final)
        if key == "requestchannelids":
            return True, CHANNEL_ID
        if key == "requestdeviceids":
            wanted = attributes.get("DeviceType", "")
            ids = [
                dev
                for dev, dev_type in DEVICE_IDS.items()
                if (dev != "VolumeReconstructorDevice" or self.reconstruct_command is not None)
                and (not wanted or dev_type.lower() == wanted.lower())
            ]
            if wanted and wanted.lower() not in {t.lower() for t in DEVICE_IDS.values()}:
                return False, "Unknown device type requested."
            return True, ",".join(ids)
        if key == "reconstructvolume":
            return self._reconstruct(attributes, context)
        return False, f"Unknown command: {name}"

    def _reconstruct(self, attributes: dict, context: CommandContext) -> tuple[bool, str]:
        if self.reconstruct_command is None:
            return False, "ReconstructVolume is not available: this server was started without a reconstructor"
        return self.reconstruct_command(self, attributes, context)
