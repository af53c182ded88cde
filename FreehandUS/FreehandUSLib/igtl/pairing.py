"""Turning a live message stream into tracked frames: each image with its transforms.

:class:`FramePairer` is the common front end of the recorder (:mod:`.recorder`) and the live
pipelines (:mod:`.live`). Feed it every received message; it returns :class:`PairedFrame` objects
(one per image, in order, none dropped) as soon as their transforms are known.

- **Pairing.** Each image gets every transform *at the image's timestamp*: a transform sample with
  the same timestamp (PlusServer stamps the image and the transforms of a tracked frame alike) is
  used as it is. A transform whose samples all fall on image timestamps is *frame-synchronous*
  (every PlusServer stream): a frame without its sample is a transform PlusServer withheld as
  invalid, and it is not bridged. Other transforms (a tracker streaming on its own clock) are
  interpolated (linear translation + slerp, :func:`FreehandUSLib.transforms.interpolate_transforms`)
  between the samples just before and just after the image, provided they are at most
  ``max_gap_s`` apart (default: 1.5 x the median interval of that transform's samples). A
  transform without a usable value is reported invalid (identity matrix).
- **Waiting for transforms.** An image is complete once the next image has arrived and every
  active transform has a sample at or after its timestamp (normally when the next tracked frame
  arrives), or once it is ``hold_s`` older than the newest image (a tool out of view for a long
  time), or at :meth:`FramePairer.flush`.
- **Many names stay cheap.** A transform without a sample for ``stale_s`` (default the larger
  of ``hold_s`` and 1 s) becomes *dormant*: it no longer holds images back and is reported
  invalid without any computation; the ``max_dormant`` (64) most recently active dormant ones
  are still listed in every frame, older ones are left out (a reader takes a missing
  transform as invalid). A frame then costs time in proportion to the transforms active
  around it, not to every name the stream ever sent.
- **Timestamps.** An image with a zero timestamp ("none given") is stamped with its arrival time
  (``received_s``); a transform with a zero timestamp gets the stamp of the image that arrived
  just before it, so untimed streams are paired by arrival order in PlusServer's order (image,
  then that frame's transforms); both are counted. Image timestamps that go backwards (a
  restarted source) complete the frames in hand and restart the pairing.
- Transforms come from TRANSFORM, TDATA (each element) and POSITION messages; v2 metadata
  ``TransformStatus`` other than ``OK``, non-finite or singular matrices count as invalid samples.
  Device names that are not ``<From>To<To>`` are ignored (counted) unless ``name_map`` maps them.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import OrderedDict, deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import TransformError
from ..transforms import interpolate_transforms, split_transform_name
from .protocol import ImageMessage, Message, PositionMessage, TrackingDataMessage, TransformMessage

__all__ = ["FramePairer", "PairedFrame"]

logger = logging.getLogger(__name__)

EXACT_S = 1e-6  # timestamps this close are "the same sample time"
_IDENTITY = np.eye(4)
_IDENTITY.flags.writeable = False  # shared by every invalid transform of every frame


@dataclass(eq=False)
class PairedFrame:
    """One image with its transforms.

    Attributes
    ----------
    timestamp_s : float
        Image time (seconds; arrival time when the sender gave none).
    frame : (n_rows, n_cols[, n_components]) array
        The pixels (MF as sent by PLUS), a read-only view of the received message.
    transforms : dict name -> (matrix (4, 4) float64, valid bool)
        Every listed, active or recently dormant transform at ``timestamp_s`` (identity when
        invalid); a name left out is invalid too (module docstring).
    interpolated : tuple of str
        Names whose value was interpolated rather than taken from a sample at that time.
    image_to_world : (4, 4) float64
        The IMAGE message's own matrix (PLUS: ImageToReference for ``Image_Reference``).
    device_name : str
        The IMAGE's device name.
    metadata : dict
        The IMAGE's version-2 metadata.
    latency_s : float or None
        Arrival minus image timestamp (None when the image had no timestamp).
    """

    timestamp_s: float
    frame: np.ndarray
    transforms: dict = field(default_factory=dict)
    interpolated: tuple = ()
    image_to_world: np.ndarray = field(default_factory=lambda: np.eye(4))
    device_name: str = ""
    metadata: dict = field(default_factory=dict)
    latency_s: float | None = None


class _Samples:
    """Time-sorted samples of one transform (timestamps, matrices, validity).

    ``synchronous`` becomes True when a sample fell exactly on an image timestamp and False
    (for good) when a sample fell between two images: then the transform is interpolated.
    """

    __slots__ = ("t", "m", "ok", "synchronous")

    def __init__(self):
        self.t: list[float] = []
        self.m: list[np.ndarray] = []
        self.ok: list[bool] = []
        self.synchronous: bool | None = None

    def add(self, t: float, matrix: np.ndarray, ok: bool) -> None:
        i = bisect.bisect_left(self.t, t - EXACT_S)
        if i < len(self.t) and abs(self.t[i] - t) <= EXACT_S:
            self.m[i], self.ok[i] = matrix, ok
            return
        self.t.insert(i, t)
        self.m.insert(i, matrix)
        self.ok.insert(i, ok)

    def latest(self) -> float:
        return self.t[-1] if self.t else -np.inf

    def prune_before(self, t: float) -> None:
        """Keep at most three samples before ``t`` (enough to interpolate and estimate the rate)."""
        i = bisect.bisect_left(self.t, t - EXACT_S) - 3
        if i > 0:
            del self.t[:i], self.m[:i], self.ok[:i]

    def median_interval(self) -> float | None:
        if len(self.t) < 2:
            return None
        d = np.diff(self.t[-50:])
        d = d[d > 0]
        return float(np.median(d)) if d.size else None

    def observe_frame(self, t_prev: float | None, t: float) -> None:
        """Update :attr:`synchronous` with the samples around the image at ``t``."""
        if self.synchronous is False:
            return
        lo = bisect.bisect_right(self.t, (t_prev if t_prev is not None else -np.inf) + EXACT_S)
        hi = bisect.bisect_left(self.t, t - EXACT_S)
        if t_prev is not None and hi > lo:
            self.synchronous = False
        elif hi < len(self.t) and abs(self.t[hi] - t) <= EXACT_S:
            self.synchronous = True

    def value_at(self, t: float, max_gap_s: float | None) -> tuple[np.ndarray | None, bool]:
        """(matrix, interpolated) at ``t``; matrix None when no usable value exists."""
        i = bisect.bisect_left(self.t, t - EXACT_S)
        if i < len(self.t) and abs(self.t[i] - t) <= EXACT_S:
            return (self.m[i] if self.ok[i] else None), False
        if self.synchronous or i == 0 or i >= len(self.t):
            return None, False
        t0, t1 = self.t[i - 1], self.t[i]
        if not (self.ok[i - 1] and self.ok[i]):
            return None, False
        gap = max_gap_s
        if gap is None:
            med = self.median_interval()
            gap = 1.5 * med if med else 0.0
        if t1 - t0 > gap:
            return None, False
        try:
            mats, valid = interpolate_transforms(
                np.array([t0, t1]), np.stack([self.m[i - 1], self.m[i]]), np.ones(2, bool), np.array([t])
            )
        except TransformError:
            return None, False
        return (mats[0] if valid[0] else None), True


def _usable_matrix(matrix: np.ndarray, metadata: dict) -> bool:
    status = str(metadata.get("TransformStatus", "OK")).upper()
    if status not in ("OK", ""):
        return False
    if not np.all(np.isfinite(matrix)):
        return False
    return abs(np.linalg.det(matrix[:3, :3])) > 1e-12


class FramePairer:
    """Pair images with transforms (module docstring).

    Parameters
    ----------
    image_device : str, optional
        Use only IMAGE messages of this device (default: the first image device seen).
    transform_names : list of str, optional
        Keep only these transforms (default: every transform that arrives); listed names are
        reported (invalid) even before they first arrive.
    name_map : dict, optional
        Device name -> transform name for senders whose names are not ``<From>To<To>``.
    max_gap_s : float, optional
        Widest pair of samples to interpolate between (default: 1.5 x the median interval).
    hold_s : float
        Longest an image waits for its transforms (seconds of stream time).
    stale_s : float, optional
        Seconds without a sample after which a transform is dormant (default max(hold_s, 1)).
    max_dormant : int
        Dormant transforms still listed in every frame (the most recently active ones).
    """

    def __init__(
        self,
        *,
        image_device: str | None = None,
        transform_names=None,
        name_map=None,
        max_gap_s: float | None = None,
        hold_s: float = 0.5,
        stale_s: float | None = None,
        max_dormant: int = 64,
    ):
        self.image_device = image_device
        self.transform_names = None if transform_names is None else [_base(n) for n in transform_names]
        for name in self.transform_names or []:
            split_transform_name(name)
        self.name_map = dict(name_map or {})
        self.max_gap_s = max_gap_s
        self.hold_s = float(hold_s)
        self.stale_s = max(self.hold_s, 1.0) if stale_s is None else float(stale_s)
        if not self.stale_s > 0:
            raise ValueError(f"stale_s must be > 0, got {stale_s}")
        self.max_dormant = int(max_dormant)
        self._samples: dict[str, _Samples] = {}  # active transforms
        self._known: dict[str, None] = dict.fromkeys(self.transform_names or [])  # every name, in order
        self._dormant: OrderedDict = OrderedDict()  # recently active names without samples now
        self._head_t: float | None = None  # the oldest pending image ...
        self._head_newer = False  # ... whether a newer image arrived ...
        self._blockers: set[str] = set()  # ... and the active transforms it still waits for
        self._pending: deque = deque()
        self._last_image_t = -np.inf
        self._last_done_t: float | None = None
        self._last_untimed_image_t: float | None = None
        self._accept_images = True
        self.images_accepted = 0
        self.images_rejected = 0
        self.zero_timestamps = 0
        self.time_resets = 0
        self.ignored_devices: set[str] = set()

    @property
    def pending(self) -> int:
        """Images received but not yet complete (waiting for their transforms)."""
        return len(self._pending)

    @property
    def names(self) -> list[str]:
        """Transform names known so far (listed ones first)."""
        return list(self._known)

    def stop_images(self) -> None:
        """Ignore images from now on; transforms still complete the frames in hand."""
        self._accept_images = False

    # -- input -------------------------------------------------------------------------------
    def add(self, message: Message) -> list[PairedFrame]:
        """Feed one received message; returns the frames it completed (oldest first)."""
        if isinstance(message, ImageMessage):
            return self._add_image(message)
        if isinstance(message, TransformMessage):
            self._add_sample(message.device_name, message.matrix, message)
        elif isinstance(message, TrackingDataMessage):
            for element in message.elements:
                self._add_sample(element.name, element.matrix, message)
        elif isinstance(message, PositionMessage):
            self._add_sample(message.device_name, message.matrix, message)
        else:
            return []
        return self._complete_ready()

    def flush(self) -> list[PairedFrame]:
        """Complete every waiting image with what is known now (end of stream)."""
        done = []
        while self._pending:
            done.append(self._complete(self._pending.popleft()))
        return done

    def _stamp(self, message: Message) -> float:
        if message.timestamp_s > 0:
            return message.timestamp_s
        self.zero_timestamps += 1
        if not isinstance(message, ImageMessage) and self._last_untimed_image_t is not None:
            return self._last_untimed_image_t
        return message.received_s if message.received_s > 0 else time.time()

    def _add_sample(self, device: str, matrix: np.ndarray, message: Message) -> None:
        name = self.name_map.get(device, _base(device))
        try:
            split_transform_name(name)
        except TransformError:
            if device not in self.ignored_devices:
                self.ignored_devices.add(device)
                logger.warning(
                    "ignoring transform device %r: not a <From>To<To> name (map it with name_map)", device
                )
            return
        if self.transform_names is not None and name not in self.transform_names:
            return
        samples = self._samples.get(name)
        if samples is None:
            samples = self._samples[name] = _Samples()
            self._known.setdefault(name, None)
            self._dormant.pop(name, None)
        samples.add(
            self._stamp(message), np.array(matrix, dtype=np.float64), _usable_matrix(matrix, message.metadata)
        )
        if self._head_t is not None:
            if (self._head_newer and samples.synchronous is True) or samples.latest() >= self._head_t - EXACT_S:
                self._blockers.discard(name)
            else:
                self._blockers.add(name)

    def _add_image(self, message: ImageMessage) -> list[PairedFrame]:
        if not self._accept_images:
            return []
        if self.image_device is None:
            self.image_device = message.device_name
            logger.info("pairing images of device %r", message.device_name)
        elif message.device_name != self.image_device:
            return []
        done = []
        t = self._stamp(message)
        self._last_untimed_image_t = t if message.timestamp_s <= 0 else None
        if t < self._last_image_t - EXACT_S:
            logger.warning("image timestamps went back by %.3f s (restarted source?); restarting the pairing",
                           self._last_image_t - t)  # fmt: skip
            done += self.flush()
            self._dormant.update(dict.fromkeys(self._samples))
            self._samples.clear()
            self._head_t = None
            self._last_done_t = None
            self.time_resets += 1
        self._last_image_t = t
        if message.pixels.shape[0] != 1:
            self.images_rejected += 1
            logger.warning("IMAGE %r has %d slices; only 2D frames are paired", message.device_name,
                           message.pixels.shape[0])  # fmt: skip
            return done
        latency = (
            message.received_s - message.timestamp_s if message.timestamp_s > 0 and message.received_s else None
        )
        self._pending.append((t, message, latency))
        self.images_accepted += 1
        return done + self._complete_ready()

    # -- output ------------------------------------------------------------------------------
    def _ready(self, t: float) -> bool:
        if self._last_image_t - t > self.hold_s:
            return True
        if len(self._pending) < 2 and self._accept_images:
            return False  # wait for the next image: it closes this frame's messages
        newer = self._last_image_t > t + EXACT_S
        if self._head_t != t or self._head_newer != newer:  # which active transforms does it wait for?
            # Once a newer image arrived, the frame-synchronous transforms of this one have come
            # (one sender, in order); else every active transform must reach t.
            self._head_t = t
            self._head_newer = newer
            self._blockers = {
                n
                for n, s in self._samples.items()
                if not (newer and s.synchronous is True) and s.latest() < t - EXACT_S
            }
        return not self._blockers

    def _complete_ready(self) -> list[PairedFrame]:
        done = []
        while self._pending and self._ready(self._pending[0][0]):
            done.append(self._complete(self._pending.popleft()))
        if done:
            oldest = self._pending[0][0] if self._pending else self._last_image_t
            self._retire(oldest)
            for samples in self._samples.values():
                samples.prune_before(oldest)
        return done

    def _retire(self, t: float) -> None:
        """Make transforms without a sample since ``t - stale_s`` dormant (module docstring)."""
        stale = [n for n, s in self._samples.items() if s.latest() < t - self.stale_s]
        for name in stale:
            del self._samples[name]
            self._blockers.discard(name)
            self._dormant[name] = None
        while len(self._dormant) > self.max_dormant:
            self._dormant.popitem(last=False)

    def _complete(self, item) -> PairedFrame:
        t, message, latency = item
        transforms = {}
        interpolated = []
        for name in self.transform_names or ():
            if name not in self._samples:
                transforms[name] = (_IDENTITY, False)
        for name in self._dormant:
            transforms[name] = (_IDENTITY, False)
        last_done = -np.inf if self._last_done_t is None else self._last_done_t
        for name, samples in self._samples.items():
            if samples.synchronous is True and samples.latest() <= last_done + EXACT_S:
                transforms[name] = (_IDENTITY, False)  # no sample since the last frame: withheld
                continue
            samples.observe_frame(self._last_done_t, t)
            matrix, interp = samples.value_at(t, self.max_gap_s)
            if matrix is not None and interp:
                interpolated.append(name)
            transforms[name] = (_IDENTITY, False) if matrix is None else (matrix, True)
        self._last_done_t = t
        return PairedFrame(
            timestamp_s=t,
            frame=message.frame,
            transforms=transforms,
            interpolated=tuple(interpolated),
            image_to_world=message.ijk_to_world,
            device_name=message.device_name,
            metadata=dict(message.metadata),
            latency_s=latency,
        )


def _base(name: str) -> str:
    return name[: -len("Transform")] if name.endswith("Transform") else name
