"""3D positions in the Phantom frame of the dots seen in an image (N-wire correspondences).

For every pattern the three dots A (first wire), B (diagonal) and C (third wire) are collinear in
the image. By similar triangles the ratio ``alpha = |B - A| / |C - A|`` is the same in the image
and in the pattern plane, so the diagonal's crossing point is
``W12 + alpha * (W32 - W12)`` (:attr:`NWirePattern.middle_point_mm`), whatever the (unknown)
pixel spacing and probe pose. This is what PLUS uses for calibration.

The side wires' crossing points follow from the image plane: with three or more patterns the
middle points span it (:func:`fit_image_plane`); in general, from a calibration estimate
(:func:`image_plane_from_pose`). :func:`wire_plane_intersections` intersects every wire with a
plane.

Shapes: ``points_px`` is ``(n_frames, n_wires, 2)`` (x, y) pixels in the MF image, NaN where a
dot is missing; wires are in phantom order (``NWirePhantom.wires``).
"""

from __future__ import annotations

import numpy as np

from .phantom import NWirePhantom

__all__ = [
    "alpha_ratios",
    "middle_wire_points_mm",
    "fit_image_plane",
    "image_plane_from_pose",
    "wire_plane_intersections",
    "wire_points_mm",
    "point_to_wire_distances",
]


def _points(points_px, phantom: NWirePhantom) -> np.ndarray:
    pts = np.asarray(points_px, dtype=np.float64)
    if pts.ndim == 2:
        pts = pts[None]
    if pts.ndim != 3 or pts.shape[1:] != (phantom.n_wires, 2):
        raise ValueError(
            f"points_px: expected shape (n_frames, {phantom.n_wires}, 2) for phantom {phantom.name!r}, got {pts.shape}"
        )
    return pts


def alpha_ratios(points_px, phantom: NWirePhantom) -> np.ndarray:
    """``|B - A| / |C - A|`` for every frame and pattern.

    Parameters
    ----------
    points_px : (n_frames, n_wires, 2) float
        Dots in phantom wire order, pixels (MF image); NaN where missing.
    phantom : NWirePhantom

    Returns
    -------
    (n_frames, n_patterns) float64
        NaN where a dot of the pattern is missing or A and C coincide.
    """
    pts = _points(points_px, phantom)
    trip = pts.reshape(pts.shape[0], phantom.n_patterns, 3, 2)
    ab = np.linalg.norm(trip[:, :, 1] - trip[:, :, 0], axis=-1)
    ac = np.linalg.norm(trip[:, :, 2] - trip[:, :, 0], axis=-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        alpha = ab / ac
    alpha[~np.isfinite(alpha)] = np.nan
    return alpha


def middle_wire_points_mm(points_px, phantom: NWirePhantom) -> np.ndarray:
    """Crossing points of the diagonal wires, Phantom frame.

    Returns
    -------
    (n_frames, n_patterns, 3) float64, mm, Phantom frame (NaN where a pattern is incomplete).
    """
    alpha = alpha_ratios(points_px, phantom)
    out = np.empty(alpha.shape + (3,))
    for k, pattern in enumerate(phantom.patterns):
        out[:, k] = pattern.middle_point_mm(alpha[:, k])
    return out


def fit_image_plane(points_mm) -> tuple[np.ndarray, np.ndarray]:
    """Least-squares plane through 3D points, per frame.

    Parameters
    ----------
    points_mm : (n_frames, n_points, 3) float
        NaN rows are ignored; at least 3 non-collinear points per frame are needed.

    Returns
    -------
    origin : (n_frames, 3) float64
        Centroid of the points (NaN where the plane is undetermined).
    normal : (n_frames, 3) float64
        Unit normal (NaN where undetermined).
    """
    pts = np.asarray(points_mm, dtype=np.float64)
    origin = np.full((pts.shape[0], 3), np.nan)
    normal = np.full((pts.shape[0], 3), np.nan)
    for f in range(pts.shape[0]):
        p = pts[f][np.all(np.isfinite(pts[f]), axis=1)]
        if len(p) < 3:
            continue
        c = p.mean(axis=0)
        _, s, vt = np.linalg.svd(p - c)
        if s[1] < 1e-6 * max(s[0], 1e-12):
            continue
        origin[f], normal[f] = c, vt[2]
    return origin, normal


def image_plane_from_pose(image_to_phantom) -> tuple[np.ndarray, np.ndarray]:
    """Image plane (origin, unit normal) in the Phantom frame from ImageToPhantom matrices.

    Parameters
    ----------
    image_to_phantom : (n_frames, 4, 4) or (4, 4) float
        Maps (x, y, 0, 1) pixels to Phantom mm.

    Returns
    -------
    origin, normal : (n_frames, 3) float64
    """
    m = np.asarray(image_to_phantom, dtype=np.float64)
    if m.ndim == 2:
        m = m[None]
    normal = np.cross(m[:, :3, 0], m[:, :3, 1])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True)
    return m[:, :3, 3].copy(), normal


def wire_plane_intersections(origin, normal, phantom: NWirePhantom) -> np.ndarray:
    """Where every wire (as an infinite line) crosses the plane, per frame.

    Parameters
    ----------
    origin, normal : (n_frames, 3) float
        A point of the plane and its normal, Phantom frame (mm).
    phantom : NWirePhantom

    Returns
    -------
    (n_frames, n_wires, 3) float64, mm, Phantom frame; NaN where a wire is parallel to the plane.
    """
    origin = np.atleast_2d(np.asarray(origin, dtype=np.float64))
    normal = np.atleast_2d(np.asarray(normal, dtype=np.float64))
    p0 = phantom.wire_front_mm  # (w, 3)
    d = phantom.wire_directions
    num = np.einsum("fk,fwk->fw", normal, origin[:, None, :] - p0[None])
    den = normal @ d.T  # (f, w)
    with np.errstate(invalid="ignore", divide="ignore"):
        t = num / den
    t[np.abs(den) < 1e-9] = np.nan
    return p0[None] + t[..., None] * d[None]


def wire_points_mm(points_px, phantom: NWirePhantom) -> np.ndarray:
    """3D positions of all dots from the image alone (needs >= 3 patterns).

    Middle wires from alpha, side wires from their intersections with the plane through the
    middle points (:func:`fit_image_plane`).

    Returns
    -------
    (n_frames, n_wires, 3) float64, mm, Phantom frame; NaN rows where undetermined: missing
    dots, and the side wires when the plane is (fewer than three patterns, collinear middle
    points).
    """
    pts = _points(points_px, phantom)
    middle = middle_wire_points_mm(pts, phantom)
    origin, normal = fit_image_plane(middle)
    out = wire_plane_intersections(origin, normal, phantom)
    mid_idx = np.arange(phantom.n_patterns) * 3 + 1
    out[:, mid_idx] = middle
    missing = ~np.all(np.isfinite(pts), axis=-1)
    out[missing] = np.nan
    return out


def point_to_wire_distances(points_mm, phantom: NWirePhantom) -> np.ndarray:
    """Distance of each point to its wire (infinite line), mm.

    Parameters
    ----------
    points_mm : (..., n_wires, 3) float
        Points in the Phantom frame, in wire order.

    Returns
    -------
    (..., n_wires) float64
    """
    p = np.asarray(points_mm, dtype=np.float64)
    rel = p - phantom.wire_front_mm
    d = phantom.wire_directions
    along = np.einsum("...wk,wk->...w", rel, d)
    perp = rel - along[..., None] * d
    return np.linalg.norm(perp, axis=-1)
