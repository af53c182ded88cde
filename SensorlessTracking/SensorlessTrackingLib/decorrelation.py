"""Speckle decorrelation tracking: the physics baseline (no learning).

For fully developed speckle the intensity correlation between two parallel image planes ``d``
apart follows ``rho_I(d) = exp(-d^2 / (2 sigma^2))`` (``sigma`` = the elevational beam sigma).
B-mode frames are log-compressed; for speckle, the correlation of ``log I`` is
``rho_log = Li2(rho_I) / Li2(1)`` (``Li2`` the dilogarithm), which is inverted here. So per pair
of consecutive frames:

1. in-plane motion: normalised cross-correlation search of patches (a 3 x 3 grid) between the
   two frames, sub-pixel peak -> a rigid 2D fit (x, y shift and rotation about the normal);
2. out-of-plane motion: each patch's correlation peak (its in-plane-aligned correlation) ->
   ``rho_I`` -> elevational distance ``d = sigma sqrt(-2 ln rho_I)``; a line fitted across the
   image width gives the elevational translation and the turn about the image's vertical axis
   (``out_of_plane_rotations`` selects a plane, a line or the median).

Decorrelation gives ``|d|`` only: the sweep direction (``direction``: +1 = towards the image
normal ``+z``) is an assumption, as in every decorrelation method. ``sigma_mm`` is the calibrated
curve: :func:`calibrate_decorrelation` fits it (and the direction) on tracked sequences.

Output is frame-to-frame poses in the image-mm frame centred on the image (see :mod:`.pose`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from .conventions import column_mirror, image_handedness
from .pose import absolute_to_frame_to_frame, image_mm_poses, matrices_to_params, trajectory_from_frame_to_frame

__all__ = [
    "DecorrelationConfig",
    "log_to_intensity_correlation",
    "estimate_frame_to_frame",
    "calibrate_decorrelation",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecorrelationConfig:
    """Settings of the decorrelation tracker.

    Attributes
    ----------
    sigma_mm : sigma of the calibrated decorrelation curve (elevational beam sigma), mm
    direction : +1 or -1, the assumed sweep direction along the image normal
    patches : patches per side (a ``patches x patches`` grid over the central image)
    coverage : fraction of the image width/height the patch grid covers
    min_correlation, max_correlation : clip of the intensity correlation (sets the largest and
        smallest distance one pair can report)
    max_shift_mm : largest in-plane motion between two frames searched for
    out_of_plane_rotations : which out-of-plane rotations the patch distances are fitted with:
        ``"both"`` (a plane: rotation about the image x and y axes), ``"lateral"`` (only the
        rotation about the image's vertical axis, from the left-right change of the distances:
        a sweep that turns), or ``"none"`` (the median distance alone). Layered tissue biases
        patch correlations with depth (a layer that persists makes its patches look closer), and
        the spurious fanning this fits accumulates into drift, so ``"lateral"`` is the default.
    """

    sigma_mm: float = 0.75
    direction: int = -1
    patches: int = 3
    coverage: float = 0.8
    min_correlation: float = 0.02
    max_correlation: float = 0.999
    max_shift_mm: float = 1.5
    out_of_plane_rotations: str = "lateral"

    def __post_init__(self):
        if not self.sigma_mm > 0:
            raise ValueError(f"DecorrelationConfig.sigma_mm must be positive, got {self.sigma_mm}")
        if self.direction not in (-1, 1):
            raise ValueError(f"DecorrelationConfig.direction must be +1 or -1, got {self.direction}")
        if self.out_of_plane_rotations not in ("both", "lateral", "none"):
            raise ValueError(
                "DecorrelationConfig.out_of_plane_rotations must be 'both', 'lateral' or 'none', "
                f"got {self.out_of_plane_rotations!r}"
            )
        if int(self.patches) < 2:
            raise ValueError(f"DecorrelationConfig.patches must be >= 2, got {self.patches}")

    def to_dict(self) -> dict:
        return asdict(self)


def _dilog(x: np.ndarray, terms: int = 400) -> np.ndarray:
    k = np.arange(1, terms + 1, dtype=np.float64)
    x = np.asarray(x, dtype=np.float64)
    return (x[..., None] ** k / k**2).sum(axis=-1)


_RHO_I = np.linspace(0.0, 1.0, 2001)
_RHO_LOG = _dilog(_RHO_I) / (math.pi**2 / 6.0)


def log_to_intensity_correlation(rho_log) -> np.ndarray:
    """Invert ``rho_log = Li2(rho_I) / Li2(1)`` (log-compressed -> intensity correlation)."""
    return np.interp(np.clip(rho_log, 0.0, 1.0), _RHO_LOG, _RHO_I)


def _patch_boxes(shape, cfg: DecorrelationConfig, search_px: int):
    """Tiles of the patch size (``coverage / patches`` of the image side) over the whole image,
    keeping ``search_px`` pixels of margin; callers drop the tiles outside the image content."""
    rows, cols = shape
    n = int(cfg.patches)
    ph = int(min(rows * cfg.coverage, rows - 2 * search_px) / n)
    pw = int(min(cols * cfg.coverage, cols - 2 * search_px) / n)
    if ph < 8 or pw < 8:
        raise ValueError(f"frames of {rows}x{cols} pixels are too small for {n}x{n} patches and a {search_px} px search")
    n_r = (rows - 2 * search_px) // ph
    n_c = (cols - 2 * search_px) // pw
    y0 = (rows - n_r * ph) // 2
    x0 = (cols - n_c * pw) // 2
    return [(y0 + a * ph, x0 + b * pw, ph, pw) for a in range(n_r) for b in range(n_c)]


def _subpixel(v_m, v_0, v_p) -> float:
    den = v_m - 2.0 * v_0 + v_p
    return 0.0 if den >= 0 else float(np.clip(0.5 * (v_m - v_p) / den, -0.5, 0.5))


def _match(prev, cur, box, r):
    """Normalised cross-correlation search: shift (dx, dy) of the patch content from ``prev``
    to ``cur`` (sub-pixel) and the correlation at the best integer shift."""
    y, x, h, w = box
    a = prev[y : y + h, x : x + w]
    search = cur[y - r : y + h + r, x - r : x + w + r]
    res = cv2.matchTemplate(search, a, cv2.TM_CCOEFF_NORMED)
    iy, ix = np.unravel_index(int(np.argmax(res)), res.shape)
    rho = float(res[iy, ix])
    dy = iy - r + (_subpixel(res[iy - 1, ix], rho, res[iy + 1, ix]) if 0 < iy < res.shape[0] - 1 else 0.0)
    dx = ix - r + (_subpixel(res[iy, ix - 1], rho, res[iy, ix + 1]) if 0 < ix < res.shape[1] - 1 else 0.0)
    return dx, dy, rho


def _pair(prev: np.ndarray, cur: np.ndarray, boxes, r, spacing, centre, cfg):
    """Frame-to-frame parameters (6,) of ``cur`` -> ``prev`` (see module docstring)."""
    sx, sy = spacing
    pts, shifts, dists = [], [], []
    for box in boxes:
        y, x, h, w = box
        dx, dy, rho = _match(prev, cur, box, r)
        if not math.isfinite(rho):  # a constant patch
            rho = 0.0
        rho_i = float(np.clip(log_to_intensity_correlation(rho), cfg.min_correlation, cfg.max_correlation))
        dists.append(cfg.sigma_mm * math.sqrt(-2.0 * math.log(rho_i)))
        pts.append(((x + w / 2.0 - centre[0]) * sx, (y + h / 2.0 - centre[1]) * sy))
        shifts.append((dx * sx, dy * sy))
    pts = np.asarray(pts)
    shifts = np.asarray(shifts)
    dists = cfg.direction * np.asarray(dists)
    # In-plane: s(p) = s0 + theta * (-y, x)  (least squares, small angle)
    n = len(pts)
    a_mat = np.zeros((2 * n, 3))
    a_mat[0::2, 0] = 1.0
    a_mat[1::2, 1] = 1.0
    a_mat[0::2, 2] = -pts[:, 1]
    a_mat[1::2, 2] = pts[:, 0]
    sol, *_ = np.linalg.lstsq(a_mat, shifts.reshape(-1), rcond=None)
    s0x, s0y, theta = sol
    # Out of plane: d(x, y) = tz + wx * y - wy * x  (frame cur -> prev)
    if cfg.out_of_plane_rotations == "both":
        b_mat = np.stack([np.ones(n), pts[:, 1], -pts[:, 0]], axis=1)
        (tz, wx, wy), *_ = np.linalg.lstsq(b_mat, dists, rcond=None)
    elif cfg.out_of_plane_rotations == "lateral":
        b_mat = np.stack([np.ones(n), -pts[:, 0]], axis=1)
        (tz, wy), *_ = np.linalg.lstsq(b_mat, dists, rcond=None)
        wx = 0.0
    else:
        tz, wx, wy = float(np.median(dists)), 0.0, 0.0
    # A point that moved by +s in the image sits at p - s in the previous frame's coordinates.
    return np.array([-s0x, -s0y, tz, math.degrees(wx), math.degrees(wy), -math.degrees(theta)])


def estimate_frame_to_frame(frames, spacing_mm, config: DecorrelationConfig | None = None, *, progress=None) -> np.ndarray:
    """Frame-to-frame poses of a sweep from speckle decorrelation.

    Parameters
    ----------
    frames : (n, rows, cols) uint8 or float, B-mode (log-compressed), MF
    spacing_mm : (sx, sy) pixel spacing
    config : DecorrelationConfig (default: the built-in calibration)
    progress : optional ``progress(done, total)``

    Returns
    -------
    (n - 1, 6) float64 frame-to-frame parameters (mm, degrees) in the image-mm frame centred
    on pixel ``((cols - 1) / 2, (rows - 1) / 2)``

    Raises
    ------
    ValueError
        Fewer than 2 frames, or frames that are not a (n, rows, cols) stack.
    """
    cfg = config or DecorrelationConfig()
    f = np.asarray(frames)
    if f.ndim != 3:
        raise ValueError(f"frames must be (n_frames, rows, cols), got shape {f.shape}")
    if f.shape[0] < 2:
        raise ValueError(f"decorrelation tracking needs at least 2 frames, got {f.shape[0]}")
    rows, cols = f.shape[1:]
    spacing = tuple(float(v) for v in spacing_mm)
    r = max(2, int(math.ceil(cfg.max_shift_mm / min(spacing))))
    # Only patches inside the field of view (a convex probe's sector leaves black corners, where
    # a constant patch would look perfectly correlated = not moving); smaller patches when the
    # default ones do not fit.
    seen = (f[:: max(1, f.shape[0] // 10)] > 0).mean(axis=0) > 0.5
    boxes = None
    for refine in (1, 2, 3):
        try:
            tiles = _patch_boxes((rows, cols), DecorrelationConfig(**{**cfg.to_dict(), "patches": cfg.patches * refine}), r)
        except ValueError:
            break
        inside = [b for b in tiles if seen[b[0] : b[0] + b[2], b[1] : b[1] + b[3]].mean() >= 0.95]
        if len(inside) >= 4:
            boxes = inside
            break
    if boxes is None:
        log.warning("decorrelation: fewer than 4 patches lie inside the image content; using all")
        boxes = _patch_boxes((rows, cols), cfg, r)
    centre = ((cols - 1) / 2.0, (rows - 1) / 2.0)
    out = np.empty((f.shape[0] - 1, 6))
    prev = f[0].astype(np.float32)
    for i in range(1, f.shape[0]):
        cur = f[i].astype(np.float32)
        out[i - 1] = _pair(prev, cur, boxes, r, spacing, centre, cfg)
        prev = cur
        if progress is not None:
            progress(i, f.shape[0] - 1)
    return out


def calibrate_decorrelation(
    sequences, *, base: DecorrelationConfig | None = None, choose_rotations: bool = True
) -> DecorrelationConfig:
    """Fit the decorrelation curve (``sigma_mm``), the sweep ``direction`` and, with
    ``choose_rotations``, the ``out_of_plane_rotations`` mode on tracked sweeps.

    Parameters
    ----------
    sequences : iterable of ``(frames (n, rows, cols), image_to_reference (n, 4, 4), spacing_mm)``
    base : settings to start from
    choose_rotations : try "none", "lateral" and "both" and keep the one with the lowest median
        final drift on these sweeps (else keep ``base``'s)

    The estimated elevational translations scale with ``sigma_mm``, so the best sigma is the
    least-squares ratio between the true and the unit-sigma estimates of ``|tz|``; the direction
    is the sign of the true mean ``tz`` over all sweeps. The rotation mode is chosen on each
    sweep's final drift with its own direction, so sweeps in both directions can be mixed.
    """
    from .metrics import tracking_metrics

    cfg = base or DecorrelationConfig()
    data = []
    for frames, image_to_reference, spacing in sequences:
        frames = np.asarray(frames)
        rows, cols = frames.shape[1:3]
        itr = np.asarray(image_to_reference, dtype=np.float64)
        if image_handedness(itr) < 0:  # a mirrored calibration: its right-handed equivalent (:mod:`.conventions`)
            frames = np.ascontiguousarray(frames[:, :, ::-1])
            itr = itr @ column_mirror(cols)
        truth = matrices_to_params(absolute_to_frame_to_frame(image_mm_poses(itr, spacing, ((cols - 1) / 2, (rows - 1) / 2))))
        data.append((frames, itr, tuple(spacing), truth))
    if not data:
        raise ValueError("calibrate_decorrelation: no sequences given")
    direction = 1 if sum(float(t[:, 2].sum()) for *_, t in data) >= 0 else -1
    # each sweep is scored in its own direction (a user states it when estimating), so sweeps in
    # both directions calibrate one curve
    directions = [1 if float(t[:, 2].sum()) >= 0 else -1 for *_, t in data]
    modes = ("none", "lateral", "both") if choose_rotations else (cfg.out_of_plane_rotations,)
    best = None
    for mode in modes:
        unit = DecorrelationConfig(**{**cfg.to_dict(), "sigma_mm": 1.0, "direction": 1, "out_of_plane_rotations": mode})
        estimates = [estimate_frame_to_frame(frames, spacing, unit) for frames, _, spacing, _ in data]
        num = sum(float(np.abs(t[:, 2]) @ np.abs(e[:, 2])) for (*_, t), e in zip(data, estimates))
        den = sum(float(np.abs(e[:, 2]) @ np.abs(e[:, 2])) for e in estimates)
        if den <= 0:
            continue
        sigma = num / den
        drifts = []
        for (frames, itr, spacing, _), e, sign in zip(data, estimates, directions):
            e = e.copy()
            e[:, 2:5] *= sign * sigma  # tz and the tilts come from the signed distances
            est = trajectory_from_frame_to_frame(e, spacing, frames.shape[1:3], itr[0])
            drifts.append(tracking_metrics(itr, est, frames.shape[1:3]).fdr_path_percent)
        score = float(np.nanmedian(drifts))
        log.info("decorrelation calibration: %s rotations, sigma %.3f mm, median final drift %.1f %%", mode, sigma, score)
        if best is None or score < best[0]:
            best = (score, mode, sigma)
    if best is None:
        raise ValueError("calibrate_decorrelation: no usable frame pairs")
    _, mode, sigma = best
    return DecorrelationConfig(
        **{**cfg.to_dict(), "sigma_mm": sigma, "direction": direction, "out_of_plane_rotations": mode}
    )
