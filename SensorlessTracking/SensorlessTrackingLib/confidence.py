"""Frames where the images cannot tell the motion: empty frames and complete decorrelation.

Sensorless tracking reads the motion between two frames from what they share. Two kinds of
frame share nothing with their neighbour, and the estimate of the motion into them is a guess:

- **empty**: the probe was lifted (or lost contact): the frame is nearly black, its contrast
  (standard deviation) a small part of the sweep's typical contrast;
- **decorrelated**: the probe moved so far between two frames (fast motion, a jump) that their
  correlation fell to the level of frames far apart in the same sweep.

Both thresholds come from the sweep itself, so they do not depend on the probe, gain or
preset: the *floor* is the median correlation of frame pairs half the sweep apart (what
correlation is left once the speckle has decorrelated completely: shared structure, noise
pattern), the *typical* level the median correlation of neighbours, and a pair is flagged when
its correlation lies below ``floor + decorrelated_fraction * (typical - floor)``.
:func:`decorrelated_frames` returns one flag per frame; :func:`~.predict.track_sequence`
reports them with every estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["FLAG_OK", "FLAG_EMPTY", "FLAG_DECORRELATED", "FrameFlags", "decorrelated_frames"]

#: Per-frame flag values (the ``SensorlessFlag`` frame field of ``track predict`` outputs).
FLAG_OK = "ok"
FLAG_EMPTY = "empty"
FLAG_DECORRELATED = "decorrelated"


@dataclass(frozen=True, eq=False)
class FrameFlags:
    """Per-frame reliability flags of a sweep.

    Attributes
    ----------
    flags : (n,) str array, :data:`FLAG_OK`, :data:`FLAG_EMPTY` or :data:`FLAG_DECORRELATED`
        (frame ``i`` is decorrelated when the pair ``i - 1 -> i`` is: the motion *into* it is
        unknown; frame 0 only ever empty)
    neighbour_correlation : (n - 1,) float64, Pearson correlation of frames ``i`` and ``i + 1``
    floor : correlation of frames half the sweep apart (median), the decorrelated level
    typical : median neighbour correlation
    threshold : correlation below which a pair counts as decorrelated (NaN when the sweep is
        too short or does not decorrelate, then no pair is flagged decorrelated)
    """

    flags: np.ndarray
    neighbour_correlation: np.ndarray
    floor: float
    typical: float
    threshold: float

    @property
    def n_empty(self) -> int:
        return int(np.sum(self.flags == FLAG_EMPTY))

    @property
    def n_decorrelated(self) -> int:
        return int(np.sum(self.flags == FLAG_DECORRELATED))

    @property
    def unreliable(self) -> np.ndarray:
        """(n,) bool, frames flagged either way."""
        return self.flags != FLAG_OK

    def to_dict(self) -> dict:
        return {
            "empty_frames": self.n_empty,
            "decorrelated_frames": self.n_decorrelated,
            "flagged_frame_indices": np.flatnonzero(self.unreliable).tolist(),
            "correlation_floor": self.floor,
            "correlation_typical": self.typical,
            "correlation_threshold": self.threshold,
        }

    def __str__(self) -> str:
        n = self.flags.size
        if not self.unreliable.any():
            return f"no frame flagged (of {n}): neighbouring frames share speckle throughout"
        idx = np.flatnonzero(self.unreliable)
        shown = ", ".join(str(i) for i in idx[:10]) + (", ..." if idx.size > 10 else "")
        return (f"{self.n_empty} empty and {self.n_decorrelated} decorrelated frames of {n} (frames {shown}): "
                "the motion into them is not seen in the images, the estimate there is unreliable")


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pearson correlation of frame stacks ``a`` and ``b`` (k, rows*cols) row by row; 0 where
    either frame is constant."""
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    den = np.sqrt((a * a).sum(axis=1) * (b * b).sum(axis=1))
    num = (a * b).sum(axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def decorrelated_frames(
    frames, *, empty_fraction: float = 0.2, decorrelated_fraction: float = 0.2, max_side_px: int = 128
) -> FrameFlags:
    """Flag the frames of a sweep that are empty or share nothing with the previous frame.

    Parameters
    ----------
    frames : (n, rows, cols) uint8 or float, B-mode frames
    empty_fraction : a frame whose standard deviation is below this share of the sweep's median
        frame standard deviation is empty
    decorrelated_fraction : position of the threshold between the floor (0) and the typical
        neighbour correlation (1), see the module docstring
    max_side_px : frames are reduced by an integer factor (block mean) to at most about this
        many pixels a side first (speed; speckle statistics survive block means of a few pixels)

    Returns
    -------
    FrameFlags

    Raises
    ------
    ValueError
        Not an (n, rows, cols) stack of at least 2 frames, or fractions outside (0, 1).
    """
    f = np.asarray(frames)
    if f.ndim != 3 or f.shape[0] < 2:
        raise ValueError(f"frames must be (n_frames >= 2, rows, cols), got shape {f.shape}")
    for name, v in (("empty_fraction", empty_fraction), ("decorrelated_fraction", decorrelated_fraction)):
        if not 0.0 < v < 1.0:
            raise ValueError(f"{name} must be in (0, 1), got {v}")
    n, rows, cols = f.shape
    k = max(1, int(np.ceil(max(rows, cols) / max_side_px)))
    r2, c2 = (rows // k) * k, (cols // k) * k
    # block means, a few frames at a time (a long recording as float32 at once could be gigabytes)
    small = np.concatenate([
        f[i : i + 64, :r2, :c2].astype(np.float32).reshape(-1, r2 // k, k, c2 // k, k).mean(axis=(2, 4))
        for i in range(0, n, 64)
    ]).reshape(n, -1)
    std = small.std(axis=1)
    empty = std < empty_fraction * float(np.median(std))
    corr = _correlation(small[:-1], small[1:]).astype(np.float64)
    flags = np.full(n, FLAG_OK, dtype=object)
    lag = n // 2
    floor = typical = threshold = float("nan")
    if lag >= 2:
        floor = float(np.median(_correlation(small[:-lag], small[lag:])))
        typical = float(np.median(corr))
        if typical - floor > 0.05:  # neighbours share clearly more than far frames: the sweep decorrelates
            threshold = floor + decorrelated_fraction * (typical - floor)
            flags[1:][corr < threshold] = FLAG_DECORRELATED
    flags[empty] = FLAG_EMPTY
    # the pair into a frame that follows an empty one is unknown too
    after_empty = np.zeros(n, bool)
    after_empty[1:] = empty[:-1] & ~empty[1:]
    flags[after_empty & (flags == FLAG_OK)] = FLAG_DECORRELATED
    return FrameFlags(flags.astype(str), corr, floor, typical, threshold)
