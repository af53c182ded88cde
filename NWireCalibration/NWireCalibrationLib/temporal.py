"""Temporal calibration: the video-to-tracker time offset, estimated from the calibration recording.

A tracked frame's pose is the tracker's reading at the frame's timestamp. When the video and the
tracking streams are not synchronised (PLUS corrects this with ``LocalTimeOffsetSec``, which its
fCal application measures in a separate temporal calibration), every moving frame gets a slightly
wrong pose and the spatial calibration absorbs the error. Here the offset is estimated from the
N-wire recording itself: the per-frame transforms are resampled at ``t + offset`` (linear
translation and slerp, :func:`FreehandUSLib.transforms.interpolate_transforms`) and the offset
that minimises the calibration residual is kept, provided held-out frames confirm it.

Convention: with an offset ``d`` the pose of the frame recorded at time ``t`` is the tracking
interpolated at ``t + d``; a positive ``d`` means the tracking reaches the sequence late (the
recorded pose belongs to an earlier image). The same offset applies to the validation recording.

Typical use::

    est = estimate_time_offset(detection.points_px, calibration_sequence, phantom,
                               phantom_to_reference=setup.phantom_to_reference)
    poses = probe_to_reference_at(calibration_sequence, est.offset_s)
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
from scipy.optimize import minimize_scalar

from FreehandUSLib.transforms import TransformRepository

from .errors import CalibrationError
from .metrics import reprojection_errors_3d, trimmed_statistics
from .phantom import NWirePhantom
from .solvers import MIN_CALIBRATION_FRAMES, calibrate_linear, calibrate_lm

__all__ = [
    "MAX_TIME_OFFSET_S",
    "TimeOffsetEstimate",
    "parse_time_offset",
    "probe_to_reference_at",
    "estimate_time_offset",
    "speed_variation_mm_s",
]

logger = logging.getLogger(__name__)

#: Largest offset accepted from a user (s): beyond it the recording's timestamps are wrong.
MAX_TIME_OFFSET_S = 1.0


def parse_time_offset(value) -> str | float:
    """Check a time-offset option: ``"auto"`` or a number of seconds.

    Parameters
    ----------
    value : str or float
        ``"auto"`` (estimate from the calibration recording), or seconds (``0`` = no
        correction), e.g. ``"0.03"``.

    Returns
    -------
    ``"auto"`` or a float, seconds.

    Raises
    ------
    ValueError
        Not ``auto`` and not a finite number within +-``MAX_TIME_OFFSET_S`` seconds (the
        message names the option and the value).
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto":
            return "auto"
        try:
            number = float(text)
        except ValueError:
            raise ValueError(f"time offset: expected 'auto' or a number of seconds (e.g. 0.03), got {value!r}") from None
    elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
        number = float(value)
    else:
        raise ValueError(f"time offset: expected 'auto' or a number of seconds (e.g. 0.03), got {value!r}")
    if not math.isfinite(number):
        raise ValueError(f"time offset: expected a finite number of seconds, got {value!r}")
    if abs(number) > MAX_TIME_OFFSET_S:
        raise ValueError(
            f"time offset: expected seconds within +-{MAX_TIME_OFFSET_S:g} s, got {number:g} s (video and tracking "
            "that far apart point to wrong timestamps, not to a latency)"
        )
    return number


def _check_timestamps(sequence) -> np.ndarray:
    t = getattr(sequence, "timestamps_s", None)
    if t is None:
        raise CalibrationError("time offset: the sequence has no frame timestamps; use --time-offset 0")
    t = np.asarray(t, dtype=np.float64)
    if t.shape != (sequence.n_frames,) or not np.all(np.isfinite(t)) or np.any(np.diff(t) <= 0):
        raise CalibrationError(
            "time offset: the frame timestamps are missing or do not increase, so the tracking cannot be "
            "resampled; use --time-offset 0"
        )
    return t


def probe_to_reference_at(sequence, offset_s: float, *, probe: str = "Probe", reference: str = "Reference") -> np.ndarray:
    """Per-frame ``ProbeToReference`` with the tracking resampled at ``t + offset_s``.

    Every per-frame transform of the sequence (e.g. ProbeToTracker and ReferenceToTracker) is
    interpolated at the shifted times before the chain is resolved, so a moving reference is
    handled too.

    Parameters
    ----------
    sequence : TrackedSequence
    offset_s : float
        Seconds (see the module docstring for the sign).
    probe, reference : str
        Coordinate frame names.

    Returns
    -------
    (n_frames, 4, 4) float64; NaN where the shifted time leaves the tracked time range or the
    tracking is invalid.

    Raises
    ------
    CalibrationError
        Missing or non-increasing timestamps (only when ``offset_s`` is not 0).
    TransformError
        No chain from Probe to Reference.
    """
    if offset_s == 0:
        return sequence.repository().get(f"{probe}To{reference}")
    t = _check_timestamps(sequence)
    shifted = sequence.interpolate_transforms(t + float(offset_s))
    repo = TransformRepository({k: (v.matrices, v.valid) for k, v in shifted.items()}, n_frames=sequence.n_frames)
    return repo.get(f"{probe}To{reference}")


@dataclass(frozen=True, eq=False)
class TimeOffsetEstimate:
    """Result of :func:`estimate_time_offset`.

    Attributes
    ----------
    offset_s : float
        The offset to apply (the estimate when ``applied``, else 0).
    estimated_s : float
        The minimiser of the calibration residual (reported even when not applied).
    applied : bool
        The estimate passed the checks (inside the search range, confirmed on held-out frames).
    reason : str
        Why it was applied or not.
    offsets_s, costs_mm : (k,) float64
        The searched grid and the calibration residual there (95 %-trimmed mean of PLUS's 3D
        middle-wire error, mm, frames used for the fit).
    cv_zero_mm, cv_estimate_mm : float
        Blocked cross-validation error (95 %-trimmed mean, mm, held-out contiguous blocks of
        the calibration recording) without correction and with the estimate.
    cv_z : float
        Paired z-score of the per-frame held-out improvement (> 2: significant).
    frames_used : int
    search_s : float
        Half-width of the last searched range, seconds (wider than asked when widened).
    estimable : bool
        False when the recording cannot tell offsets apart (too little speed variation).
    speed_variation_mm_s : float
        The recording's :func:`speed_variation_mm_s` (NaN when not measured).
    searched_s : tuple of float
        Half-widths searched, in order (more than one when the search widened).
    """

    offset_s: float
    estimated_s: float
    applied: bool
    reason: str
    offsets_s: np.ndarray
    costs_mm: np.ndarray
    cv_zero_mm: float
    cv_estimate_mm: float
    cv_z: float
    frames_used: int
    search_s: float
    estimable: bool = True
    speed_variation_mm_s: float = float("nan")
    searched_s: tuple = ()

    @property
    def at_search_edge(self) -> bool:
        """The residual was smallest at the edge of the search range (the user should look)."""
        return bool(math.isfinite(self.estimated_s) and abs(self.estimated_s) >= 0.95 * self.search_s)

    @property
    def cv_improvement(self) -> float:
        """Relative held-out improvement, ``1 - cv_estimate / cv_zero``."""
        if not (self.cv_zero_mm > 0 and math.isfinite(self.cv_estimate_mm)):
            return float("nan")
        return 1.0 - self.cv_estimate_mm / self.cv_zero_mm

    def to_dict(self) -> dict:
        def num(x, nd=6):
            return round(float(x), nd) if math.isfinite(float(x)) else None

        return {"offset_s": num(self.offset_s), "estimated_s": num(self.estimated_s), "applied": bool(self.applied),
                "reason": self.reason, "search_s": num(self.search_s), "frames_used": int(self.frames_used),
                "estimable": bool(self.estimable), "speed_variation_mm_s": num(self.speed_variation_mm_s, 3),
                "searched_s": [num(v) for v in self.searched_s],
                "cv_zero_mm": num(self.cv_zero_mm, 4), "cv_estimate_mm": num(self.cv_estimate_mm, 4),
                "cv_improvement": num(self.cv_improvement, 4), "cv_z": num(self.cv_z, 2),
                "offsets_s": [num(v) for v in self.offsets_s], "costs_mm": [num(v, 4) for v in self.costs_mm]}

    def __str__(self) -> str:
        state = "applied" if self.applied else "not applied"
        return (f"time offset {self.offset_s * 1000:+.1f} ms ({state}; estimate {self.estimated_s * 1000:+.1f} ms, "
                f"held-out error {self.cv_zero_mm:.3f} -> {self.cv_estimate_mm:.3f} mm): {self.reason}")


def _not_estimated(reason: str, search_s: float, *, estimable: bool = True, speed_variation=float("nan"),
                   searched=()) -> TimeOffsetEstimate:
    return TimeOffsetEstimate(0.0, float("nan"), False, reason, np.zeros(0), np.zeros(0), float("nan"), float("nan"),
                              float("nan"), 0, search_s, estimable=estimable,
                              speed_variation_mm_s=float(speed_variation), searched_s=tuple(searched))


#: Points fixed to the probe (Probe frame, mm) whose velocities measure the motion: the marker's
#: origin and 50 mm along each axis (about where the image is).
_PROBE_POINTS_MM = np.array([[0.0, 0, 0], [50.0, 0, 0], [0, 50.0, 0], [0, 0, 50.0]])


def speed_variation_mm_s(poses, timestamps_s, used=None) -> float:
    """How much the probe's velocity varies over a recording (mm/s).

    A time offset ``d`` displaces each frame's pose by about ``v(t) d``; the part of ``v`` that is
    the same in every frame shifts all frames alike and is absorbed by the spatial calibration,
    so only the velocity's variation makes ``d`` observable. Returned: the RMS deviation of the
    velocities of :data:`_PROBE_POINTS_MM` (the probe's origin and points 50 mm along its axes)
    from their mean velocity, over consecutive ``used`` frames.

    Parameters
    ----------
    poses : (n, 4, 4) float
        ProbeToReference (NaN where untracked).
    timestamps_s : (n,) float, increasing
    used : (n,) bool, optional
        Frames to include (default: every tracked frame).
    """
    poses = np.asarray(poses, dtype=np.float64)
    t = np.asarray(timestamps_s, dtype=np.float64)
    ok = np.all(np.isfinite(poses), axis=(1, 2))
    if used is not None:
        ok &= np.asarray(used, dtype=bool)
    idx = np.flatnonzero(ok)
    if idx.size < 3:
        return 0.0
    pts = np.einsum("fij,pj->fpi", poses[idx, :3, :3], _PROBE_POINTS_MM) + poses[idx, None, :3, 3]
    pair = np.diff(idx) == 1  # velocities between consecutive frames only
    if pair.sum() < 2:
        return 0.0
    v = np.diff(pts, axis=0)[pair] / np.diff(t[idx])[pair][:, None, None]  # (m, points, 3) mm/s
    dev = v - v.mean(axis=0)
    return float(np.sqrt(np.mean(np.sum(dev ** 2, axis=2))))


def estimate_time_offset(points_px, sequence, phantom: NWirePhantom, *, phantom_to_reference=None,
                         search_s: float = 0.1, step_s: float = 0.01, folds: int = 5, min_improvement: float = 0.02,
                         min_z: float = 2.0, max_search_s: float = 0.4, min_speed_variation_mm_s: float = 1.0,
                         probe: str = "Probe", reference: str = "Reference") -> TimeOffsetEstimate:
    """Estimate the video-to-tracker time offset from a calibration recording.

    For each candidate offset the tracking is resampled at ``t + offset``
    (:func:`probe_to_reference_at`) and the PLUS linear calibration is fitted (with its 3-sigma
    outlier removal); the cost is the 95 %-trimmed mean of PLUS's 3D middle-wire error. A grid
    of ``step_s`` over ``[-search_s, search_s]`` is refined by a bounded scalar search around
    its best point. Every offset is scored on the same frames: those tracked over the whole
    search range.

    The search range adapts: when the residual is smallest at its edge, the range is doubled
    (up to ``max_search_s``) and searched again. A minimum still at the edge of the widest range
    means broken timestamps or a latency beyond ``max_search_s``: the estimate is not applied.

    The offset is observable only when the probe's speed varies (:func:`speed_variation_mm_s`);
    below ``min_speed_variation_mm_s`` the recording cannot tell offsets apart and the result
    says "cannot estimate the offset" (``estimable`` false, ``estimated_s`` NaN) instead of
    returning whichever boundary of the range the flat residual happens to prefer.

    The estimate is applied only when (a) it lies inside the (widened) search range, and (b) a
    blocked cross-validation confirms it: the calibration frames are split into ``folds``
    contiguous blocks, each block is predicted by a calibration fitted to the others, and the
    held-out error with the offset must be at least ``min_improvement`` (relative) below the
    error without it, with a paired per-frame z-score of at least ``min_z``. Otherwise 0 is
    returned with the reason; the spatial calibration then runs as before.

    Parameters
    ----------
    points_px : (n_frames, n_wires, 2) float
        Detected dots (phantom wire order), NaN where not detected.
    sequence : TrackedSequence
        The calibration recording (timestamps and per-frame transforms).
    phantom : NWirePhantom
    phantom_to_reference : (4, 4) float, optional
        Known phantom registration. Without it the phantom pose is estimated by LM (joint)
        and held fixed during a search, alternately (at most 3 rounds).
    search_s : float
        Half-width of the first searched range, seconds (default 0.1 s).
    step_s : float
        Grid step, seconds.
    folds : int
        Blocks of the cross-validation check (>= 2).
    min_improvement, min_z : float
        Thresholds of the cross-validation check (2 % and z = 2 by default: on PLUS's fCal 2.0
        recording robust LM losses and other sub-pixel dot centres move the blocked CV error by
        0.2-1.3 %, the time offset lowers it by about 11 % with z = 6.7).
    max_search_s : float
        Widest half-range the search may widen to, seconds (``search_s`` to disable widening;
        at most ``MAX_TIME_OFFSET_S``).
    min_speed_variation_mm_s : float
        Least velocity variation (mm/s, :func:`speed_variation_mm_s`) for the offset to be
        estimated: at 1 mm/s even a 100 ms offset moves the frames by only 0.1 mm RMS relative
        to each other, below what the dots resolve (PLUS's fCal 2.0 calibration recording:
        5.7 mm/s, where a 46 ms offset is found with z = 6.7).
    probe, reference : str

    Returns
    -------
    TimeOffsetEstimate

    Raises
    ------
    ValueError
        Non-positive ``search_s``/``step_s``, ``step_s > search_s``, ``folds < 2``,
        ``search_s`` or ``max_search_s`` above ``MAX_TIME_OFFSET_S``, ``max_search_s < search_s``.
    CalibrationError
        Missing or non-increasing timestamps.
    """
    if not (search_s > 0 and math.isfinite(search_s)) or search_s > MAX_TIME_OFFSET_S:
        raise ValueError(f"search_s: expected seconds in (0, {MAX_TIME_OFFSET_S:g}], got {search_s!r}")
    if not (step_s > 0 and step_s <= search_s):
        raise ValueError(f"step_s: expected seconds in (0, search_s={search_s:g}], got {step_s!r}")
    if not (search_s <= max_search_s <= MAX_TIME_OFFSET_S):
        raise ValueError(f"max_search_s: expected seconds in [search_s={search_s:g}, {MAX_TIME_OFFSET_S:g}], "
                         f"got {max_search_s!r}")
    if not min_speed_variation_mm_s >= 0:
        raise ValueError(f"min_speed_variation_mm_s: expected mm/s >= 0, got {min_speed_variation_mm_s!r}")
    if int(folds) < 2:
        raise ValueError(f"folds: expected at least 2 cross-validation blocks, got {folds!r}")
    pts = np.asarray(points_px, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[0] != sequence.n_frames or pts.shape[1:] != (phantom.n_wires, 2):
        raise ValueError(f"points_px: expected ({sequence.n_frames}, {phantom.n_wires}, 2), got {pts.shape}")
    timestamps = _check_timestamps(sequence)

    def poses_at(dt):
        return probe_to_reference_at(sequence, dt, probe=probe, reference=reference)

    def tracked(poses):
        return np.all(np.isfinite(poses), axis=(1, 2))

    detected = np.all(np.isfinite(pts), axis=(1, 2))
    poses0 = poses_at(0.0)
    motion = speed_variation_mm_s(poses0, timestamps, detected)
    if motion < min_speed_variation_mm_s:
        return _not_estimated(
            f"cannot estimate the offset: the probe's velocity hardly varies over the detected frames "
            f"({motion:.2g} mm/s RMS, needs {min_speed_variation_mm_s:g}), so every offset fits alike; move the "
            f"probe back and forth while recording, or give the offset in seconds", search_s, estimable=False,
            speed_variation=motion)

    searched = []
    while True:
        searched.append(float(search_s))
        result = _search_offset(pts, detected, phantom, phantom_to_reference, poses_at, tracked, search_s, step_s,
                                folds, min_improvement, min_z, motion, tuple(searched))
        if isinstance(result, TimeOffsetEstimate):
            return result
        best, grid, costs, n_common = result  # the residual is smallest at the edge of the range
        if search_s < max_search_s:
            logger.info("time offset: minimum at the edge of +-%g s (%+.0f ms); widening the search", search_s,
                        1000 * best)
            search_s = min(2.0 * search_s, max_search_s)
            continue
        widened = f" (widened from +-{searched[0]:g} s)" if len(searched) > 1 else ""
        return TimeOffsetEstimate(
            0.0, best, False,
            f"the calibration residual is smallest at the edge of the +-{search_s:g} s search range{widened} "
            f"({best * 1000:+.0f} ms): check the recording's timestamps or give the offset in seconds",
            grid, costs, float("nan"), float("nan"), float("nan"), n_common, search_s,
            speed_variation_mm_s=motion, searched_s=tuple(searched))


def _search_offset(pts, detected, phantom, phantom_to_reference, poses_at, tracked, search_s, step_s, folds,
                   min_improvement, min_z, motion, searched):
    """One search over +-``search_s``: a TimeOffsetEstimate, or (best, grid, costs, n) when the best is at the edge."""
    common = detected & tracked(poses_at(-search_s)) & tracked(poses_at(search_s)) & tracked(poses_at(0.0))
    n_common = int(common.sum())
    if n_common < 2 * MIN_CALIBRATION_FRAMES:
        return _not_estimated(f"only {n_common} detected frames are tracked over the +-{search_s:g} s search range "
                              f"(need {2 * MIN_CALIBRATION_FRAMES})", search_s, speed_variation=motion,
                              searched=searched)
    p = np.where(common[:, None, None], pts, np.nan)
    estimate_pose = phantom_to_reference is None
    y = None if estimate_pose else np.asarray(phantom_to_reference, dtype=np.float64)

    def fit_errors(dt, train, test):
        poses = poses_at(dt)
        sol = calibrate_linear(np.where(train[:, None, None], p, np.nan), poses, y, phantom)
        return reprojection_errors_3d(np.where(test[:, None, None], p, np.nan), poses, sol.image_to_probe, y, phantom)

    def cost(dt):
        try:
            e = fit_errors(dt, common, common)
        except CalibrationError:
            return float("inf")
        return trimmed_statistics(e[np.isfinite(e)]).trimmed_mean

    grid = np.round(np.arange(-search_s, search_s + step_s / 2, step_s) / step_s) * step_s
    grid = np.unique(np.append(grid, 0.0))
    best = 0.0
    # Unknown phantom pose: alternate between the pose (joint LM at the current offset) and the
    # offset (linear fits with that pose held fixed); the pose fitted without the offset absorbs
    # part of it, so a single pass under-estimates.
    for _ in range(3 if estimate_pose else 1):
        previous = best
        if estimate_pose:
            try:
                y = calibrate_lm(p, poses_at(best), phantom, estimate_phantom_pose=True).phantom_to_reference
            except CalibrationError as exc:
                return _not_estimated(f"the phantom pose could not be estimated ({exc})", search_s,
                                      speed_variation=motion, searched=searched)
        costs = np.array([cost(dt) for dt in grid])
        if not np.any(np.isfinite(costs)):
            return _not_estimated("the calibration failed at every searched offset", search_s,
                                  speed_variation=motion, searched=searched)
        k = int(np.nanargmin(costs))
        best, best_cost = float(grid[k]), float(costs[k])
        lo, hi = max(-search_s, best - step_s), min(search_s, best + step_s)
        refined = minimize_scalar(cost, bounds=(lo, hi), method="bounded", options={"xatol": step_s / 20})
        if refined.success and refined.fun < best_cost:
            best, best_cost = float(refined.x), float(refined.fun)
        if abs(best - previous) < step_s / 4:
            break
    if abs(best) >= search_s - step_s / 2:
        return best, grid, costs, n_common

    idx = np.flatnonzero(common)
    per_frame = {0.0: [], best: []}
    for block in np.array_split(idx, int(folds)):
        test = np.zeros_like(common)
        test[block] = True
        for dt in per_frame:
            try:
                e = fit_errors(dt, common & ~test, test)[block]
            except CalibrationError:
                e = np.full((block.size, phantom.n_patterns), np.nan)
            per_frame[dt].append(e)
    e0, e1 = np.concatenate(per_frame[0.0]), np.concatenate(per_frame[best])
    ok = np.all(np.isfinite(e0), axis=1) & np.all(np.isfinite(e1), axis=1)
    cv0 = trimmed_statistics(e0[ok]).trimmed_mean
    cv1 = trimmed_statistics(e1[ok]).trimmed_mean
    d = (e0[ok] - e1[ok]).mean(axis=1)
    z = float(d.mean() / (d.std(ddof=1) / np.sqrt(d.size))) if d.size > 2 and d.std() > 0 else 0.0
    gain = 1.0 - cv1 / cv0 if cv0 > 0 else 0.0
    if gain >= min_improvement and z >= min_z:
        reason = (f"held-out error falls by {100 * gain:.1f} % (z = {z:.1f}) with the tracking shifted by "
                  f"{best * 1000:+.1f} ms")
        applied = True
    else:
        reason = (f"no significant offset: held-out error changes by {100 * gain:.1f} % (z = {z:.1f}; needs "
                  f">= {100 * min_improvement:g} % and z >= {min_z:g})")
        applied = False
    if len(searched) > 1:
        reason += f" (search widened from +-{searched[0]:g} s to +-{search_s:g} s)"
    est = TimeOffsetEstimate(best if applied else 0.0, best, applied, reason, grid, costs, float(cv0), float(cv1), z,
                             n_common, search_s, speed_variation_mm_s=motion, searched_s=searched)
    logger.info("%s", est)
    return est
