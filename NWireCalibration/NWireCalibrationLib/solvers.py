"""Probe calibration solvers: PLUS linear least squares, Levenberg-Marquardt, RANSAC + LM.

Notation (PLUS frames, 4x4 matrices applied to column vectors)::

    ImageToPhantom_f = inv(PhantomToReference) @ ProbeToReference_f @ ImageToProbe

``ImageToProbe`` maps pixels (x, y, 0, 1) of the MF image to Probe mm; its first two columns
hold the pixel spacing. Its third column is the unit normal of the image plane scaled by the mean
spacing (as PLUS completes it), so the matrix is invertible.

Solvers
-------
:func:`calibrate_linear`
    PLUS ``vtkPlusProbeCalibrationAlgo``: the middle-wire points (alpha, similar triangles) are
    moved to the Probe frame with the known PhantomToReference, and each Probe coordinate is
    fitted as ``a x + b y + c`` by linear least squares, dropping equations whose residual is
    3 standard deviations or more from the mean until none is (PLUS ``LSQRMinimize``).
:func:`calibrate_lm`
    Liu et al. 2025: Levenberg-Marquardt (``scipy.optimize.least_squares``) over ImageToProbe
    (rotation, translation, sx, sy: 8 parameters) and, when the phantom pose is unknown,
    PhantomToReference (6 more), so no stylus registration is needed. The residuals are 3D
    point-to-point errors of the dots mapped to the Phantom frame (:data:`RESIDUALS`): by
    default the paper's correspondences (middle wires from alpha, side wires where they cross
    the current image plane); ``"middle"`` uses PLUS's middle-wire points only, ``"wires"``
    every dot's distance to its wire. The initial guess comes from :func:`calibrate_linear`
    (phantom pose known) or from :func:`closed_form_initialisation` (hand-eye, pose unknown).
    With ``weighting="noise"`` the residuals are expressed in the image axes of each frame
    (lateral, axial, out of plane) and divided by their RMS from a first unweighted fit
    (:func:`residual_sigmas_mm`), then refitted: a maximum-likelihood fit for dot noise that is
    larger across the beam than along it.
:func:`calibrate_ransac_lm`
    RANSAC over frames (3000 iterations, subsets of 10 frames, inlier when the frame's RMS dot
    error is below 0.5 mm, raised to 2.5 times the median frame error when the data are
    noisier; deterministic for a seed), then LM on the inliers, re-scored once with the
    refined model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
from scipy.optimize import least_squares
from scipy.spatial.transform import Rotation

from .correspondences import middle_wire_points_mm, wire_points_mm
from .errors import CalibrationError
from .phantom import NWirePhantom

__all__ = [
    "MIN_CALIBRATION_FRAMES",
    "SolverSolution",
    "complete_image_to_probe",
    "image_to_probe_from_params",
    "params_from_image_to_probe",
    "rigid_from_params",
    "params_from_rigid",
    "image_to_phantom",
    "point_wire_residuals",
    "WEIGHTINGS",
    "residual_sigmas_mm",
    "calibrate_linear",
    "closed_form_initialisation",
    "calibrate_lm",
    "calibrate_ransac_lm",
]

logger = logging.getLogger(__name__)

#: PLUS refuses to calibrate with fewer segmented frames.
MIN_CALIBRATION_FRAMES = 10


@dataclass(frozen=True, eq=False)
class SolverSolution:
    """What a solver returns (the pipeline wraps it into a CalibrationResult).

    Attributes
    ----------
    image_to_probe : (4, 4) float64
    phantom_to_reference : (4, 4) float64
        The known one, or the estimate.
    frames_used : (n_frames,) bool
        Frames that entered the final fit (segmented, tracked, not outliers).
    method : str
        ``"lsq"``, ``"lm"`` or ``"ransac-lm"``.
    phantom_pose : str
        ``"known"`` or ``"estimated"``.
    cost_mm : float
        RMS dot error of the used frames, mm (the LM residual type; point-to-wire distance for
        the linear solver).
    n_iterations : int
        LM function evaluations (or LSQ rounds).
    info : dict
        Solver details (RANSAC inlier counts, LSQ outlier equations...).
    """

    image_to_probe: np.ndarray
    phantom_to_reference: np.ndarray
    frames_used: np.ndarray
    method: str
    phantom_pose: str
    cost_mm: float
    n_iterations: int = 0
    info: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# Parameterisations
# --------------------------------------------------------------------------------------------


def complete_image_to_probe(matrix) -> np.ndarray:
    """Set the third column to the image normal scaled by the mean spacing (as PLUS does).

    Parameters
    ----------
    matrix : (4, 4) float
        Columns 0, 1 (spacing-scaled image axes) and 3 (origin) are kept.
    """
    m = np.array(matrix, dtype=np.float64)
    x, y = m[:3, 0], m[:3, 1]
    z = np.cross(x, y)
    z /= np.linalg.norm(z)
    m[:3, 2] = z * (np.linalg.norm(x) + np.linalg.norm(y)) / 2.0
    m[3] = (0.0, 0.0, 0.0, 1.0)
    return m


def image_to_probe_from_params(p) -> np.ndarray:
    """ImageToProbe from ``(rx, ry, rz, tx, ty, tz, sx, sy)`` (rotation vector, mm, mm/px)."""
    p = np.asarray(p, dtype=np.float64)
    m = np.eye(4)
    r = Rotation.from_rotvec(p[:3]).as_matrix()
    m[:3, 0] = r[:, 0] * p[6]
    m[:3, 1] = r[:, 1] * p[7]
    m[:3, 2] = r[:, 2] * (p[6] + p[7]) / 2.0
    m[:3, 3] = p[3:6]
    return m


def params_from_image_to_probe(matrix) -> np.ndarray:
    """Nearest 8 parameters of a (possibly non-orthogonal) ImageToProbe (polar decomposition)."""
    m = np.asarray(matrix, dtype=np.float64)
    sx, sy = np.linalg.norm(m[:3, 0]), np.linalg.norm(m[:3, 1])
    x, y = m[:3, 0] / sx, m[:3, 1] / sy
    z = np.cross(x, y)
    a = np.stack([x, y, z / np.linalg.norm(z)], axis=1)
    u, _, vt = np.linalg.svd(a)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return np.concatenate([Rotation.from_matrix(r).as_rotvec(), m[:3, 3], [sx, sy]])


def rigid_from_params(p) -> np.ndarray:
    """4x4 rigid transform from ``(rx, ry, rz, tx, ty, tz)``."""
    p = np.asarray(p, dtype=np.float64)
    m = np.eye(4)
    m[:3, :3] = Rotation.from_rotvec(p[:3]).as_matrix()
    m[:3, 3] = p[3:6]
    return m


def params_from_rigid(matrix) -> np.ndarray:
    """``(rx, ry, rz, tx, ty, tz)`` of a rigid 4x4 (the rotation is re-orthonormalised)."""
    m = np.asarray(matrix, dtype=np.float64)
    u, _, vt = np.linalg.svd(m[:3, :3])
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    return np.concatenate([Rotation.from_matrix(r).as_rotvec(), m[:3, 3]])


def _invert_rigid(m: np.ndarray) -> np.ndarray:
    out = np.zeros_like(m)
    rt = np.swapaxes(m[..., :3, :3], -1, -2)
    out[..., :3, :3] = rt
    out[..., :3, 3] = -np.einsum("...ij,...j->...i", rt, m[..., :3, 3])
    out[..., 3, 3] = 1.0
    return out


def image_to_phantom(image_to_probe, probe_to_reference, phantom_to_reference) -> np.ndarray:
    """``inv(PhantomToReference) @ ProbeToReference_f @ ImageToProbe``: (n, 4, 4)."""
    return np.linalg.inv(phantom_to_reference) @ np.asarray(probe_to_reference) @ image_to_probe


# --------------------------------------------------------------------------------------------
# Inputs and residuals
# --------------------------------------------------------------------------------------------


def _check_inputs(points_px, probe_to_reference, phantom: NWirePhantom):
    pts = np.asarray(points_px, dtype=np.float64)
    poses = np.asarray(probe_to_reference, dtype=np.float64)
    if pts.ndim != 3 or pts.shape[1:] != (phantom.n_wires, 2):
        raise ValueError(
            f"points_px: expected (n_frames, {phantom.n_wires}, 2) for phantom {phantom.name!r}, got {pts.shape}"
        )
    if poses.shape != (pts.shape[0], 4, 4):
        raise ValueError(f"probe_to_reference: expected ({pts.shape[0]}, 4, 4), got {poses.shape}")
    usable = np.all(np.isfinite(pts), axis=(1, 2)) & np.all(np.isfinite(poses), axis=(1, 2))
    return pts, poses, usable


def _require_frames(n: int, what: str):
    if n < MIN_CALIBRATION_FRAMES:
        raise CalibrationError(
            f"{what}: only {n} usable frames (segmented and tracked), at least {MIN_CALIBRATION_FRAMES} are needed; "
            "record more frames with all wires visible"
        )


def _wire_bases(phantom: NWirePhantom):
    d = phantom.wire_directions
    helper = np.where(np.abs(d[:, :1]) < 0.9, np.array([[1.0, 0, 0]]), np.array([[0, 1.0, 0]]))
    e1 = np.cross(d, helper)
    e1 /= np.linalg.norm(e1, axis=1, keepdims=True)
    e2 = np.cross(d, e1)
    return phantom.wire_front_mm, e1, e2


def point_wire_residuals(points_px, image_to_phantom_f, phantom: NWirePhantom) -> np.ndarray:
    """Perpendicular offsets of the mapped dots from their wires.

    Parameters
    ----------
    points_px : (n_frames, n_wires, 2) float
    image_to_phantom_f : (n_frames, 4, 4) float
    phantom : NWirePhantom

    Returns
    -------
    (n_frames, n_wires, 2) float64, mm: the offset in two directions perpendicular to the wire
    (the norm over the last axis is the point-to-wire distance).
    """
    p0, e1, e2 = _wire_bases(phantom)
    m = np.asarray(image_to_phantom_f)
    pts = np.asarray(points_px)
    mapped = np.einsum("fij,fwj->fwi", m[:, :3, :2], pts) + m[:, None, :3, 3]
    rel = mapped - p0[None]
    return np.stack([np.einsum("fwk,wk->fw", rel, e1), np.einsum("fwk,wk->fw", rel, e2)], axis=-1)


def _frame_rms(points_px, image_to_phantom_f, phantom) -> np.ndarray:
    r = point_wire_residuals(points_px, image_to_phantom_f, phantom)
    return np.sqrt(np.mean(np.sum(r * r, axis=-1), axis=-1))


# --------------------------------------------------------------------------------------------
# PLUS linear least squares
# --------------------------------------------------------------------------------------------


def _lsq_with_outlier_removal(a: np.ndarray, b: np.ndarray, sigma: float, min_equations: int):
    keep = np.ones(b.size, dtype=bool)
    rounds = 0
    while True:
        rounds += 1
        x, *_ = np.linalg.lstsq(a[keep], b[keep], rcond=None)
        d = a[keep] @ x - b[keep]
        mean, std = d.mean(), d.std()
        ok = np.abs(d - mean) < sigma * std
        if ok.all() or sigma <= 0:
            return x, keep, rounds
        idx = np.flatnonzero(keep)
        keep[idx[~ok]] = False
        if keep.sum() <= min_equations:
            raise CalibrationError(
                f"linear calibration: outlier removal left {keep.sum()} equations (<= {min_equations}); "
                "the segmented dots are inconsistent with the tracking, check the PhantomToReference registration"
            )


def calibrate_linear(points_px, probe_to_reference, phantom_to_reference, phantom: NWirePhantom, *,
                     outlier_sigma: float = 3.0, min_equations: int = 8) -> SolverSolution:
    """PLUS-compatible linear least-squares calibration (known PhantomToReference).

    Parameters
    ----------
    points_px : (n_frames, n_wires, 2) float
        Dots in phantom wire order, pixels, MF image; frames with any NaN are skipped.
    probe_to_reference : (n_frames, 4, 4) float
        ``inv(ReferenceToTracker) @ ProbeToTracker`` per frame (NaN where not tracked).
    phantom_to_reference : (4, 4) float
        The phantom registration (PLUS: landmark registration with a stylus).
    phantom : NWirePhantom
    outlier_sigma : float
        Equations more than this many standard deviations from the mean residual are dropped,
        repeatedly (PLUS: 3). 0 disables outlier removal.
    min_equations : int
        PLUS stops with an error when no more than this many equations are left (8).

    Returns
    -------
    SolverSolution
        ``info["outlier_equations"]``: (n_frames, n_patterns) bool, True where a middle-wire
        equation was removed in any of the three coordinate fits.

    Raises
    ------
    CalibrationError
        Fewer than 10 usable frames, or outlier removal removed nearly everything.
    """
    pts, poses, usable = _check_inputs(points_px, probe_to_reference, phantom)
    _require_frames(int(usable.sum()), "linear calibration")
    y = np.asarray(phantom_to_reference, dtype=np.float64)
    middle = middle_wire_points_mm(pts[usable], phantom)  # (u, k, 3) Phantom
    phantom_to_probe = np.linalg.inv(poses[usable]) @ y
    mid_probe = np.einsum("fij,fkj->fki", phantom_to_probe[:, :3, :3], middle) + phantom_to_probe[:, None, :3, 3]
    img = pts[usable][:, 1::3, :].reshape(-1, 2)
    a = np.column_stack([img, np.ones(len(img))])
    m = np.eye(4)
    outliers = np.zeros(len(img), dtype=bool)
    rounds = 0
    for row in range(3):
        x, keep, r = _lsq_with_outlier_removal(a, mid_probe.reshape(-1, 3)[:, row], outlier_sigma, min_equations)
        rounds += r
        m[row, [0, 1, 3]] = x
        outliers |= ~keep
    m = complete_image_to_probe(m)
    out_eq = np.zeros((pts.shape[0], phantom.n_patterns), dtype=bool)
    out_eq[usable] = outliers.reshape(-1, phantom.n_patterns)
    used = usable & ~out_eq.any(axis=1)
    cost = float(np.sqrt(np.mean(_frame_rms(pts[used], image_to_phantom(m, poses[used], y), phantom) ** 2)))
    logger.info("linear calibration: %d frames, %d outlier equations, RMS point-wire %.3f mm",
                usable.sum(), int(outliers.sum()), cost)
    return SolverSolution(m, y.copy(), used, "lsq", "known", cost, rounds,
                          {"outlier_equations": out_eq, "frames_usable": int(usable.sum())})


# --------------------------------------------------------------------------------------------
# Closed-form initialisation when the phantom pose is unknown (hand-eye)
# --------------------------------------------------------------------------------------------


def _per_frame_image_to_phantom(points_px, phantom):
    """Similarity-ish fits image (px) -> Phantom (mm) per frame from the dots' 3D positions.

    Returns rigid (n, 4, 4) mapping image *mm* coordinates (x sx, y sy) to Phantom, the per-frame
    spacings (n, 2), and a (n,) bool of frames where the fit worked.
    """
    pts3 = wire_points_mm(points_px, phantom)
    n = pts3.shape[0]
    rigid = np.full((n, 4, 4), np.nan)
    spacing = np.full((n, 2), np.nan)
    ok = np.zeros(n, dtype=bool)
    for f in range(n):
        good = np.all(np.isfinite(pts3[f]), axis=1) & np.all(np.isfinite(points_px[f]), axis=1)
        if good.sum() < 4:
            continue
        p2 = points_px[f][good]
        p3 = pts3[f][good]
        a = np.column_stack([p2, np.ones(len(p2))])
        coef, *_ = np.linalg.lstsq(a, p3, rcond=None)  # (3, 3): rows x, y, 1
        ax, ay = coef[0], coef[1]
        sx, sy = np.linalg.norm(ax), np.linalg.norm(ay)
        if sx < 1e-9 or sy < 1e-9:
            continue
        x, yv = ax / sx, ay / sy
        z = np.cross(x, yv)
        rot = np.stack([x, yv, z / np.linalg.norm(z)], axis=1)
        u, _, vt = np.linalg.svd(rot)
        r = u @ vt
        if np.linalg.det(r) < 0:
            continue
        rigid[f] = np.eye(4)
        rigid[f][:3, :3] = r
        rigid[f][:3, 3] = coef[2]
        spacing[f] = (sx, sy)
        ok[f] = True
    return rigid, spacing, ok


def _hand_eye(a, b):
    """Solve A X = X B (Park & Martin) for stacks of rigid (n, 4, 4) A, B; returns X (4, 4)."""
    alpha = Rotation.from_matrix(a[:, :3, :3]).as_rotvec()
    beta = Rotation.from_matrix(b[:, :3, :3]).as_rotvec()
    m = beta.T @ alpha
    w, v = np.linalg.eigh(m.T @ m)
    if w.min() <= 1e-10 * max(w.max(), 1e-300):
        raise CalibrationError(
            "cannot estimate the phantom pose: the probe rotated about a single axis only; "
            "tilt and rotate the probe about different axes while recording"
        )
    r = v @ np.diag(w ** -0.5) @ v.T @ m.T
    u, _, vt = np.linalg.svd(r)
    r = u @ vt
    if np.linalg.det(r) < 0:
        u[:, -1] *= -1
        r = u @ vt
    lhs = (a[:, :3, :3] - np.eye(3)).reshape(-1, 3)
    rhs = (b[:, :3, 3] @ r.T - a[:, :3, 3]).reshape(-1)
    t, *_ = np.linalg.lstsq(lhs, rhs, rcond=None)
    x = np.eye(4)
    x[:3, :3] = r
    x[:3, 3] = t
    return x


def _closed_form_from_fits(poses, rigid, spacing, frames, *, min_angle_deg=3.0):
    idx = np.asarray(frames)
    if idx.size < 3:
        raise CalibrationError("closed-form initialisation needs at least 3 frames with a complete phantom")
    # Pair every frame with a few others spread through the set.
    steps = sorted({1, max(1, idx.size // 3), max(1, idx.size // 2)})
    i = np.concatenate([np.arange(idx.size)] * len(steps))
    j = np.concatenate([(np.arange(idx.size) + st) % idx.size for st in steps])
    keep = i != j
    fi, fj = idx[i[keep]], idx[j[keep]]
    a = _invert_rigid(poses[fj]) @ poses[fi]
    b = _invert_rigid(rigid[fj]) @ rigid[fi]
    cos = np.clip((np.trace(a[:, :3, :3], axis1=1, axis2=2) - 1.0) / 2.0, -1.0, 1.0)
    big = np.degrees(np.arccos(cos)) >= min_angle_deg
    if big.sum() < 2:
        raise CalibrationError(
            "cannot estimate the phantom pose: the probe hardly rotated between frames "
            f"(pairs rotating more than {min_angle_deg:g} deg: {int(big.sum())}); tilt the probe more"
        )
    x = _hand_eye(a[big], b[big])
    sx, sy = np.median(spacing[idx], axis=0)
    image_to_probe = x @ np.diag([sx, sy, (sx + sy) / 2.0, 1.0])
    ys = poses[idx] @ x @ _invert_rigid(rigid[idx])
    u, _, vt = np.linalg.svd(ys[:, :3, :3].mean(axis=0))
    y = np.eye(4)
    y[:3, :3] = u @ vt
    y[:3, 3] = np.median(ys[:, :3, 3], axis=0)
    return image_to_probe, y


def closed_form_initialisation(points_px, probe_to_reference, phantom: NWirePhantom):
    """ImageToProbe and PhantomToReference without any registration (hand-eye, closed form).

    Each frame's dots give their 3D positions in the phantom (alpha for the middle wires, the
    plane through the middle points for the side wires; needs >= 3 patterns), hence an
    ImageToPhantom per frame. ``ProbeToReference_f @ ImageToProbe = PhantomToReference @
    ImageToPhantom_f`` for all frames is then an AX = XB hand-eye problem between frame pairs,
    solved in closed form (Park & Martin); PhantomToReference follows by averaging.

    Returns
    -------
    image_to_probe, phantom_to_reference : (4, 4) float64

    Raises
    ------
    CalibrationError
        Fewer than 3 patterns, too few frames, or no rotation diversity.
    """
    pts, poses, usable = _check_inputs(points_px, probe_to_reference, phantom)
    if phantom.n_patterns < 3:
        raise CalibrationError(
            f"estimating the phantom pose needs a phantom with at least 3 N-wires ({phantom.name} has "
            f"{phantom.n_patterns}); give the PhantomToReference registration instead (--phantom-pose known)"
        )
    _require_frames(int(usable.sum()), "closed-form initialisation")
    rigid, spacing, ok = _per_frame_image_to_phantom(pts, phantom)
    frames = np.flatnonzero(usable & ok)
    _require_frames(frames.size, "closed-form initialisation")
    return _closed_form_from_fits(poses, rigid, spacing, frames)


# --------------------------------------------------------------------------------------------
# Levenberg-Marquardt
# --------------------------------------------------------------------------------------------


RESIDUALS = ("middle", "correspondences", "wires")
"""LM residuals: ``"middle"`` (middle-wire points from alpha, point to point, PLUS's error
measure), ``"correspondences"`` (the paper: middle wires from alpha plus side wires where they
cross the current image plane, point to point) and ``"wires"`` (every dot's 3D distance to its
wire)."""


def _point_errors(pts, poses, m, y, phantom, residual, middle=None):
    """Per-dot 3D error vectors (f, n, 3), mm, Phantom frame, for the given residual type."""
    pose_rot = poses[:, :3, :3]
    probe = np.einsum("ij,fwj->fwi", m[:3, :2], pts) + m[:3, 3]
    ref = np.einsum("fij,fwj->fwi", pose_rot, probe) + poses[:, None, :3, 3]
    yr, yt = y[:3, :3], y[:3, 3]
    ph = (ref - yt) @ yr
    if residual == "wires":
        rel = ph - phantom.wire_front_mm[None]
        d = phantom.wire_directions
        return rel - np.einsum("fwk,wk->fw", rel, d)[..., None] * d[None]
    mid_idx = np.arange(phantom.n_patterns) * 3 + 1
    if middle is None:
        middle = middle_wire_points_mm(pts, phantom)
    err_mid = ph[:, mid_idx] - middle
    if residual == "middle":
        return err_mid
    side_idx = np.setdiff1d(np.arange(phantom.n_wires), mid_idx)
    # Side wires: where the wire crosses the current image plane.
    ax = (pose_rot @ m[:3, 0]) @ yr
    ay = (pose_rot @ m[:3, 1]) @ yr
    normal = np.cross(ax, ay)
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    origin = ph[:, mid_idx].mean(axis=1)
    ps, ds = phantom.wire_front_mm[side_idx], phantom.wire_directions[side_idx]
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.einsum("fk,fwk->fw", normal, origin[:, None] - ps[None]) / (normal @ ds.T)
    crossing = ps[None] + t[..., None] * ds[None]
    return np.concatenate([err_mid, ph[:, side_idx] - crossing], axis=1)


def _frame_errors(pts, poses, m, y, phantom, residual, middle=None) -> np.ndarray:
    """Per-frame RMS of the dots' 3D errors (f,), mm."""
    e = _point_errors(pts, poses, m, y, phantom, residual, middle)
    return np.sqrt(np.mean(np.sum(e * e, axis=-1), axis=-1))


WEIGHTINGS = ("none", "noise")
"""LM residual weightings: ``"none"`` (every mm counts the same, the paper; the default) and
``"noise"`` (each residual component in the frame's image axes divided by its RMS, estimated from
an unweighted fit; see :func:`residual_sigmas_mm`).

Measured (issue 4; RANSAC+LM, known phantom pose): on PLUS's fCal 2.0 calibration recording the
residual RMS is 0.34 / 0.15 / 0.45 mm (lateral / axial / out of plane) for the diagonal wires and
0.34 / 0.19 mm for the side wires. ``"noise"`` lowers the 5-block cross-validation error of that
recording from 0.549 to 0.544 mm (paired z = 4.3) and the simulated target error under 0.3 / 0.1 mm
dot noise (linear 0.094 -> 0.075 mm, convex 0.119 -> 0.087 mm), but the validation recording's
error rises from 0.515 to 0.521 mm, so it is opt-in."""

#: Components whose RMS is below this fraction of the largest are not down-weighted further (the
#: side-wire residual has no out-of-plane component; its RMS is zero).
_SIGMA_FLOOR_FRACTION = 1e-3


def _check_weighting(weighting: str) -> None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting: expected one of {', '.join(WEIGHTINGS)}, got {weighting!r}")


def _image_axes(poses, m, y):
    """Unit image axes (lateral x, axial y, plane normal) of each frame in the Phantom frame: (f, 3, 3)."""
    rot = np.swapaxes(poses[:, :3, :3], 1, 2) @ y[:3, :3]  # its transpose maps Probe to Phantom directions
    ax = np.einsum("fji,j->fi", rot, m[:3, 0])
    ay = np.einsum("fji,j->fi", rot, m[:3, 1])
    ax /= np.linalg.norm(ax, axis=1, keepdims=True)
    ay /= np.linalg.norm(ay, axis=1, keepdims=True)
    return np.stack([ax, ay, np.cross(ax, ay)], axis=1)


def _wire_groups(phantom: NWirePhantom) -> np.ndarray:
    """(n_wires,) int: 0 for the diagonal (middle) wires, 1 for the side wires."""
    groups = np.ones(phantom.n_wires, dtype=int)
    groups[np.arange(phantom.n_patterns) * 3 + 1] = 0
    return groups


def _residual_rows(phantom: NWirePhantom, residual: str) -> np.ndarray:
    """Wire group of each row of :func:`_point_errors`' second axis."""
    groups = _wire_groups(phantom)
    if residual == "wires":
        return groups
    mid = np.zeros(phantom.n_patterns, dtype=int)
    return mid if residual == "middle" else np.concatenate([mid, np.ones(phantom.n_wires - phantom.n_patterns, int)])


def _image_components(pts, poses, m, y, phantom, residual, middle=None) -> np.ndarray:
    """The dots' 3D errors in each frame's image axes (lateral, axial, normal): (f, rows, 3), mm."""
    e = _point_errors(pts, poses, m, y, phantom, residual, middle)
    return np.einsum("fwk,fak->fwa", e, _image_axes(poses, m, y))


def _group_sigmas(comp: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(2, 3) RMS of image-axis components (f, rows, 3) for diagonal (0) and side (1) wire rows; NaN if absent."""
    out = np.full((2, 3), np.nan)
    for g in (0, 1):
        if np.any(rows == g):
            out[g] = np.sqrt(np.mean(comp[:, rows == g] ** 2, axis=(0, 1)))
    return out


def residual_sigmas_mm(points_px, probe_to_reference, image_to_probe, phantom_to_reference, phantom: NWirePhantom, *,
                       residual: str = "correspondences") -> np.ndarray:
    """RMS of the LM residual along the image axes, for diagonal and side wires.

    The residual vectors of :data:`RESIDUALS` (Phantom frame) are rotated into each frame's
    image axes: lateral (image x, across the beam), axial (image y, along the beam) and out of
    plane. Their RMS over all frames is the noise level that ``weighting="noise"`` divides by.

    Parameters
    ----------
    points_px : (n_frames, n_wires, 2) float
        Dots, pixels, MF image; frames with NaN dots or poses are skipped.
    probe_to_reference : (n_frames, 4, 4) float
    image_to_probe, phantom_to_reference : (4, 4) float
        The calibration the residuals are taken at (e.g. an unweighted fit).
    phantom : NWirePhantom
    residual : str
        One of :data:`RESIDUALS`.

    Returns
    -------
    (2, 3) float64, mm
        Rows: diagonal (middle) wires, side wires; columns: lateral, axial, out of plane. A
        row is NaN when the residual has no such wires (``"middle"``: no side-wire row).

    Raises
    ------
    ValueError
        Unknown ``residual`` or mismatched shapes.
    CalibrationError
        No frame with all dots and a pose.
    """
    if residual not in RESIDUALS:
        raise ValueError(f"residual: expected one of {', '.join(RESIDUALS)}, got {residual!r}")
    pts, poses, usable = _check_inputs(points_px, probe_to_reference, phantom)
    if not usable.any():
        raise CalibrationError("residual_sigmas_mm: no frame has all dots detected and a valid pose")
    comp = _image_components(pts[usable], poses[usable], np.asarray(image_to_probe, float),
                             np.asarray(phantom_to_reference, float), phantom, residual)
    return _group_sigmas(comp, _residual_rows(phantom, residual))


def _component_weights(sigmas: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(rows, 3) inverse noise levels, scaled so that a residual of the median level keeps its mm size."""
    s = np.asarray(sigmas, dtype=np.float64)[rows]
    finite = s[np.isfinite(s)]
    floor = _SIGMA_FLOOR_FRACTION * float(finite.max()) if finite.size else 1.0
    s = np.where(np.isfinite(s), np.maximum(s, floor), 1.0)
    return float(np.median(s)) / s


def _lm(pts, poses, phantom, x0_i2p, y0, estimate, max_nfev, loss="linear", residual="correspondences",
        weighting="none"):
    """LM over ImageToProbe (and PhantomToReference); returns (m, y, rms_mm, nfev, sigmas or None)."""
    if residual not in RESIDUALS:
        raise ValueError(f"residual: expected one of {', '.join(RESIDUALS)}, got {residual!r}")
    _check_weighting(weighting)
    middle = middle_wire_points_mm(pts, phantom)
    rows = _residual_rows(phantom, residual)

    def unpack(p):
        m = image_to_probe_from_params(p[:8])
        y = rigid_from_params(p[8:14]) if estimate else y0
        return m, y

    def solve(x0, weights):
        def residuals(p):
            m, y = unpack(p)
            if weights is None:
                return _point_errors(pts, poses, m, y, phantom, residual, middle).ravel()
            return (_image_components(pts, poses, m, y, phantom, residual, middle) * weights).ravel()

        method = "lm" if loss == "linear" else "trf"
        sol = least_squares(residuals, x0, method=method, loss=loss, x_scale="jac", max_nfev=max_nfev,
                            xtol=1e-12, ftol=1e-12, gtol=1e-12)
        return sol.x, int(sol.nfev)

    x0 = params_from_image_to_probe(x0_i2p)
    if estimate:
        x0 = np.concatenate([x0, params_from_rigid(y0)])
    x, nfev = solve(x0, None)
    sigmas = None
    if weighting == "noise":
        # One re-weighting pass: the noise levels of the unweighted fit's residuals, then the
        # maximum-likelihood fit under that (per-axis, per-wire-group) noise model.
        m, y = unpack(x)
        sigmas = _group_sigmas(_image_components(pts, poses, m, y, phantom, residual, middle), rows)
        x, nfev2 = solve(x, _component_weights(sigmas, rows))
        nfev += nfev2
    m, y = unpack(x)
    rms = float(np.sqrt(np.mean(_frame_errors(pts, poses, m, y, phantom, residual, middle) ** 2)))
    return m, y, rms, nfev, sigmas


def calibrate_lm(points_px, probe_to_reference, phantom: NWirePhantom, *, phantom_to_reference=None,
                 estimate_phantom_pose: bool | None = None, init_image_to_probe=None, init_phantom_to_reference=None,
                 frames=None, max_nfev: int = 200, loss: str = "linear",
                 residual: str = "correspondences", weighting: str = "none") -> SolverSolution:
    """Levenberg-Marquardt calibration minimising the dots' 3D errors in the Phantom frame.

    Parameters
    ----------
    points_px : (n_frames, n_wires, 2) float
    probe_to_reference : (n_frames, 4, 4) float
    phantom : NWirePhantom
    phantom_to_reference : (4, 4) float, optional
        Known phantom registration; required unless ``estimate_phantom_pose``.
    estimate_phantom_pose : bool, optional
        Optimise PhantomToReference too (14 parameters). Default: True when no
        ``phantom_to_reference`` is given.
    init_image_to_probe, init_phantom_to_reference : (4, 4) float, optional
        Start values; by default :func:`calibrate_linear` (pose known; its inlier frames are
        used) or :func:`closed_form_initialisation` (pose estimated).
    frames : (n_frames,) bool, optional
        Restrict the fit to these frames.
    max_nfev : int
        Function evaluation limit of ``least_squares``.
    loss : str
        ``"linear"`` (plain LM, the paper) or a robust loss of ``least_squares`` (uses "trf").
    residual : str
        One of :data:`RESIDUALS` (default ``"correspondences"``, the paper's).
    weighting : str
        One of :data:`WEIGHTINGS`. ``"noise"``: after the plain fit, divide each residual
        component in the image axes (lateral, axial, out of plane; diagonal and side wires
        apart) by its RMS (:func:`residual_sigmas_mm`) and fit again.

    Returns
    -------
    SolverSolution
        With ``weighting="noise"``, ``info["residual_sigmas_mm"]`` holds the (2, 3) noise levels
        used (rows diagonal / side wires, columns lateral / axial / out of plane).
    """
    _check_weighting(weighting)
    pts, poses, usable = _check_inputs(points_px, probe_to_reference, phantom)
    if frames is not None:
        usable &= np.asarray(frames, dtype=bool)
    estimate = (phantom_to_reference is None) if estimate_phantom_pose is None else bool(estimate_phantom_pose)
    if not estimate and phantom_to_reference is None:
        raise CalibrationError("LM with a known phantom pose needs phantom_to_reference (PhantomToReference)")
    _require_frames(int(usable.sum()), "LM calibration")
    x0 = init_image_to_probe
    y0 = init_phantom_to_reference if init_phantom_to_reference is not None else phantom_to_reference
    if x0 is None or (estimate and y0 is None):
        if estimate:
            cx, cy = closed_form_initialisation(np.where(usable[:, None, None], pts, np.nan), poses, phantom)
            x0 = cx if x0 is None else x0
            y0 = cy if y0 is None else y0
        else:
            lin = calibrate_linear(np.where(usable[:, None, None], pts, np.nan), poses, phantom_to_reference, phantom)
            x0 = lin.image_to_probe
    m, y, rms, nfev, sigmas = _lm(pts[usable], poses[usable], phantom, np.asarray(x0, float),
                                  np.asarray(y0, float), estimate, max_nfev, loss, residual, weighting)
    logger.info("LM calibration (%s phantom pose): %d frames, RMS dot error %.3f mm, %d evaluations",
                "estimated" if estimate else "known", usable.sum(), rms, nfev)
    info = {"weighting": weighting}
    if sigmas is not None:
        info["residual_sigmas_mm"] = sigmas
    return SolverSolution(m, y, usable, "lm", "estimated" if estimate else "known", rms, nfev, info)


# --------------------------------------------------------------------------------------------
# RANSAC + LM
# --------------------------------------------------------------------------------------------


def _affine_from_middle(pts, poses, y, phantom, idx):
    middle = middle_wire_points_mm(pts[idx], phantom)
    phantom_to_probe = _invert_rigid(poses[idx]) @ y
    mid = np.einsum("fij,fkj->fki", phantom_to_probe[:, :3, :3], middle) + phantom_to_probe[:, None, :3, 3]
    img = pts[idx][:, 1::3, :].reshape(-1, 2)
    a = np.column_stack([img, np.ones(len(img))])
    coef, *_ = np.linalg.lstsq(a, mid.reshape(-1, 3), rcond=None)
    m = np.eye(4)
    m[:3, 0], m[:3, 1], m[:3, 3] = coef[0], coef[1], coef[2]
    return complete_image_to_probe(m)


def calibrate_ransac_lm(points_px, probe_to_reference, phantom: NWirePhantom, *, phantom_to_reference=None,
                        estimate_phantom_pose: bool | None = None, n_iterations: int = 3000, subset_size: int = 10,
                        threshold_mm: float = 0.5, seed: int = 0, max_nfev: int = 200,
                        residual: str = "correspondences", adaptive_threshold: bool = True,
                        weighting: str = "none") -> SolverSolution:
    """RANSAC over frames around the closed-form solution, then LM on the inliers.

    Each iteration draws ``subset_size`` frames, solves in closed form (linear least squares
    of the middle-wire points when the phantom pose is known, hand-eye otherwise) and counts
    the frames whose RMS dot error (of the ``residual`` type) is below ``threshold_mm``. The largest
    consensus (ties: lower mean error) is refined by LM, re-scored with the refined model, and
    refined again on the final inliers.

    Parameters
    ----------
    n_iterations, subset_size, threshold_mm :
        Paper defaults 3000, 10, 0.5 mm.
    seed : int
        Seed of ``numpy.random.default_rng``: same seed, same result.
    residual : str
        Error of a frame and of the LM refinement, one of :data:`RESIDUALS`.
    adaptive_threshold : bool
        After the consensus search, raise the inlier threshold to 2.5 times the median frame
        error of the best hypothesis when that is larger. The paper's 0.5 mm suits data whose
        frame errors are well below it; on data with ~0.5 mm noise (PLUS's fCal 2.0 recording)
        a fixed 0.5 mm would discard half of the good frames.
    weighting : str
        Residual weighting of the LM refinements (:data:`WEIGHTINGS`, see :func:`calibrate_lm`);
        the consensus search and the inlier scores stay unweighted (mm).

    Returns
    -------
    SolverSolution
        ``info`` holds ``ransac_inliers`` (consensus size at ``threshold_mm``),
        ``ransac_best_iteration``, ``threshold_mm`` (the final inlier threshold), ``weighting``
        and, with ``weighting="noise"``, ``residual_sigmas_mm`` of the last refinement.
    """
    _check_weighting(weighting)
    pts, poses, usable = _check_inputs(points_px, probe_to_reference, phantom)
    estimate = (phantom_to_reference is None) if estimate_phantom_pose is None else bool(estimate_phantom_pose)
    if not estimate and phantom_to_reference is None:
        raise CalibrationError("RANSAC with a known phantom pose needs phantom_to_reference (PhantomToReference)")
    if subset_size < 3:
        raise ValueError(f"subset_size: expected >= 3 frames, got {subset_size}")
    if threshold_mm <= 0:
        raise ValueError(f"threshold_mm: expected a positive distance in mm, got {threshold_mm}")
    rigid = spacing = None
    if estimate:
        if phantom.n_patterns < 3:
            raise CalibrationError(
                f"estimating the phantom pose needs >= 3 N-wires ({phantom.name} has {phantom.n_patterns}); "
                "use --phantom-pose known with a PhantomToReference registration"
            )
        rigid, spacing, ok = _per_frame_image_to_phantom(pts, phantom)
        usable &= ok
    candidates = np.flatnonzero(usable)
    _require_frames(candidates.size, "RANSAC calibration")
    k = min(subset_size, candidates.size)
    rng = np.random.default_rng(seed)
    y_known = None if estimate else np.asarray(phantom_to_reference, dtype=np.float64)
    if residual not in RESIDUALS:
        raise ValueError(f"residual: expected one of {', '.join(RESIDUALS)}, got {residual!r}")
    pts_c, poses_c = pts[candidates], poses[candidates]
    middle_c = middle_wire_points_mm(pts_c, phantom)

    def frame_errors(m, y):
        return _frame_errors(pts_c, poses_c, m, y, phantom, residual, middle_c)

    best = (-1, np.inf, None, -1)
    for it in range(n_iterations):
        sub = rng.choice(candidates, size=k, replace=False)
        try:
            if estimate:
                m, y = _closed_form_from_fits(poses, rigid, spacing, sub)
            else:
                m, y = _affine_from_middle(pts, poses, y_known, phantom, sub), y_known
        except (CalibrationError, np.linalg.LinAlgError, ValueError):
            continue
        err = frame_errors(m, y)
        inl = err < threshold_mm
        n_in = int(inl.sum())
        score = float(np.mean(np.minimum(err, threshold_mm)))
        if n_in > best[0] or (n_in == best[0] and score < best[1]):
            best = (n_in, score, (m, y), it)
    if best[2] is None:
        raise CalibrationError("RANSAC found no valid hypothesis; the frames are degenerate (no pose diversity?)")
    m, y = best[2]
    inliers = np.zeros(pts.shape[0], dtype=bool)
    err = frame_errors(m, y)
    if adaptive_threshold:
        threshold_mm = max(threshold_mm, 2.5 * float(np.median(err)))
    inliers[candidates[err < threshold_mm]] = True
    if inliers.sum() < MIN_CALIBRATION_FRAMES:
        # Too strict a threshold for this data: keep the best half rather than fail.
        order = np.argsort(err)
        inliers[:] = False
        inliers[candidates[order[: max(MIN_CALIBRATION_FRAMES, candidates.size // 2)]]] = True
        logger.warning("RANSAC: fewer than %d frames within %.2f mm; using the best %d frames",
                       MIN_CALIBRATION_FRAMES, threshold_mm, inliers.sum())
    total_nfev = 0
    for _ in range(2):
        m, y, rms, nfev, sigmas = _lm(pts[inliers], poses[inliers], phantom, m, y, estimate, max_nfev, "linear",
                                      residual, weighting)
        total_nfev += nfev
        err = frame_errors(m, y)
        new = np.zeros_like(inliers)
        new[candidates[err < threshold_mm]] = True
        if new.sum() < MIN_CALIBRATION_FRAMES or np.array_equal(new, inliers):
            break
        inliers = new
    logger.info("RANSAC+LM: %d/%d inlier frames (best hypothesis at iteration %d), RMS %.3f mm",
                inliers.sum(), candidates.size, best[3], rms)
    info = {"ransac_inliers": int(best[0]), "ransac_best_iteration": int(best[3]),
            "frames_candidate": int(candidates.size), "threshold_mm": float(threshold_mm), "weighting": weighting}
    if sigmas is not None:
        info["residual_sigmas_mm"] = sigmas
    return SolverSolution(m, y, inliers, "ransac-lm", "estimated" if estimate else "known", rms, total_nfev, info)
