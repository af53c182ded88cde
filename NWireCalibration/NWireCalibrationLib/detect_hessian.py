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
   beam, see :class:`HessianSettings`.

All sizes are in mm and converted with the pixel spacing, so the defaults carry across depths.
Images are processed at about ``processing_spacing_mm`` per pixel (integer down-sampling) for
speed; the sub-pixel centre uses the full-resolution image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import cv2
import numpy as np

from .errors import DetectionError
from .labeling import LabelingSettings, label_dots, pose_residual_mm
from .phantom import NWirePhantom
from .results import FrameDetection

__all__ = ["HessianSettings", "HessianDetector", "directional_tophat", "hessian_blob_response", "bar_kernel",
           "refine_centres"]

logger = logging.getLogger(__name__)


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
        Strongest candidates passed to the geometric filter.
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
    def downsampling(self) -> int:
        """Integer factor between the image and the processing grid."""
        return self._factor

    def candidates(self, image: np.ndarray):
        """Dot candidates of one image.

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
        if self.settings.min_prominence > 0 and vals.size:
            ry = ys[:, None] + self._ring_dy[None, :]
            rx = xs[:, None] + self._ring_dx[None, :]
            inside = (ry >= 0) & (ry < resp.shape[0]) & (rx >= 0) & (rx < resp.shape[1])
            ring = np.where(inside, resp[np.clip(ry, 0, resp.shape[0] - 1), np.clip(rx, 0, resp.shape[1] - 1)], 0)
            keep = vals >= self.settings.min_prominence * ring.max(axis=1)
            ys, xs, vals = ys[keep], xs[keep], vals[keep]
        order = np.argsort(-vals)[: self.settings.max_candidates]
        xs, ys, vals = xs[order], ys[order], vals[order]
        pts = np.stack([(xs + 0.5) * f - 0.5 + ox, (ys + 0.5) * f - 0.5 + oy], axis=1).astype(np.float64)
        h, w = image.shape[:2]
        b = self._border_px
        inside = (pts[:, 0] >= b) & (pts[:, 0] <= w - 1 - b) & (pts[:, 1] >= b) & (pts[:, 1] <= h - 1 - b)
        return pts[inside], vals[inside].astype(np.float64), tophat, (ox, oy)

    def detect(self, image: np.ndarray) -> FrameDetection:
        """Detect and label the phantom's dots in one image (MF)."""
        pts, vals, tophat, (ox, oy) = self.candidates(image)
        lab = label_dots(pts, vals, self.phantom, self._spacing, settings=self.labeling)
        if not lab.ok:
            return FrameDetection(False, lab.points_px, pts, lab.reason)
        refined = self.refine(image, lab.points_px)
        limit = self.labeling.max_wire_distance_mm
        # Check again on the sub-pixel centres when the coarse check was close to the limit
        # (refinement moves dots by about one processing pixel).
        margin = 1.5 * float(self._spacing.mean()) * self._factor
        if limit > 0 and not lab.wire_distance_mm <= limit - margin:
            res = pose_residual_mm(refined, self.phantom)
            if not res <= limit:  # the check again, on the sub-pixel centres
                return FrameDetection(False, np.full_like(refined, np.nan), pts,
                                      f"refined dots fail the 3D consistency check ({res:.2f} mm > {limit:g} mm)")
        return FrameDetection(True, refined, pts, "")

    def refine(self, image: np.ndarray, points_px: np.ndarray) -> np.ndarray:
        """Sub-pixel centres of labeled dots on the full-resolution image (:func:`refine_centres`)."""
        s = self.settings
        lateral = s.refine_smoothing_mm if s.refine_lateral_smoothing_mm is None else s.refine_lateral_smoothing_mm
        return refine_centres(_to_gray(image), points_px,
                              search_radius_px=s.refine_radius_mm / float(self._spacing.mean()),
                              smoothing_px=(lateral / self._spacing[0], s.refine_smoothing_mm / self._spacing[1]))
