"""Wire-echo detection of Liu et al. 2025: directional top-hat, scale-space Hessian, N-wire prior.

Per image (MF, grey levels):

1. **Directional white top-hat** with bar structuring elements at 0/45/90/135 degrees (and,
   by default, the four directions in between): ``image - max_theta opening_theta(image)``. A wire echo is shorter than the bar in every
   direction and survives; elongated reflections (phantom walls, the water-tank bottom) fit
   the bar in their own direction and are removed.
2. **Scale-space Hessian**: the scale-normalised determinant ``sigma^4 (Lxx Lyy - Lxy^2)`` of
   bright blobs (``Lxx + Lyy < 0``), maximum over scales chosen from the expected echo size and
   the pixel spacing.
3. **Threshold** at ``0.04 x`` the frame's maximum response and **8-connected non-maximum
   suppression** give the dot candidates; candidates must also stand out of a ring around them
   (``min_prominence``), which rejects speckle grains. The threshold applies to the square root of the
   determinant (linear in echo brightness): on the determinant itself a wire echo 5 times
   fainter than the brightest one (common at the edge of the beam) would fall below 0.04.
4. **N-wire geometric filtering and labeling** (:mod:`.labeling`): collinearity, parallelism,
   distance consistency, PLUS wire order.
5. **Sub-pixel centre**: in a window of radius ``refine_radius_mm`` around each labeled dot,
   the pixel with the largest 8-neighbourhood mean (of the smoothed full-resolution image) is
   the peak, refined by parabolic interpolation (:func:`refine_centres`). The smoothing can
   differ across (``refine_lateral_smoothing_mm``) and along (``refine_smoothing_mm``) the
   beam, see :class:`HessianSettings`. By default (``refine_model="adaptive"``,
   :meth:`HessianDetector.refine_adaptive`) an anisotropic 2D Gaussian is then fitted to the echo
   on the unsmoothed image, its saturated pixels censored (:func:`fit_clipped_gaussian_centres`),
   in a window sized from the echo's own fitted width, and replaces the peak where the
   background noise around the echo (:func:`background_noise`) would move the peak by more
   than ``refine_noise_error_px``; on a noise-free background (a water tank) the peak is kept.
   ``"peak"`` stops at the peak; ``"clipped-gaussian"`` always takes a fit in the fixed
   ``refine_fit_window_mm`` window.

All sizes are in mm and converted with the pixel spacing, so the defaults carry across depths.
Images are processed at about ``processing_spacing_mm`` per pixel (integer down-sampling) for
speed; the sub-pixel centre uses the full-resolution image.
"""

from __future__ import annotations

import logging
import numbers
from dataclasses import dataclass, field

import cv2
import numpy as np

from .errors import DetectionError
from .labeling import LabelingSettings, label_dots, pose_residual_mm
from .phantom import NWirePhantom
from .results import FrameDetection

__all__ = ["REFINE_MODELS", "HessianSettings", "HessianDetector", "directional_tophat", "hessian_blob_response",
           "bar_kernel", "refine_centres", "fit_clipped_gaussian_centres", "background_noise", "clip_level_of"]

logger = logging.getLogger(__name__)

#: Sub-pixel centre estimators of :class:`HessianSettings` (``refine_model``).
REFINE_MODELS = ("adaptive", "peak", "clipped-gaussian")
#: ``refine_clip_level=None``: pixels this many grey levels below the frame's maximum count as clipped.
AUTO_CLIP_MARGIN = 2.0


@dataclass(frozen=True)
class HessianSettings:
    """Parameters of the Hessian detector (paper defaults; sizes in mm).

    Attributes
    ----------
    echo_size_mm : float
        Expected axial size of a wire echo; the Hessian scales are ``scale_factors *
        echo_size_mm`` (as Gaussian sigma).
    scale_factors : tuple of float
        Sigmas relative to ``echo_size_mm``.
    bar_length_mm : float
        Length of the top-hat bar structuring elements: longer than a wire echo, shorter than
        the reflections to suppress.
    bar_angles_deg : tuple of float
        Bar directions. The paper uses 0/45/90/135; a wall reflection at an angle between two
        bars (more than about ``asin(thickness / bar length)`` off, ~10 deg) survives all four
        openings as a beaded line whose beads look like dots, so the default adds the four
        directions in between (every 22.5 deg).
    threshold_ratio : float
        Candidates need a response above this fraction of the frame's maximum (paper 0.04).
    max_candidates : int
        Strongest candidates passed to the geometric filter, for a phantom of up to nine wires
        (three N patterns, the fCal phantoms). A phantom with more wires gets proportionally more
        (``max_candidates * n_wires / 9``), so that each wire keeps the same allowance of
        distractors: with 40 for Lego 3.1's six patterns (18 wires), a frame-grabbed screen's
        letterbox line and text took the slots of three wires' echoes and no frame was labelled.
    min_curvature_ratio : float
        Blob shape prior: responses whose principal curvatures differ by more than this ratio
        are ridges (wall reflections at angles between the bar directions) and are dropped.
    min_prominence : float
        A candidate's response must exceed the largest response in the ring between
        ``prominence_ring_mm[0]`` and ``prominence_ring_mm[1]`` around it by this factor. Wire
        echoes stand out of their surroundings (ratio > 2.3 in simulations, > 2.9 on PLUS's
        fCal 2.0 data); speckle grains have neighbours as bright as themselves (< 1.8). This
        keeps a speckle grain from replacing a missing wire echo. 0 disables.
    prominence_ring_mm : (float, float)
        Inner and outer radius of that ring (the outer one stays below the smallest distance
        between two wire dots).
    refine_radius_mm : float
        Search radius of the sub-pixel step (paper 30 px; 1 mm here because the candidates are
        already within a processing pixel of the echo peak).
    refine_smoothing_mm : float
        Gaussian smoothing (sigma) before the sub-pixel peak search along the beam (image y, axial);
        also the lateral smoothing when ``refine_lateral_smoothing_mm`` is None.
    refine_lateral_smoothing_mm : float or None
        Gaussian smoothing (sigma) across the beam (image x, lateral) before the peak search;
        ``None`` (default) smooths isotropically with ``refine_smoothing_mm``. Wire echoes are
        wider laterally than axially and bright ones saturate in a flat top, so a lateral
        matched filter (e.g. 0.6 mm, axial staying 0.2 mm to keep the centre out of the
        reverberation tail) is the natural alternative. Measured on PLUS's fCal 2.0 data (issue 4):
        chosen on the *calibration* recording alone it lowers the 5-block cross-validated 3D
        error from 0.550 to 0.529 mm (LM, paired z = 4.9) and the simulated target error from
        0.074 to 0.067 mm, but the validation recording's error rose from 0.515 to 0.550 mm
        (its laterally saturated echoes of wire 9 move by up to 3 px), so the default stays
        isotropic until a criterion that predicts the held-out recording is found.
    refine_model : str
        Sub-pixel centre estimator, one of :data:`REFINE_MODELS`: ``"adaptive"`` (default, issue
        23: the peak, or a Gaussian fit in a window sized from the echo where the background
        noise would move the peak; :meth:`HessianDetector.refine_adaptive`), ``"peak"`` (the
        smoothed peak search above) or ``"clipped-gaussian"``: starting from the peak, an
        anisotropic Gaussian plus offset is fitted to the echo in a window of half-size
        ``refine_fit_window_mm`` with the saturated pixels censored (they only ask the model
        to reach the clip level; :func:`fit_clipped_gaussian_centres`). Where the fit fails or
        moves the centre by more than ``refine_radius_mm``, the peak is kept. Measured for
        issue 4: on PLUS's fCal 2.0 calibration recording the 5-block cross-validated 3D error
        (RANSAC+LM, best 95 %) falls from 0.549 to 0.533 mm (paired z = 4.5); in 16 simulated
        recordings (linear / convex, 5 / 10 cm, 3 seeds, plus saturated echoes) the dot error
        vs truth falls from 0.36 to 0.29 px (16 of 16) and the RANSAC+LM target error from
        0.054 to 0.049 mm. Almost all of the gain comes from the Gaussian fit itself: censoring
        the saturated pixels changes the cross-validated error by 0.0005 mm. But the held-out
        validation recording, scored once after that choice, got worse (0.515 -> 0.543 mm),
        like the lateral smoothing above. ``"adaptive"`` fits only where noise is measurable
        around the echo, which PLUS's fCal 2.0 recordings (a water tank) never have: their dots,
        frames and 0.515 mm validation error are the peak search's. Measured for issue 23
        (``bench_nwire.py --phantoms-full``, 126 simulated cases at 820 x 616 px, against the
        same code with ``"peak"``): cases with >= 99 % of dots within 1 px of the truth 41 -> 88,
        axial bias 0.2 -> 0.1 px. The lateral spread left on linear probes (0.33-0.43 px at
        0.08-0.1 mm/px) is the speckle's: a least-squares fit of the simulator's exact echo
        model (known widths, tail included) spreads 0.30-0.52 px on the same noise.
    refine_clip_level : float or None
        Grey level from which a pixel counts as saturated (``"adaptive"`` and ``"clipped-gaussian"``).
        ``None`` (default): 2 grey levels below each frame's maximum (PLUS's fCal 2.0
        recordings saturate at 249-251, not at 255).
    refine_fit_window_mm : (float, float)
        Half-width across (x, lateral) and half-height along (y, axial) the beam of the fitted
        window, mm; with ``"adaptive"`` only the first fit's (at least 2 pixels), which measures
        the echo's width. Chosen on the fCal 2.0 calibration recording's cross-validation and the
        simulations (issue 4): 1.0 x 0.6 mm; a smaller axial window (0.3 mm) loses most of the
        gain, a larger one (0.8 mm) lets the reverberation tail below the echo in.
    refine_psf_window : (float, float, float)
        ``"adaptive"``: the second fit's window in units of the echo's fitted sigmas ``(sx,
        sy)``: half-width ``k_lat sx`` across the beam, ``k_above sy`` above (towards the
        probe) and ``k_below sy`` below the centre. 2.5 sigmas across hold 99 % of a Gaussian's
        lateral extent, so the fit uses all of the echo and little background; the window stops
        1 sigma below the centre because wire echoes have reverberation tails below them (in the
        simulator 0.35 x the echo, 3.6 sigmas down, which moves a symmetric fit by ~0.2 px).
        Each window also stops halfway to the nearest other dot.
    refine_noise_error_px : float
        ``"adaptive"``: the fit replaces the peak where the peak's predicted noise shift
        ``max(sx, sy) sigma_n / A`` (sigmas and height ``A`` of the fitted echo, pixels and grey
        levels; ``sigma_n`` the robust background noise in the ``prominence_ring_mm`` ring) exceeds
        this, pixels. 0.1 px is a tenth of the 1 px accuracy asked of the centres: below it the
        peak's noise error is negligible and its freedom from a shape model wins.
    processing_spacing_mm : float
        Target pixel size of the filtering steps (images are down-sampled by an integer factor).
    border_mm : float
        Candidates this close to the image (or clip rectangle) border are dropped.
    """

    echo_size_mm: float = 1.0
    scale_factors: tuple = (0.35, 0.5, 0.7)
    bar_length_mm: float = 4.0
    bar_angles_deg: tuple = (0.0, 22.5, 45.0, 67.5, 90.0, 112.5, 135.0, 157.5)
    threshold_ratio: float = 0.04
    max_candidates: int = 40
    min_curvature_ratio: float = 0.05
    min_prominence: float = 2.0
    prominence_ring_mm: tuple = (1.5, 3.0)
    refine_radius_mm: float = 1.0
    refine_smoothing_mm: float = 0.2
    refine_lateral_smoothing_mm: float | None = None
    refine_model: str = "adaptive"
    refine_clip_level: float | None = None
    refine_fit_window_mm: tuple = (1.0, 0.6)
    refine_psf_window: tuple = (2.5, 2.0, 1.0)
    refine_noise_error_px: float = 0.1
    processing_spacing_mm: float = 0.15
    border_mm: float = 0.3

    def __post_init__(self):
        for name in ("echo_size_mm", "bar_length_mm", "refine_radius_mm", "processing_spacing_mm"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive length in mm, got {getattr(self, name)!r}")
        if not 0 < self.threshold_ratio < 1:
            raise ValueError(f"threshold_ratio: expected a fraction in (0, 1), got {self.threshold_ratio!r}")
        if not self.refine_smoothing_mm >= 0:
            raise ValueError(f"refine_smoothing_mm: expected >= 0 mm, got {self.refine_smoothing_mm!r}")
        lateral = self.refine_lateral_smoothing_mm
        if lateral is not None and not lateral >= 0:
            raise ValueError(f"refine_lateral_smoothing_mm: expected >= 0 mm or None, got {lateral!r}")
        if self.refine_model not in REFINE_MODELS:
            raise ValueError(f"refine_model: expected one of {', '.join(REFINE_MODELS)}, got {self.refine_model!r}")
        clip = self.refine_clip_level
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, numbers.Real) or not 0 < clip <= 255):
            raise ValueError(f"refine_clip_level: expected a grey level in (0, 255] or None, got {clip!r}")
        win = self.refine_fit_window_mm
        try:
            win_ok = len(win) == 2 and all(np.isfinite(float(v)) and float(v) > 0 for v in win)
        except (TypeError, ValueError):
            win_ok = False
        if not win_ok:
            raise ValueError(f"refine_fit_window_mm: expected two positive half-sizes (lateral, axial) in mm, "
                             f"got {win!r}")
        psf = self.refine_psf_window
        try:
            psf_ok = len(psf) == 3 and all(np.isfinite(float(v)) and float(v) > 0 for v in psf)
        except (TypeError, ValueError):
            psf_ok = False
        if not psf_ok:
            raise ValueError(f"refine_psf_window: expected three positive multiples of the echo's sigmas "
                             f"(lateral, above, below), got {psf!r}")
        if not (isinstance(self.refine_noise_error_px, numbers.Real) and self.refine_noise_error_px >= 0):
            raise ValueError(f"refine_noise_error_px: expected >= 0 pixels, got {self.refine_noise_error_px!r}")
        if self.max_candidates < 3:
            raise ValueError(f"max_candidates: expected at least 3, got {self.max_candidates!r}")
        if not self.scale_factors or min(self.scale_factors) <= 0:
            raise ValueError(f"scale_factors: expected positive numbers, got {self.scale_factors!r}")


def bar_kernel(length_px: int, angle_deg: float) -> np.ndarray:
    """Binary line structuring element (uint8, odd square size) at ``angle_deg`` from +x."""
    length_px = max(3, int(length_px) | 1)
    k = np.zeros((length_px, length_px), np.uint8)
    c = length_px // 2
    t = np.radians(angle_deg)
    for i in range(-c, c + 1):
        k[int(round(c - i * np.sin(t))), int(round(c + i * np.cos(t)))] = 1
    return k


def directional_tophat(image: np.ndarray, kernels) -> np.ndarray:
    """White top-hat by the union of directional openings: ``image - max_k opening_k(image)``."""
    opened = None
    for k in kernels:
        o = cv2.morphologyEx(image, cv2.MORPH_OPEN, k)
        opened = o if opened is None else cv2.max(opened, o)
    return cv2.subtract(image, opened)


def hessian_blob_response(image: np.ndarray, sigmas_px, *, min_curvature_ratio: float = 0.0) -> np.ndarray:
    """Max over scales of the scale-normalised Hessian determinant of bright blobs.

    Parameters
    ----------
    image : (h, w) float32
    sigmas_px : iterable of float
        Gaussian scales in pixels.
    min_curvature_ratio : float
        Pixels whose smaller principal curvature is below this fraction of the larger one are
        ridges (lines), not blobs, and get no response. Uses ``det / trace^2 >= r / (1 + r)^2``.

    Returns
    -------
    (h, w) float32, ``max_s sqrt(sigma^4 (Lxx Lyy - Lxy^2))`` where ``Lxx + Lyy < 0`` (else 0).
    The square root (the geometric mean of the two scale-normalised curvatures) is linear in
    the echo brightness, so the relative threshold treats faint and bright wires alike; the
    scale selection is that of the determinant.
    """
    img = np.asarray(image, dtype=np.float32)
    best = np.zeros_like(img)
    for sigma in sigmas_px:
        g = cv2.GaussianBlur(img, (0, 0), float(sigma), borderType=cv2.BORDER_REPLICATE)
        lxx = cv2.Sobel(g, cv2.CV_32F, 2, 0, ksize=3, scale=0.25, borderType=cv2.BORDER_REPLICATE)
        lyy = cv2.Sobel(g, cv2.CV_32F, 0, 2, ksize=3, scale=0.25, borderType=cv2.BORDER_REPLICATE)
        lxy = cv2.Sobel(g, cv2.CV_32F, 1, 1, ksize=3, scale=0.25, borderType=cv2.BORDER_REPLICATE)
        trace = lxx + lyy
        det = lxx * lyy - lxy * lxy
        reject = trace >= 0
        if min_curvature_ratio > 0:
            r = float(min_curvature_ratio)
            reject |= det < np.float32(r / (1.0 + r) ** 2) * trace * trace
        det *= np.float32(sigma ** 4)
        det[reject] = 0
        np.maximum(best, det, out=best)
    return np.sqrt(best)


def _to_gray(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[..., 0]
        elif img.dtype == np.uint8 and img.shape[2] in (3, 4):
            img = cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2GRAY)
        else:
            img = img.mean(axis=2)
    if img.ndim != 2:
        raise DetectionError(f"expected a 2D grey image (rows, cols), got shape {np.asarray(image).shape}")
    if img.dtype != np.uint8:
        img = np.asarray(img, dtype=np.float32)
        lo, hi = float(np.nanmin(img)), float(np.nanmax(img))
        img = np.zeros(img.shape, np.uint8) if hi <= lo else np.clip((img - lo) * (255.0 / (hi - lo)), 0, 255).astype(np.uint8)
    return img


def _parabolic_offset(lo: float, mid: float, hi: float) -> float:
    """Sub-pixel offset of a peak from three samples (parabola through them), in [-0.5, 0.5]."""
    den = lo - 2.0 * mid + hi
    if den >= 0:
        return 0.0
    return float(np.clip(0.5 * (lo - hi) / den, -0.5, 0.5))


def _smoothing_pair(smoothing_px) -> tuple[float, float]:
    """``(sigma_x, sigma_y)`` from a scalar or a pair; raises ValueError on negative or non-finite values."""
    arr = np.asarray(smoothing_px, dtype=np.float64)
    if arr.ndim > 1 or arr.size not in (1, 2):
        raise ValueError(f"smoothing_px: expected a number or (sigma_x, sigma_y) in pixels, got {smoothing_px!r}")
    sx, sy = (float(arr.ravel()[0]),) * 2 if arr.size == 1 else (float(arr[0]), float(arr[1]))
    if not (np.isfinite(sx) and np.isfinite(sy) and sx >= 0 and sy >= 0):
        raise ValueError(f"smoothing_px: expected sigmas >= 0 pixels, got {smoothing_px!r}")
    return sx, sy


def refine_centres(image: np.ndarray, points_px: np.ndarray, *, search_radius_px: float,
                   smoothing_px) -> np.ndarray:
    """Sub-pixel dot centres: 8-neighbourhood-mean peak search in a disc, parabolic interpolation.

    The image is smoothed with a Gaussian of ``smoothing_px`` (one sigma, or one per axis);
    within ``search_radius_px`` of each point the pixel with the largest 3x3 (8-neighbourhood)
    mean is the peak, refined to sub-pixel precision by a parabola through the neighbouring
    means along x and along y.

    Parameters
    ----------
    image : (h, w) uint8 or float
        Full-resolution image (MF).
    points_px : (n, 2) float
        Approximate centres (x, y), pixels.
    search_radius_px : float
        Radius of the searched disc around each point, pixels.
    smoothing_px : float or (sigma_x, sigma_y)
        Gaussian sigma(s) in pixels: one value smooths isotropically; a pair smooths across
        (x, lateral) and along (y, axial) the beam separately (see
        :attr:`HessianSettings.refine_lateral_smoothing_mm`).

    Returns
    -------
    (n, 2) float64, (x, y) pixels; points whose window is empty are returned unchanged.

    Raises
    ------
    ValueError
        Negative or malformed ``smoothing_px``.
    """
    sx, sy = _smoothing_pair(smoothing_px)
    img = np.asarray(image)
    h, w = img.shape[:2]
    out = np.array(points_px, dtype=np.float64, copy=True)
    rs = float(search_radius_px)
    pad = int(np.ceil(rs + 3.0 * max(sx, sy))) + 2
    for i, (x, y) in enumerate(out):
        if not (np.isfinite(x) and np.isfinite(y)):
            continue
        xi, yi = int(round(x)), int(round(y))
        x0, x1 = max(0, xi - pad), min(w, xi + pad + 1)
        y0, y1 = max(0, yi - pad), min(h, yi + pad + 1)
        if x1 - x0 < 3 or y1 - y0 < 3:
            continue
        win = img[y0:y1, x0:x1].astype(np.float32)
        if sx > 0 or sy > 0:
            # A zero sigma would make OpenCV derive it from the kernel size: keep that axis as is.
            win = cv2.GaussianBlur(win, (0 if sx > 0 else 1, 0 if sy > 0 else 1), sigmaX=sx, sigmaY=sy,
                                   borderType=cv2.BORDER_REPLICATE)
        mean8 = cv2.blur(win, (3, 3), borderType=cv2.BORDER_REPLICATE)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        masked = np.where((xx - x) ** 2 + (yy - y) ** 2 <= rs * rs, mean8, -np.inf)
        py, px = np.unravel_index(int(np.argmax(masked)), masked.shape)
        dx = _parabolic_offset(mean8[py, px - 1], mean8[py, px], mean8[py, px + 1]) if 0 < px < mean8.shape[1] - 1 else 0.0
        dy = _parabolic_offset(mean8[py - 1, px], mean8[py, px], mean8[py + 1, px]) if 0 < py < mean8.shape[0] - 1 else 0.0
        out[i] = (x0 + px + dx, y0 + py + dy)
    return out


def clip_level_of(image: np.ndarray) -> float:
    """Default saturation level of an image: :data:`AUTO_CLIP_MARGIN` grey levels below its maximum."""
    return float(np.max(image)) - AUTO_CLIP_MARGIN


def _gaussian_model(params: np.ndarray, xx: np.ndarray, yy: np.ndarray):
    """Model ``b + A exp(-(u^2 + v^2) / 2)`` and its Jacobian for a batch of echoes.

    ``params`` (n, 6) = (x0, y0, log sx, log sy, A, b); ``xx``, ``yy`` (n, p) pixel coordinates.
    Returns model (n, p) and Jacobian (n, p, 6).
    """
    x0, y0, lsx, lsy, amp, base = (params[:, k:k + 1] for k in range(6))
    sx, sy = np.exp(np.clip(lsx, -5.0, 5.0)), np.exp(np.clip(lsy, -5.0, 5.0))
    u, v = (xx - x0) / sx, (yy - y0) / sy
    g = np.exp(-0.5 * (u * u + v * v))
    ag = amp * g
    jac = np.stack([ag * u / sx, ag * v / sy, ag * u * u, ag * v * v, g, np.ones_like(g)], axis=-1)
    return base + ag, jac


def _censored_residuals(model, jac, values, censored, valid):
    """Residuals ``model - value``; a censored pixel only penalises a model below its value (the clip level)."""
    r = model - values
    active = valid & ~(censored & (r >= 0))
    r = np.where(active, r, 0.0)
    return r, jac * active[..., None]


def fit_clipped_gaussian_centres(image: np.ndarray, points_px: np.ndarray, *, half_size_px, clip_level: float,
                                 max_shift_px: float, max_iterations: int = 30, step_tolerance_px: float = 2e-3,
                                 return_fit: bool = False):
    """Centres of wire echoes from an anisotropic Gaussian fit with the saturated pixels censored.

    Around each point, the pixels of a ``(2 hx + 1) x (2 hy + 1)`` window are fitted by
    ``b + A exp(-((x - x0)^2 / sx^2 + (y - y0)^2 / sy^2) / 2)`` (axes along the image axes:
    lateral x, axial y) in the least-squares sense, except that a pixel at or above
    ``clip_level`` only says that the true echo reaches the clip level there: its residual is
    ``max(0, clip_level - model)``. A flat-topped (saturated) echo thus counts with the
    extent of its plateau and its flanks rather than with the position of the brightest
    noise grain on the plateau. All echoes are solved together by a batched
    Levenberg-Marquardt iteration (6 parameters each, 6 x 6 normal equations).

    Parameters
    ----------
    image : (h, w) uint8 or float
        Full-resolution grey image (MF), not smoothed.
    points_px : (n, 2) float
        Starting centres (x, y), pixels (e.g. from :func:`refine_centres`); NaN rows are skipped.
    half_size_px : float, (hx, hy), (hx, hy_above, hy_below), or one such row per point ((n, 2) or (n, 3))
        Half-width (x) and half-heights above (smaller y, towards the probe) and below (larger y)
        the starting point of the fitted window, pixels (rounded); ``(hx, hy)`` is symmetric. A
        window that stops short below the echo keeps its reverberation tail out of the fit.
    clip_level : float
        Grey level from which a pixel is censored (saturated).
    max_shift_px : float
        A fit that moves the centre further than this from the starting point is rejected.
    max_iterations : int
        Levenberg-Marquardt iterations at most.
    step_tolerance_px : float
        An echo's fit stops when an accepted step moves its centre by less than this, pixels.
    return_fit : bool
        Also return the fitted Gaussians' sigmas and amplitudes.

    Returns
    -------
    centres : (n, 2) float64
        Fitted (x, y) pixels; the starting point where the fit was rejected.
    ok : (n,) bool
        Whether the fit was accepted: it converged to a positive echo with sigmas between 0.3
        pixels and 3 window half-sizes, moved the centre by at most ``max_shift_px``, and no
        saturated pixel lies on the window's border (a plateau wider than the window has no
        flank to locate it).
    sigmas : (n, 2) float64, only with ``return_fit``
        Fitted (sx, sy), pixels (NaN where not fitted).
    amplitudes : (n,) float64, only with ``return_fit``
        Fitted ``A`` (grey levels above the fitted background ``b``; NaN where not fitted).

    Raises
    ------
    ValueError
        Half-sizes below 1 pixel or malformed, non-positive ``max_shift_px``, or points not shaped (n, 2).
    """
    pts = np.array(points_px, dtype=np.float64, copy=True)
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"points_px: expected shape (n, 2), got {pts.shape}")
    half = _half_sizes(half_size_px, len(pts))
    if not max_shift_px > 0:
        raise ValueError(f"max_shift_px: expected a positive distance in pixels, got {max_shift_px!r}")
    ok = np.zeros(len(pts), dtype=bool)
    sigmas = np.full((len(pts), 2), np.nan)
    amplitudes = np.full(len(pts), np.nan)
    todo = np.flatnonzero(np.all(np.isfinite(pts), axis=1))
    if todo.size == 0:
        return (pts, ok, sigmas, amplitudes) if return_fit else (pts, ok)
    img = np.asarray(image)
    h, w = img.shape[:2]
    ihalf = np.rint(half[todo]).astype(int)  # (m, 3): hx, above, below
    ihx, ihy = int(ihalf[:, 0].max()), int(ihalf[:, 1:].max())
    dy, dx = np.mgrid[-ihy: ihy + 1, -ihx: ihx + 1]
    dx, dy = dx.ravel()[None, :], dy.ravel()[None, :]
    start = pts[todo]
    cx, cy = np.rint(start[:, 0]).astype(int), np.rint(start[:, 1]).astype(int)
    xx = cx[:, None] + dx
    yy = cy[:, None] + dy
    own = (np.abs(dx) <= ihalf[:, :1]) & (dy >= -ihalf[:, 1:2]) & (dy <= ihalf[:, 2:3])  # each point's window
    valid = own & (xx >= 0) & (xx < w) & (yy >= 0) & (yy < h)
    values = img[np.clip(yy, 0, h - 1), np.clip(xx, 0, w - 1)].astype(np.float64)
    censored = (values >= clip_level) & own
    values = np.where(censored, clip_level, values)
    xx, yy = xx.astype(np.float64), yy.astype(np.float64)

    # Start: the peak position, the window's low quartile as offset, the echo's height above it
    # and sigmas of a third of the window.
    lo = np.nanpercentile(np.where(valid, values, np.nan), 25, axis=1)
    lo = np.where(np.isfinite(lo), lo, 0.0)
    hi = np.max(np.where(valid, values, -np.inf), axis=1)
    hx_f = half[todo, 0]
    hy_f = 0.5 * (half[todo, 1] + half[todo, 2])
    params = np.column_stack([start, np.log(np.maximum(hx_f / 3, 0.5)), np.log(np.maximum(hy_f / 3, 0.5)),
                              np.maximum(hi - lo, 1.0), lo])
    model, jac = _gaussian_model(params, xx, yy)
    r, jac = _censored_residuals(model, jac, values, censored, valid)
    cost = np.sum(r * r, axis=1)
    lam = np.full(len(start), 1e-3)
    eye = np.eye(6)
    running = np.ones(len(start), dtype=bool)
    for _ in range(int(max_iterations)):
        idx = np.flatnonzero(running)
        if idx.size == 0:
            break
        jac_i, r_i = jac[idx], r[idx]
        jt = jac_i.transpose(0, 2, 1)
        jtj = jt @ jac_i
        jtr = (jt @ r_i[..., None])[..., 0]
        damp = jtj + lam[idx, None, None] * (np.diagonal(jtj, axis1=1, axis2=2)[:, :, None] * eye + 1e-9 * eye)
        try:
            step = -np.linalg.solve(damp, jtr[..., None])[..., 0]
        except np.linalg.LinAlgError:
            break
        trial = params[idx] + step
        m_t, j_t = _gaussian_model(trial, xx[idx], yy[idx])
        r_t, j_t = _censored_residuals(m_t, j_t, values[idx], censored[idx], valid[idx])
        cost_t = np.sum(r_t * r_t, axis=1)
        better = np.isfinite(cost_t) & (cost_t < cost[idx])
        acc = idx[better]
        params[acc], r[acc], jac[acc], cost[acc] = trial[better], r_t[better], j_t[better], cost_t[better]
        lam[idx] = np.where(better, lam[idx] * 0.3, lam[idx] * 10.0)
        converged = better & (np.hypot(step[:, 0], step[:, 1]) < step_tolerance_px)
        running[idx[converged | (lam[idx] > 1e8)]] = False
    centre = params[:, :2]
    sx, sy = np.exp(np.clip(params[:, 2], -5.0, 5.0)), np.exp(np.clip(params[:, 3], -5.0, 5.0))
    # A plateau that reaches the window's border has no flank there: its centre is not determined.
    border = own & ((np.abs(dx) == ihalf[:, :1]) | (dy == -ihalf[:, 1:2]) | (dy == ihalf[:, 2:3]))
    open_plateau = np.any(censored & border, axis=1)
    good = (~open_plateau & np.all(np.isfinite(params), axis=1) & (params[:, 4] > 0)
            & (np.hypot(*(centre - start).T) <= max_shift_px)
            & (sx >= 0.3) & (sx <= 3 * hx_f) & (sy >= 0.3) & (sy <= 3 * hy_f))
    pts[todo[good]] = centre[good]
    ok[todo[good]] = True
    sigmas[todo[good]] = np.column_stack([sx, sy])[good]
    amplitudes[todo[good]] = params[good, 4]
    return (pts, ok, sigmas, amplitudes) if return_fit else (pts, ok)


def _half_sizes(half_size_px, n: int) -> np.ndarray:
    """``half_size_px`` of :func:`fit_clipped_gaussian_centres` as (n, 3) rows (hx, above, below); raises ValueError."""
    try:
        arr = np.asarray(half_size_px, dtype=np.float64)
        if arr.ndim == 0:
            arr = np.repeat(arr, 2)
        if arr.shape[-1] == 2:
            arr = np.concatenate([arr, arr[..., 1:]], axis=-1)
        if arr.ndim > 2 or arr.shape[-1] != 3 or (arr.ndim == 2 and arr.shape[0] != n):
            raise ValueError
        arr = np.broadcast_to(arr, (n, 3)).copy()
    except (TypeError, ValueError):
        raise ValueError(f"half_size_px: expected hx, (hx, hy), (hx, hy_above, hy_below) or one such row per point, "
                         f"pixels, got {half_size_px!r}") from None
    if not np.all(np.isfinite(arr) & (arr >= 1)):
        raise ValueError(f"half_size_px: expected half-sizes >= 1 pixel, got {half_size_px!r}")
    return arr


def background_noise(image: np.ndarray, points_px: np.ndarray, *, inner_px: float, outer_px: float):
    """Level and noise of the image around each point, from the ring between two radii.

    Parameters
    ----------
    image : (h, w) uint8 or float
        Grey image (MF).
    points_px : (n, 2) float
        Centres (x, y), pixels; NaN rows give NaN.
    inner_px, outer_px : float
        Radii of the ring, pixels (``0 < inner_px < outer_px``).

    Returns
    -------
    level : (n,) float64
        Median grey level in the ring.
    noise : (n,) float64
        Its robust standard deviation (1.4826 x the median absolute deviation), grey levels: a
        bright minority in the ring (another echo's edge, a reverberation tail) hardly changes it.

    Raises
    ------
    ValueError
        Radii not ordered as ``0 < inner_px < outer_px``.
    """
    if not 0 < inner_px < outer_px:
        raise ValueError(f"inner_px, outer_px: expected 0 < inner < outer pixels, got {inner_px!r}, {outer_px!r}")
    pts = np.asarray(points_px, dtype=np.float64).reshape(-1, 2)
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape[:2]
    r = int(np.ceil(outer_px))
    yy, xx = np.mgrid[-r: r + 1, -r: r + 1]
    dist = np.hypot(xx, yy)
    ring_dx, ring_dy = xx[(dist >= inner_px) & (dist <= outer_px)], yy[(dist >= inner_px) & (dist <= outer_px)]
    level, noise = np.full(len(pts), np.nan), np.full(len(pts), np.nan)
    todo = np.flatnonzero(np.all(np.isfinite(pts), axis=1))
    if todo.size == 0:
        return level, noise
    rx = np.rint(pts[todo, :1]).astype(int) + ring_dx[None, :]
    ry = np.rint(pts[todo, 1:]).astype(int) + ring_dy[None, :]
    inside = (rx >= 0) & (rx < w) & (ry >= 0) & (ry < h)
    vals = np.where(inside, img[np.clip(ry, 0, h - 1), np.clip(rx, 0, w - 1)], np.nan)
    seen = inside.any(axis=1)
    if seen.any():
        lev = np.nanmedian(vals[seen], axis=1)
        level[todo[seen]] = lev
        noise[todo[seen]] = 1.4826 * np.nanmedian(np.abs(vals[seen] - lev[:, None]), axis=1)
    return level, noise


@dataclass
class HessianDetector:
    """The paper's detector for one phantom and pixel spacing (reusable across frames).

    Parameters
    ----------
    phantom : NWirePhantom
    pixel_spacing_mm : float or (sx, sy)
        Approximate mm per pixel of the images (PLUS ``ApproximateSpacingMmPerPixel``).
    settings : HessianSettings, optional
    labeling : LabelingSettings, optional
    clip_rectangle_px : ((x, y), (width, height)), optional
        Only this part of the image is searched (PLUS ``ClipRectangleOrigin/Size``).

    Examples
    --------
    >>> det = HessianDetector(load_phantom("fCal-2.0"), 0.078)
    >>> frame = det.detect(image)           # FrameDetection; frame.points_px (9, 2)
    """

    phantom: NWirePhantom
    pixel_spacing_mm: object
    settings: HessianSettings = field(default_factory=HessianSettings)
    labeling: LabelingSettings = field(default_factory=LabelingSettings)
    clip_rectangle_px: tuple | None = None
    name: str = "hessian"

    def __post_init__(self):
        sp = np.broadcast_to(np.asarray(self.pixel_spacing_mm, dtype=np.float64), (2,)).copy()
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise DetectionError(f"pixel_spacing_mm: expected positive mm per pixel, got {self.pixel_spacing_mm!r}")
        self._spacing = sp
        s = self.settings
        mean_sp = float(sp.mean())
        self._factor = max(1, int(round(s.processing_spacing_mm / mean_sp)))
        proc_sp = mean_sp * self._factor
        bar_px = max(3, int(round(s.bar_length_mm / proc_sp)))
        self._kernels = [bar_kernel(bar_px, a) for a in s.bar_angles_deg]
        self._sigmas = [max(0.7, f * s.echo_size_mm / proc_sp) for f in s.scale_factors]
        self._border_px = s.border_mm / mean_sp
        r1, r2 = (r / proc_sp for r in s.prominence_ring_mm)
        size = int(np.ceil(r2))
        yy, xx = np.mgrid[-size: size + 1, -size: size + 1]
        dist = np.hypot(xx, yy)
        ring = (dist >= r1) & (dist <= r2)
        self._ring_dy, self._ring_dx = yy[ring], xx[ring]

    @property
    def max_candidates(self) -> int:
        """Candidates passed to the labeling: ``settings.max_candidates`` per nine wires, at least that."""
        n = self.settings.max_candidates
        return max(n, int(np.ceil(n * self.phantom.n_wires / 9)))

    @property
    def downsampling(self) -> int:
        """Integer factor between the image and the processing grid."""
        return self._factor

    def candidates(self, image: np.ndarray, *, all_peaks: bool = False):
        """Dot candidates of one image.

        Parameters
        ----------
        image : (rows, cols) or (rows, cols, channels) array, MF
        all_peaks : bool
            Every local maximum of the response above the threshold, without the prominence
            filter and the ``max_candidates`` cap (the sequence stage searches these near a
            predicted dot: a wire's echo next to a brighter one fails the prominence filter).

        Returns
        -------
        points_px : (n, 2) float64
            Candidate centres, full-resolution pixels (x, y), strongest first.
        response : (n,) float64
            Their Hessian responses.
        tophat : (h', w') uint8
            The top-hat image at processing resolution, covering the searched part.
        offset_px : (x, y)
            Full-resolution pixel position of the searched part's corner.
        """
        img = _to_gray(image)
        ox = oy = 0
        if self.clip_rectangle_px is not None:
            (ox, oy), (cw, ch) = self.clip_rectangle_px
            ox, oy = max(0, int(ox)), max(0, int(oy))
            img = img[oy: oy + int(ch), ox: ox + int(cw)]
        # Only the part holding image data (scan-converted frames have black borders).
        bx, by, bw, bh = cv2.boundingRect(img)
        if bw == 0 or bh == 0:
            return np.zeros((0, 2)), np.zeros(0), np.zeros((0, 0), np.uint8), (ox, oy)
        img = img[by: by + bh, bx: bx + bw]
        ox, oy = ox + bx, oy + by
        f = self._factor
        small = img if f == 1 else cv2.resize(img, (img.shape[1] // f, img.shape[0] // f), interpolation=cv2.INTER_AREA)
        tophat = directional_tophat(small, self._kernels)
        resp = hessian_blob_response(tophat, self._sigmas, min_curvature_ratio=self.settings.min_curvature_ratio)
        vmax = float(resp.max())
        if vmax <= 0:
            return np.zeros((0, 2)), np.zeros(0), tophat, (ox, oy)
        peaks = (resp >= cv2.dilate(resp, np.ones((3, 3), np.uint8))) & (resp > self.settings.threshold_ratio * vmax)
        ys, xs = np.nonzero(peaks)
        vals = resp[ys, xs]
        if self.settings.min_prominence > 0 and vals.size and not all_peaks:
            ry = ys[:, None] + self._ring_dy[None, :]
            rx = xs[:, None] + self._ring_dx[None, :]
            inside = (ry >= 0) & (ry < resp.shape[0]) & (rx >= 0) & (rx < resp.shape[1])
            ring = np.where(inside, resp[np.clip(ry, 0, resp.shape[0] - 1), np.clip(rx, 0, resp.shape[1] - 1)], 0)
            keep = vals >= self.settings.min_prominence * ring.max(axis=1)
            ys, xs, vals = ys[keep], xs[keep], vals[keep]
        order = np.argsort(-vals)[: None if all_peaks else self.max_candidates]
        xs, ys, vals = xs[order], ys[order], vals[order]
        pts = np.stack([(xs + 0.5) * f - 0.5 + ox, (ys + 0.5) * f - 0.5 + oy], axis=1).astype(np.float64)
        h, w = image.shape[:2]
        b = self._border_px
        inside = (pts[:, 0] >= b) & (pts[:, 0] <= w - 1 - b) & (pts[:, 1] >= b) & (pts[:, 1] <= h - 1 - b)
        return pts[inside], vals[inside].astype(np.float64), tophat, (ox, oy)

    def detect(self, image: np.ndarray) -> FrameDetection:
        """Detect and label the phantom's dots in one image (MF)."""
        pts, vals, tophat, (ox, oy) = self.candidates(image)
        h, w = image.shape[:2]
        b = self._border_px
        keep = np.ones(len(pts), bool)
        for attempt in range(3):
            lab = label_dots(pts[keep], vals[keep], self.phantom, self._spacing, settings=self.labeling)
            if not lab.ok:
                return FrameDetection(False, lab.points_px, pts, lab.reason, lab.reason_code)
            refined = self.refine(image, lab.points_px)
            # The candidates' border rule, applied to the sub-pixel centres: an echo whose centre
            # ends up on the image border (a screen mark cut by the frame) is not a wire's; drop
            # it and label again.
            edge = ((refined[:, 0] < b) | (refined[:, 0] > w - 1 - b) | (refined[:, 1] < b)
                    | (refined[:, 1] > h - 1 - b))
            if not edge.any():
                break
            keep[np.flatnonzero(keep)[lab.indices[edge]]] = False
        else:
            names = ", ".join(self.phantom.wire_names[i] for i in np.flatnonzero(edge))
            return FrameDetection(False, np.full_like(refined, np.nan), pts,
                                  f"the dots of {names} lie on the image border after refinement", "dot-at-border")
        limit = self.labeling.max_wire_distance_mm
        # Check again on the sub-pixel centres when the coarse check was close to the limit
        # (refinement moves dots by about one processing pixel).
        margin = 1.5 * float(self._spacing.mean()) * self._factor
        if limit > 0 and not lab.wire_distance_mm <= limit - margin:
            res = pose_residual_mm(refined, self.phantom)
            if not res <= limit:  # the check again, on the sub-pixel centres
                return FrameDetection(False, np.full_like(refined, np.nan), pts,
                                      f"refined dots fail the 3D consistency check ({res:.2f} mm > {limit:g} mm)",
                                      "3d-check-refined")
        return FrameDetection(True, refined, pts, "")

    def verify(self, image: np.ndarray, points_px: np.ndarray):
        """Refine dots labelled elsewhere (the sequence stage) and apply the border rule.

        Returns
        -------
        (refined (n_wires, 2) float64 or None, reason code, reason text)
            None with ``"dot-at-border"`` when a refined centre lies on the image border.
        """
        refined = self.refine(image, np.asarray(points_px, dtype=np.float64))
        h, w = image.shape[:2]
        b = self._border_px
        edge = ((refined[:, 0] < b) | (refined[:, 0] > w - 1 - b) | (refined[:, 1] < b) | (refined[:, 1] > h - 1 - b)
                | ~np.all(np.isfinite(refined), axis=1))
        if edge.any():
            names = ", ".join(self.phantom.wire_names[i] for i in np.flatnonzero(edge))
            return None, "dot-at-border", f"the dots of {names} lie on the image border after refinement"
        return refined, "", ""

    def refine(self, image: np.ndarray, points_px: np.ndarray) -> np.ndarray:
        """Sub-pixel centres of labeled dots on the full-resolution image.

        :func:`refine_centres`, then (``refine_model="clipped-gaussian"``)
        :func:`fit_clipped_gaussian_centres` from there, or (``"adaptive"``, default)
        :meth:`refine_adaptive`.
        """
        s = self.settings
        gray = _to_gray(image)
        lateral = s.refine_smoothing_mm if s.refine_lateral_smoothing_mm is None else s.refine_lateral_smoothing_mm
        radius_px = s.refine_radius_mm / float(self._spacing.mean())
        peaks = refine_centres(gray, points_px, search_radius_px=radius_px,
                               smoothing_px=(lateral / self._spacing[0], s.refine_smoothing_mm / self._spacing[1]))
        if s.refine_model == "peak":
            return peaks
        clip = clip_level_of(gray) if s.refine_clip_level is None else float(s.refine_clip_level)
        if s.refine_model == "adaptive":
            return self.refine_adaptive(gray, peaks, clip_level=clip)
        half = (s.refine_fit_window_mm[0] / self._spacing[0], s.refine_fit_window_mm[1] / self._spacing[1])
        fitted, ok = fit_clipped_gaussian_centres(gray, peaks, half_size_px=half, clip_level=clip,
                                                  max_shift_px=radius_px)
        if not ok.all():
            logger.debug("clipped-gaussian fit rejected for %d of %d dots (peak kept)",
                         int((~ok & np.all(np.isfinite(peaks), axis=1)).sum()), len(peaks))
        return fitted

    def refine_adaptive(self, gray: np.ndarray, peaks_px: np.ndarray, *, clip_level: float,
                        return_choice: bool = False):
        """Peak or PSF-sized Gaussian fit per dot, chosen by the noise around the echo.

        The smoothed peak (``peaks_px``, :func:`refine_centres`) makes no assumption about the
        echo's shape, but background noise moves it: a noise slope ``n'`` shifts the peak of an
        echo of height ``A`` and width ``sigma`` by ``sigma^2 n' / A``, and for noise of standard
        deviation ``sigma_n`` correlated over about the echo's own width (speckle: both are the
        point-spread function) that is ``sigma sigma_n / A`` pixels. A least-squares Gaussian fit
        over the whole echo averages that noise instead, at the price of assuming the Gaussian
        shape. So:

        1. A censored Gaussian fit in the ``refine_fit_window_mm`` window (a first guess)
           estimates each echo's sigmas ``(sx, sy)`` and height ``A`` in this frame.
        2. The fit is repeated in a window sized from those sigmas
           (``refine_psf_window``: ``k_lat sx`` across, ``k_above sy`` above and ``k_below
           sy`` below the centre; the window stops short below the echo so that its
           reverberation tail does not pull the centre down) and at most half the distance to
           the nearest other dot in every direction (no neighbour's pixels).
        3. The ring of ``prominence_ring_mm`` gives the background noise ``sigma_n``
           (:func:`background_noise`); where the predicted noise shift of the peak
           ``max(sx, sy) sigma_n / A`` exceeds ``refine_noise_error_px``, the fit's centre is
           used, elsewhere (low-noise images, e.g. a water tank) the peak is kept.

        Parameters
        ----------
        gray : (h, w) uint8
            Full-resolution grey image (MF).
        peaks_px : (n, 2) float64
            Smoothed-peak centres (x, y), pixels; NaN rows stay NaN.
        clip_level : float
            Saturation level (:func:`fit_clipped_gaussian_centres`).
        return_choice : bool
            Also return which dots took the fit and their predicted peak noise shift.

        Returns
        -------
        centres : (n, 2) float64, (x, y) pixels
        fitted : (n,) bool, only with ``return_choice``
        noise_shift_px : (n,) float64, only with ``return_choice`` (0 without background noise, NaN where the
            first fit failed)
        """
        s = self.settings
        peaks = np.asarray(peaks_px, dtype=np.float64)
        radius_px = s.refine_radius_mm / float(self._spacing.mean())
        # At least 2 pixels each side: 5 samples across to fit a centre and a width.
        half1 = (max(2.0, s.refine_fit_window_mm[0] / self._spacing[0]),
                 max(2.0, s.refine_fit_window_mm[1] / self._spacing[1]))
        _, noise = background_noise(gray, peaks, inner_px=s.prominence_ring_mm[0] / float(self._spacing.mean()),
                                    outer_px=s.prominence_ring_mm[1] / float(self._spacing.mean()))
        # Without background noise the predicted shift is 0 whatever the echo: no fit needed.
        first, ok1, sig, amp = fit_clipped_gaussian_centres(gray, np.where((noise > 0)[:, None], peaks, np.nan),
                                                            half_size_px=half1, clip_level=clip_level,
                                                            max_shift_px=radius_px, return_fit=True)
        shift = np.where(ok1, np.nanmax(sig, axis=1, initial=0.0) * noise / amp, np.nan)
        shift[noise == 0] = 0.0
        use = ok1 & (shift > s.refine_noise_error_px)
        out = peaks.copy()
        if use.any():
            k_lat, k_above, k_below = (float(v) for v in s.refine_psf_window)
            # Half the distance to the nearest other dot bounds the window in every direction.
            gap = np.linalg.norm(first[:, None, :] - first[None, :, :], axis=2)  # NaN for missing dots
            np.fill_diagonal(gap, np.inf)
            room = np.maximum(0.5 * np.min(np.nan_to_num(gap, nan=np.inf), axis=1), 1.0)
            sx, sy = np.where(use, sig[:, 0], 1.0), np.where(use, sig[:, 1], 1.0)
            half2 = np.column_stack([np.minimum(np.maximum(k_lat * sx, 2.0), room),
                                     np.minimum(np.maximum(k_above * sy, 2.0), room),
                                     np.minimum(np.maximum(k_below * sy, 1.0), room)])
            second, ok2 = fit_clipped_gaussian_centres(gray, np.where(use[:, None], first, np.nan), half_size_px=half2,
                                                       clip_level=clip_level, max_shift_px=radius_px)
            take = use & ok2 & (np.hypot(*(second - peaks).T) <= radius_px)
            out[take] = second[take]
            use = take
        return (out, use, shift) if return_choice else out
