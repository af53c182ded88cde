"""How far a sensorless estimate can be trusted: flagged frames and per-frame uncertainty.

Flags
-----

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

Uncertainty
-----------
:func:`frame_uncertainty` gives every frame-to-frame step a standard deviation per parameter and
the sweep a **drift band**: how far (mm) the image centre of each frame may be from where the
estimate puts it. The form was chosen by measurement (``Testing/benchmarks/bench_sensorless.py
--uncertainty``, results in ``Testing/benchmarks/results/sensorless_uncertainty.json``) among
cheap candidates that need no retraining: the size of the step itself, test-time augmentation
spreads (left-right flip, backwards sweep, both, a 3-pixel shift, a gamma change, inference
windows offset by 5 frames), the model's disagreement with its own estimate on every second
frame (multi-gap consistency), and its disagreement with speckle decorrelation. Each was fitted
on the training simulator and scored on 30 sweeps of the independent test simulator (never
fitted on). None ranks the steps' errors well: Spearman correlation of sigma with the error of
a step out of the plane 0.05 (step size) to 0.15 (flip + reverse, 3 extra passes of the
model), all within 0.91-0.93 of the true steps inside +-2 sigma. For the drift band, what the
user reads, the step size did as well as any (97 % of the frames inside the 95 % band, 100 %
of the last frames; Spearman 0.47 between band and drift in % of the path over the sweeps,
0.16-0.44 for the others) at no cost, where the others cost 0.25 to 3 extra passes. So the
uncertainty of a step is ``sigma_k = sqrt(floor_k**2 + (per_step_k * step_k)**2)`` for each
parameter ``k`` (``tx, ty, tz`` mm, ``rx, ry, rz`` degrees of the centred image-mm frame of
:mod:`.pose`): larger for fast motion, where the estimate is least sure.

A step into a flagged frame (empty or decorrelated) is unknown: its sigma is at least
:attr:`UncertaintyCalibration.unknown_step` (the 99th percentile of the true steps of the
training sweeps). Errors of a sweep do not cancel (they are mostly a wrong elevational scale,
the same sign all along), so the band adds the steps' translation sigmas linearly:
``drift_band_mm[i] = band_factor * sum_{j <= i} |sigma_t,j|``, with ``band_factor`` set so
that 95 % of the frames of the calibration sweeps lie inside.

The constants (:data:`LEARNED_CALIBRATION`, :data:`DECORRELATION_CALIBRATION`) were fitted by
maximum likelihood on sweeps of the **training** simulator (held-out seeds, never on the
independent one); the benchmark reports how well they hold on the independent simulator.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "FLAG_OK",
    "FLAG_EMPTY",
    "FLAG_DECORRELATED",
    "BLANK_STD",
    "FrameFlags",
    "decorrelated_frames",
    "UncertaintyCalibration",
    "LEARNED_CALIBRATION",
    "DECORRELATION_CALIBRATION",
    "FrameUncertainty",
    "frame_uncertainty",
]

#: Per-frame flag values (the ``SensorlessFlag`` frame field of ``track predict`` outputs).
FLAG_OK = "ok"
FLAG_EMPTY = "empty"
#: A frame whose (block-mean) standard deviation is at most this share of the sweep's largest
#: grey value (at least 1) has no contrast: empty, even when every frame of the sweep is.
BLANK_STD = 1e-6
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
        frame standard deviation is empty (so is a frame without contrast, :data:`BLANK_STD`)
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
    # relative to the sweep (a lifted probe among imaged frames), and absolutely: a frame with no
    # contrast at all (constant) is empty even when every frame of the sweep is
    empty = (std < empty_fraction * float(np.median(std))) | (std <= BLANK_STD * max(1.0, float(np.abs(small).max())))
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


@dataclass(frozen=True, eq=False)
class UncertaintyCalibration:
    """Constants of :func:`frame_uncertainty` (see the module docstring).

    Attributes
    ----------
    floor : (6,) sigma of a step that does not move (tx, ty, tz mm; rx, ry, rz deg)
    per_step : (6,) sigma per unit of the estimated step, per parameter (no unit)
    unknown_step : (6,) smallest sigma of a step into a flagged frame (mm, deg)
    band_factor : drift band = this times the running sum of the steps' translation sigmas
        (covers 95 % of the calibration frames)
    source : what the constants were fitted on
    """

    floor: tuple
    per_step: tuple
    unknown_step: tuple
    band_factor: float
    source: str

    def __post_init__(self):
        for name in ("floor", "per_step", "unknown_step"):
            v = np.asarray(getattr(self, name), dtype=np.float64)
            if v.shape != (6,) or not np.all(np.isfinite(v)) or np.any(v < 0):
                raise ValueError(f"UncertaintyCalibration.{name} must be 6 finite values >= 0, got {getattr(self, name)!r}")
        if not (np.isfinite(self.band_factor) and self.band_factor > 0):
            raise ValueError(f"UncertaintyCalibration.band_factor must be > 0, got {self.band_factor!r}")

    def to_dict(self) -> dict:
        return {"floor": list(map(float, self.floor)), "per_step": list(map(float, self.per_step)),
                "unknown_step": list(map(float, self.unknown_step)), "band_factor": float(self.band_factor),
                "source": self.source}


#: Fitted for the shipped model by ``Testing/benchmarks/bench_sensorless.py --uncertainty`` (its
#: ``constants.learned``): maximum likelihood on 14 held-out sweeps of the training simulator
#: (seeds 900500-900513, 120-200 frames); ``unknown_step`` is the 99th percentile of their true
#: steps, ``band_factor`` the 95th percentile of drift / summed sigmas over their frames.
LEARNED_CALIBRATION = UncertaintyCalibration(
    floor=(0.0202, 0.0198, 0.1674, 0.1592, 0.1634, 0.0577),
    per_step=(0.1744, 0.1279, 0.1930, 1.3635, 0.3311, 0.2076),
    unknown_step=(0.3524, 0.2000, 1.1236, 0.6211, 1.6757, 0.5616),
    band_factor=1.637,
    source="shipped model, fitted on 14 training simulator sweeps (seeds 900500-900513), not on the independent one",
)

#: The same fit for the speckle decorrelation method's estimates (``constants.decorrelation``).
DECORRELATION_CALIBRATION = UncertaintyCalibration(
    floor=(0.0320, 0.0427, 0.2863, 0.2152, 0.2672, 0.0546),
    per_step=(0.3116, 0.0, 0.2931, 0.3000, 0.8036, 0.2963),
    unknown_step=(0.3524, 0.2000, 1.1236, 0.6211, 1.6757, 0.5616),
    band_factor=1.380,
    source="decorrelation method, fitted on 14 training simulator sweeps (seeds 900500-900513), not on the "
           "independent one",
)


@dataclass(frozen=True, eq=False)
class FrameUncertainty:
    """Per-frame uncertainty of an estimated trajectory (see the module docstring).

    Attributes
    ----------
    step_sigma : (n, 6) float64, sigma of the step *into* frame ``i`` (frame ``i - 1`` -> ``i``;
        row 0 is zero), tx, ty, tz in mm and rx, ry, rz in degrees, centred image-mm frame
    drift_band_mm : (n,) float64, frame ``i``'s image centre lies within this distance (mm) of
        its estimated position in about 95 % of cases (0 at frame 0, the anchor)
    calibration : the constants used
    path_length_mm : estimated path length of the image centre (mm; NaN when not given), for the
        band in % of the path
    """

    step_sigma: np.ndarray
    drift_band_mm: np.ndarray
    calibration: UncertaintyCalibration
    path_length_mm: float = float("nan")

    @property
    def elevational_sigma_mm(self) -> np.ndarray:
        """(n,) sigma of the step out of the image plane (tz), mm."""
        return self.step_sigma[:, 2]

    @property
    def out_of_plane_sigma_deg(self) -> np.ndarray:
        """(n,) sigma of the tilt out of the image plane, ``sqrt(sigma_rx**2 + sigma_ry**2)``, degrees."""
        return np.hypot(self.step_sigma[:, 3], self.step_sigma[:, 4])

    @property
    def final_drift_band_mm(self) -> float:
        return float(self.drift_band_mm[-1])

    def to_dict(self, *, per_frame: bool = True) -> dict:
        n = self.drift_band_mm.size
        d = {
            "method": "step size (calibrated on the training simulator)",
            "median_elevational_sigma_mm": float(np.median(self.elevational_sigma_mm[1:])) if n > 1 else 0.0,
            "median_out_of_plane_sigma_deg": float(np.median(self.out_of_plane_sigma_deg[1:])) if n > 1 else 0.0,
            "final_drift_band_mm": self.final_drift_band_mm,
            "final_drift_band_percent_of_path": (100.0 * self.final_drift_band_mm / self.path_length_mm
                                                 if self.path_length_mm > 0 else None),
            "band_coverage": 0.95,
            "calibration": self.calibration.to_dict(),
        }
        if per_frame:
            d["elevational_sigma_mm"] = np.round(self.elevational_sigma_mm, 5).tolist()
            d["out_of_plane_sigma_deg"] = np.round(self.out_of_plane_sigma_deg, 5).tolist()
            d["drift_band_mm"] = np.round(self.drift_band_mm, 4).tolist()
        return d

    def __str__(self) -> str:
        d = self.to_dict(per_frame=False)
        pct = d["final_drift_band_percent_of_path"]
        of_path = f" = {pct:.0f} % of the estimated {self.path_length_mm:.0f} mm path" if pct is not None else ""
        return (f"uncertainty: the last frame lies within {self.final_drift_band_mm:.1f} mm of its estimated place "
                f"(95 % band{of_path}); per step sigma {d['median_elevational_sigma_mm']:.2f} mm out of the plane, "
                f"{d['median_out_of_plane_sigma_deg']:.2f} deg tilt (median)")


def frame_uncertainty(frame_to_frame, flags=None, *, calibration: UncertaintyCalibration = LEARNED_CALIBRATION,
                      path_length_mm: float | None = None) -> FrameUncertainty:
    """Per-frame uncertainty of an estimated trajectory (see the module docstring).

    Parameters
    ----------
    frame_to_frame : (n - 1, 6) estimated frame-to-frame parameters (tx, ty, tz mm; rx, ry, rz
        deg), centred image-mm frame, pair ``i`` = frame ``i + 1`` -> ``i``
    flags : optional :class:`FrameFlags` (or (n,) bool, True = unreliable) of the same sweep:
        steps into flagged frames get at least ``calibration.unknown_step``
    calibration : the constants (:data:`LEARNED_CALIBRATION` for learned models,
        :data:`DECORRELATION_CALIBRATION` for the decorrelation method)
    path_length_mm : optional estimated path length of the image centre, for the band in %

    Returns
    -------
    FrameUncertainty

    Raises
    ------
    ValueError
        ``frame_to_frame`` not (m >= 1, 6) finite, or flags of another length.
    """
    p = np.asarray(frame_to_frame, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] != 6 or p.shape[0] < 1:
        raise ValueError(f"frame_to_frame must be (n_frames - 1 >= 1, 6), got shape {p.shape}")
    if not np.all(np.isfinite(p)):
        raise ValueError("frame_to_frame must be finite")
    n = p.shape[0] + 1
    floor = np.asarray(calibration.floor, dtype=np.float64)
    per_step = np.asarray(calibration.per_step, dtype=np.float64)
    sigma = np.zeros((n, 6))
    sigma[1:] = np.sqrt(floor**2 + (per_step * p) ** 2)
    if flags is not None:
        bad = np.asarray(flags.unreliable if isinstance(flags, FrameFlags) else flags, dtype=bool)
        if bad.shape != (n,):
            raise ValueError(f"flags must have one entry per frame ({n}), got shape {bad.shape}")
        bad = bad.copy()
        bad[0] = False  # frame 0 is the anchor: no step into it
        sigma[bad] = np.maximum(sigma[bad], np.asarray(calibration.unknown_step, dtype=np.float64))
    band = calibration.band_factor * np.cumsum(np.linalg.norm(sigma[:, :3], axis=1))
    return FrameUncertainty(sigma, band, calibration,
                            float("nan") if path_length_mm is None else float(path_length_mm))
