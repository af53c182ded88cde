"""Baseline dot detectors for side-by-side comparison with the Hessian detector.

All share the interface of :class:`~.detect_hessian.HessianDetector` (``detect(image) ->
FrameDetection``) and the N-wire labeling of :mod:`.labeling`; they differ in how dot
candidates are found and where a dot's centre is put:

- :class:`AgcfdDetector` (adaptive-threshold gray-centroid feature detection): local adaptive
  threshold (pixel above the mean of its neighbourhood by a margin), connected components, and
  the gray-level weighted centroid of each component.
- :class:`TacdDetector` (threshold + circle detection): global Otsu threshold, contours, and the
  centre of each blob's minimum enclosing circle.
- :class:`PlusStyleDetector` (after PLUS ``PlusFidSegmentation``/``PlusFidLineFinder``):
  successive white top-hats with bars at 0/45/90/135 degrees and an opening with a small disc,
  a threshold at ``ThresholdImagePercent`` of the intensity range, clustering of the remaining
  pixels (connected components), intensity centroids, and line finding with PLUS's
  tolerances (``<Segmentation>`` parameters) in the shared labeler.

These are re-implementations from the methods' descriptions, not ports of their code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import cv2
import numpy as np

from .detect_hessian import _to_gray, bar_kernel
from .errors import DetectionError
from .labeling import LabelingSettings, label_dots
from .phantom import NWirePhantom
from .results import FrameDetection

__all__ = ["AgcfdDetector", "TacdDetector", "PlusStyleDetector", "plus_labeling_settings"]


class _BlobDetector:
    """Shared plumbing: spacing, clip rectangle, labeling; subclasses implement ``_blobs``."""

    name = "blob"

    def _setup(self):
        sp = np.broadcast_to(np.asarray(self.pixel_spacing_mm, dtype=np.float64), (2,)).copy()
        if not np.all(np.isfinite(sp)) or np.any(sp <= 0):
            raise DetectionError(f"pixel_spacing_mm: expected positive mm per pixel, got {self.pixel_spacing_mm!r}")
        self._spacing = sp
        self._mm = float(sp.mean())

    def _crop(self, image):
        img = _to_gray(image)
        if self.clip_rectangle_px is None:
            return img, 0, 0
        (ox, oy), (cw, ch) = self.clip_rectangle_px
        ox, oy = max(0, int(ox)), max(0, int(oy))
        return img[oy: oy + int(ch), ox: ox + int(cw)], ox, oy

    def _component_stats(self, mask, weights, min_area_mm2, max_area_mm2):
        n, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
        px_area = self._mm ** 2
        pts, strength = [], []
        for k in range(1, n):
            area = stats[k, cv2.CC_STAT_AREA] * px_area
            if area < min_area_mm2 or area > max_area_mm2:
                continue
            x0, y0, w, h = stats[k, :4]
            sub = labels[y0:y0 + h, x0:x0 + w] == k
            wts = weights[y0:y0 + h, x0:x0 + w] * sub
            total = float(wts.sum())
            if total <= 0:
                continue
            yy, xx = np.mgrid[y0:y0 + h, x0:x0 + w]
            pts.append(((wts * xx).sum() / total, (wts * yy).sum() / total))
            strength.append(total)
        return np.array(pts, dtype=np.float64).reshape(-1, 2), np.array(strength, dtype=np.float64)

    def candidates(self, image):
        """((n, 2) centres in full-image pixels, (n,) strengths)."""
        img, ox, oy = self._crop(image)
        pts, strength = self._blobs(img)
        if pts.size:
            pts = pts + (ox, oy)
            order = np.argsort(-strength)[: self.max_candidates]
            pts, strength = pts[order], strength[order]
        return pts, strength

    def detect(self, image) -> FrameDetection:
        pts, strength = self.candidates(image)
        lab = label_dots(pts, strength, self.phantom, self._spacing, settings=self.labeling)
        return FrameDetection(lab.ok, lab.points_px, pts, lab.reason, lab.reason_code)


@dataclass
class AgcfdDetector(_BlobDetector):
    """Adaptive threshold + gray-weighted centroid (AGC-FD).

    Parameters
    ----------
    phantom, pixel_spacing_mm, clip_rectangle_px, labeling :
        As for the Hessian detector.
    block_mm : float
        Neighbourhood of the adaptive threshold.
    offset : float
        Grey levels a pixel must exceed its neighbourhood mean by.
    min_area_mm2, max_area_mm2 : float
        Blob size limits.
    """

    phantom: NWirePhantom
    pixel_spacing_mm: object
    clip_rectangle_px: tuple | None = None
    labeling: LabelingSettings = field(default_factory=LabelingSettings)
    block_mm: float = 6.0
    offset: float = 20.0
    smoothing_mm: float = 0.15
    min_area_mm2: float = 0.1
    max_area_mm2: float = 25.0
    max_candidates: int = 40
    name: str = "agcfd"

    def __post_init__(self):
        self._setup()

    def _blobs(self, img):
        g = cv2.GaussianBlur(img, (0, 0), max(0.5, self.smoothing_mm / self._mm))
        block = max(3, int(round(self.block_mm / self._mm)) | 1)
        mask = cv2.adaptiveThreshold(g, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, block, -self.offset)
        local = cv2.blur(g.astype(np.float32), (block, block))
        weights = np.maximum(g.astype(np.float32) - local, 0)
        return self._component_stats(mask > 0, weights, self.min_area_mm2, self.max_area_mm2)


@dataclass
class TacdDetector(_BlobDetector):
    """Global threshold + minimum enclosing circle centre (TACD).

    Parameters
    ----------
    min_radius_mm, max_radius_mm : float
        Accepted radii of the enclosing circles.
    """

    phantom: NWirePhantom
    pixel_spacing_mm: object
    clip_rectangle_px: tuple | None = None
    labeling: LabelingSettings = field(default_factory=LabelingSettings)
    smoothing_mm: float = 0.15
    min_radius_mm: float = 0.2
    max_radius_mm: float = 4.0
    max_candidates: int = 40
    name: str = "tacd"

    def __post_init__(self):
        self._setup()

    def _blobs(self, img):
        g = cv2.GaussianBlur(img, (0, 0), max(0.5, self.smoothing_mm / self._mm))
        _, mask = cv2.threshold(g, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
        contours, _ = cv2.findContours(mask, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        pts, strength = [], []
        for c in contours:
            (x, y), r = cv2.minEnclosingCircle(c)
            r_mm = r * self._mm
            if not self.min_radius_mm <= r_mm <= self.max_radius_mm:
                continue
            pts.append((x, y))
            strength.append(float(cv2.contourArea(c)) + 1.0)
        return np.array(pts, dtype=np.float64).reshape(-1, 2), np.array(strength, dtype=np.float64)


def plus_labeling_settings(segmentation=None) -> LabelingSettings:
    """Labeling tolerances from PLUS ``<Segmentation>`` parameters (PLUS defaults when None).

    ``CollinearPointsMaxDistanceFromLineMm`` becomes a collinearity relative to a 30 mm line,
    ``MaxAngleDifferenceDegrees`` a slope difference, ``MaxLinePairDistanceErrorPercent`` a
    distance tolerance relative to a 10 mm layer spacing.
    """
    collinear_mm = getattr(segmentation, "collinear_points_max_distance_from_line_mm", 0.6)
    angle_deg = getattr(segmentation, "max_angle_difference_deg", 10.0)
    pair_pct = getattr(segmentation, "max_line_pair_distance_error_percent", 10.0)
    max_theta = max(abs(getattr(segmentation, "min_theta_deg", -70.0)), abs(getattr(segmentation, "max_theta_deg", 70.0)))
    return LabelingSettings(collinearity_eps=max(collinear_mm / 30.0, 1e-3),
                            parallel_eps=float(np.tan(np.radians(angle_deg))),
                            distance_tolerance_mm=max(pair_pct / 100.0 * 10.0, 0.1),
                            max_line_angle_deg=max_theta)


@dataclass
class PlusStyleDetector(_BlobDetector):
    """PLUS-style segmentation: morphology, percentage threshold, clustering, line finding.

    Parameters
    ----------
    opening_circle_radius_mm, opening_bar_size_mm, threshold_image_percent :
        PLUS ``MorphologicalOpeningCircleRadiusMm`` (0.27), ``MorphologicalOpeningBarSizeMm``
        (2.0), ``ThresholdImagePercent`` (10).
    labeling : LabelingSettings
        Defaults to :func:`plus_labeling_settings` of PLUS's default parameters.
    """

    phantom: NWirePhantom
    pixel_spacing_mm: object
    clip_rectangle_px: tuple | None = None
    labeling: LabelingSettings = field(default_factory=plus_labeling_settings)
    opening_circle_radius_mm: float = 0.27
    opening_bar_size_mm: float = 2.0
    threshold_image_percent: float = 10.0
    max_candidates: int = 20
    name: str = "plus"

    def __post_init__(self):
        self._setup()

    def _blobs(self, img):
        # Sequential white top-hats with bars of 2 * bar + 1 pixels at 0/45/90/135 degrees,
        # then an opening with a disc (speckle smaller than a dot goes away).
        bar = 2 * max(1, int(round(self.opening_bar_size_mm / self._mm))) + 1
        work = img
        for angle in (0.0, 45.0, 90.0, 135.0):
            work = cv2.subtract(work, cv2.morphologyEx(work, cv2.MORPH_OPEN, bar_kernel(bar, angle)))
        r = max(1, int(round(self.opening_circle_radius_mm / self._mm)))
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
        work = cv2.morphologyEx(work, cv2.MORPH_OPEN, disc)
        lo, hi = int(work.min()), int(work.max())
        if hi <= lo:
            return np.zeros((0, 2)), np.zeros(0)
        mask = work >= lo + np.floor((hi - lo) * self.threshold_image_percent / 100.0 + 0.5)
        return self._component_stats(mask, work.astype(np.float32), 0.05, 30.0)
