"""Which pixels of a frame go into the volume: clip rectangle, fan, rejection, fan detection.

The masks follow PLUS's definitions (``vtkPlusPasteSliceIntoVolume``), in pixels of the
MF-oriented image (x = column, y = row, origin at the first pixel):

- **Clip rectangle**: pixels ``origin .. origin + size`` inclusive on both axes, intersected
  with the image. No rectangle (or a zero size): the whole image.
- **Fan**: with apex ``(ox, oy)``, edge angles ``a0 < a1`` (degrees from the +y axis, positive
  towards +x) and radii ``r0 < r1``, row ``y`` keeps the columns
  ``ceil(tan(a0)(y - oy) + ox + 1) .. floor(tan(a1)(y - oy) + ox - 1)`` that also lie within
  ``ox -+ (sqrt(r1^2 - (y - oy)^2) - 1)``; rows farther than ``r1`` below the apex keep nothing;
  where ``(y - oy) < r0`` the middle columns within ``sqrt(r0^2 - (y - oy)^2) - 1`` of ``ox``
  are dropped. Angles ``(0, 0)`` mean no fan (and then the radii do not apply), as in PLUS.
- **Pixel rejection**: a pixel whose channel sum is below ``threshold * n_channels`` is skipped.

Masks are computed once per image size as *row ranges* ``(n_rows, 4)`` int32:
``[x_first, x_last, skip_first, skip_last]`` (inclusive; ``x_last < x_first`` = empty row,
``skip_last < skip_first`` = nothing skipped), which the insertion kernels walk directly.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = [
    "clip_extent_px",
    "clipped_corners_px",
    "fan_row_ranges",
    "row_ranges_to_mask",
    "pixel_mask",
    "detect_fan_angles",
]


def clip_extent_px(n_rows: int, n_cols: int, clip_origin_px=None, clip_size_px=None) -> tuple[int, int, int, int]:
    """Inclusive pixel bounds ``(x0, x1, y0, y1)`` kept by the clip rectangle (PLUS rule).

    Parameters
    ----------
    n_rows, n_cols : int
        Image size in pixels.
    clip_origin_px, clip_size_px : (2,) int or None
        Clip rectangle ``(x, y)`` origin and size, pixels. ``None`` or a zero size: no clipping.

    Returns
    -------
    (x0, x1, y0, y1) : int
        ``x1 < x0`` or ``y1 < y0`` when the rectangle lies outside the image.
    """
    x0, x1, y0, y1 = 0, n_cols - 1, 0, n_rows - 1
    if clip_size_px is not None and clip_size_px[0] > 0 and clip_size_px[1] > 0:
        ox, oy = (0, 0) if clip_origin_px is None else clip_origin_px
        x0, x1 = max(x0, int(ox)), min(x1, int(ox) + int(clip_size_px[0]))
        y0, y1 = max(y0, int(oy)), min(y1, int(oy) + int(clip_size_px[1]))
    return x0, x1, y0, y1


def clipped_corners_px(n_rows: int, n_cols: int, clip_origin_px=None, clip_size_px=None) -> np.ndarray:
    """The four corners ``(4, 2)`` (x, y) of the clipped image, pixels, used for the auto extent."""
    x0, x1, y0, y1 = clip_extent_px(n_rows, n_cols, clip_origin_px, clip_size_px)
    return np.array([[x0, y0], [x0, y1], [x1, y0], [x1, y1]], dtype=np.float64)


_FAST_FLOOR_SHIFT = 103079215104.0  # 1.5 * 2**36: doubles near it have a 2**-16 resolution
_FAST_FLOOR_ADD = _FAST_FLOOR_SHIFT + 7.62939453125e-06  # PLUS/VTK add a 2**-17 tolerance


def _plus_floor(x: float) -> int:
    """PLUS's (vtkImageReslice's) fast floor: x rounded to 2**-16 after adding 2**-17."""
    return int(math.floor(x + _FAST_FLOOR_ADD)) - int(_FAST_FLOOR_SHIFT)


def fan_row_ranges(
    n_rows: int,
    n_cols: int,
    *,
    clip_origin_px=None,
    clip_size_px=None,
    fan_angles_deg=None,
    fan_origin_px=(0.0, 0.0),
    fan_radius_start_px: float = 0.0,
    fan_radius_stop_px: float = 500.0,
    plus_floor: bool = False,
) -> np.ndarray:
    """Per-row kept pixel ranges ``(n_rows, 4)`` int32 for a clip rectangle and a fan.

    See the module docstring for the rules and the layout of the result. With
    ``plus_floor`` the fan bounds are rounded with PLUS's fast floor (which treats values
    within about 1e-5 below an integer as that integer), to reproduce PLUS's masks exactly.
    """
    if plus_floor:
        floor = _plus_floor

        def ceil(v):
            return -_plus_floor(-v)

    else:
        floor, ceil = math.floor, math.ceil
    cx0, cx1, cy0, cy1 = clip_extent_px(n_rows, n_cols, clip_origin_px, clip_size_px)
    out = np.empty((n_rows, 4), dtype=np.int32)
    out[:, 0], out[:, 1] = 0, -1
    out[:, 2], out[:, 3] = 0, -1
    fan = fan_angles_deg is not None and any(a != 0.0 for a in fan_angles_deg)
    if fan:
        t0, t1 = (math.tan(math.radians(a)) for a in fan_angles_deg)
        t0, t1 = min(t0, t1), max(t0, t1)
        ox, oy = float(fan_origin_px[0]), float(fan_origin_px[1])
        r0sq, r1sq = float(fan_radius_start_px) ** 2, float(fan_radius_stop_px) ** 2
    for y in range(max(cy0, 0), min(cy1, n_rows - 1) + 1):
        xs, xe = 0, n_cols - 1
        skip0, skip1 = 0, -1
        if fan:
            dy = y - oy
            xs = max(xs, ceil(t0 * dy + ox + 1.0))
            xe = min(xe, floor(t1 * dy + ox - 1.0))
            stop = r1sq - dy * dy
            if stop < 0:
                continue
            half = math.sqrt(stop)
            xs = max(xs, ceil(ox - half + 1.0))
            xe = min(xe, floor(ox + half - 1.0))
            start = r0sq - dy * dy
            if start > 0:
                half0 = math.sqrt(start)
                skip0, skip1 = ceil(ox - half0 + 1.0), floor(ox + half0 - 1.0)
        xs, xe = max(xs, cx0), min(xe, cx1)
        if xs > xe:
            continue
        if skip1 >= skip0:
            # A skipped segment that overhangs one end just shortens the range.
            if skip0 < xs:
                xs = max(xs, skip1 + 1)
                skip0, skip1 = 0, -1
            elif skip1 > xe:
                xe = min(xe, skip0 - 1)
                skip0, skip1 = 0, -1
            if xs > xe:
                continue
        out[y] = (xs, xe, skip0, skip1)
    return out


def unoptimized_row_ranges(
    n_rows: int,
    n_cols: int,
    *,
    clip_origin_px=None,
    clip_size_px=None,
    fan_angles_deg=None,
    fan_origin_px=(0.0, 0.0),
    fan_radius_start_px: float = 0.0,
    fan_radius_stop_px: float = 500.0,
) -> np.ndarray:
    """Kept pixel ranges ``(n_rows, 4)`` as PLUS's unoptimized insertion (``Optimization="NONE"``) tests them.

    Pixel by pixel, in float64 and in PLUS's order: inside the clip rectangle; with a fan, with
    ``(x, y)`` the pixel minus the apex (pixels), ``y >= 0``, ``x / y`` between the tangents of
    the two fan angles, and ``start**2 <= x**2 + y**2 <= stop**2``. The kept pixels of a row are
    one interval minus at most one inner interval (angles bound x linearly, the start radius
    removes a centred segment), which is the layout :func:`fan_row_ranges` returns.

    Raises
    ------
    ValueError
        A row's kept pixels do not have that layout (cannot happen for a valid fan).
    """
    cx0, cx1, cy0, cy1 = clip_extent_px(n_rows, n_cols, clip_origin_px, clip_size_px)
    x_idx = np.arange(n_cols, dtype=np.float64)
    y_idx = np.arange(n_rows, dtype=np.float64)
    keep = np.zeros((n_rows, n_cols), dtype=bool)
    keep[max(cy0, 0) : min(cy1, n_rows - 1) + 1, max(cx0, 0) : min(cx1, n_cols - 1) + 1] = True
    if fan_angles_deg is not None and any(a != 0.0 for a in fan_angles_deg):
        t0, t1 = (math.tan(math.radians(a)) for a in fan_angles_deg)
        t0, t1 = min(t0, t1), max(t0, t1)
        x = x_idx[None, :] - float(fan_origin_px[0])
        y = y_idx[:, None] - float(fan_origin_px[1])
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = x / y
            # NaN comparisons are False, as in C++: 0 / 0 passes the angle test.
            outside = (y < 0) | (ratio < t0) | (ratio > t1)
            d2 = x * x + y * y
            outside |= (d2 < float(fan_radius_start_px) ** 2) | (d2 > float(fan_radius_stop_px) ** 2)
        keep &= ~outside
    out = np.empty((n_rows, 4), dtype=np.int32)
    out[:, 0], out[:, 1], out[:, 2], out[:, 3] = 0, -1, 0, -1
    for row in range(n_rows):
        cols = np.flatnonzero(keep[row])
        if cols.size == 0:
            continue
        xs, xe = int(cols[0]), int(cols[-1])
        gaps = np.flatnonzero(np.diff(cols) > 1)
        if gaps.size > 1:
            raise ValueError(f"row {row}: the kept pixels form {gaps.size + 1} runs, at most 2 are supported")
        if gaps.size == 1:
            out[row] = (xs, xe, int(cols[gaps[0]]) + 1, int(cols[gaps[0] + 1]) - 1)
        else:
            out[row] = (xs, xe, 0, -1)
    return out


def row_ranges_to_mask(ranges: np.ndarray, n_cols: int) -> np.ndarray:
    """Boolean ``(n_rows, n_cols)`` mask of the pixels kept by ``ranges`` (for display/tests)."""
    ranges = np.asarray(ranges)
    x = np.arange(n_cols)[None, :]
    keep = (x >= ranges[:, 0:1]) & (x <= ranges[:, 1:2])
    skip = (x >= ranges[:, 2:3]) & (x <= ranges[:, 3:4])
    return keep & ~skip


def pixel_mask(n_rows: int, n_cols: int, options) -> np.ndarray:
    """Boolean ``(n_rows, n_cols)`` mask of the pixels that ``options`` keep (clip + fan)."""
    return row_ranges_to_mask(
        fan_row_ranges(
            n_rows,
            n_cols,
            clip_origin_px=options.clip_rectangle_origin_px,
            clip_size_px=options.clip_rectangle_size_px,
            fan_angles_deg=options.fan_angles_deg if options.fan_enabled else None,
            fan_origin_px=options.fan_origin_px,
            fan_radius_start_px=options.fan_radius_start_px,
            fan_radius_stop_px=options.fan_radius_stop_px,
        ),
        n_cols,
    )


def _widest_bright_run(values, thetas, threshold, window, stop_angle):
    """:func:`_widest_bright_run_py` compiled with numba on first use (fan detection only, so a
    reconstruction with given fan angles never imports numba)."""
    compiled = _COMPILED.get("widest")
    if compiled is None:
        from numba import njit

        compiled = _COMPILED["widest"] = njit(cache=True)(_widest_bright_run_py)
    return compiled(values, thetas, threshold, window, stop_angle)


_COMPILED: dict = {}


def _widest_bright_run_py(values, thetas, threshold, window, stop_angle):
    """Widest angular run where a moving window is at least half bright (hysteresis at half).

    Edges are placed at the window's centre when it crosses half bright (PLUS records the
    window's far end, which widens the fan by half a window on each side).
    """
    n = values.shape[0]
    best0, best1 = 0.0, 0.0
    valid = False
    left = 0.0
    half = window / 2.0
    for j in range(window, n):
        count = 0
        for k in range(j - window, j):
            if values[k] >= threshold:
                count += 1
        centre = j - window // 2
        if not valid and count >= half:
            left = thetas[centre]
            valid = True
        elif valid and count <= half:
            if thetas[centre - 1] - left > best1 - best0:
                best0, best1 = left, thetas[centre - 1]
            valid = False
    if valid and stop_angle - left > best1 - best0:
        best0, best1 = left, stop_angle
    return best0, best1


def detect_fan_angles(
    frame: np.ndarray,
    *,
    max_fan_angles_deg,
    fan_origin_px,
    fan_radius_start_px: float,
    fan_radius_stop_px: float,
    brightness_threshold: float = 30.0,
    filter_radius_px: int = 10,
    margin_deg: float = 3.0,
    depth_fractions=(0.15, 0.30, 0.50, 0.70),
) -> tuple[float, float] | None:
    """Fan edge angles of one frame from its brightness (PLUS's automatic fan-angle detection).

    Samples arcs around the fan apex at ``depth_fractions`` of the way from the start to the
    stop radius (one sample per pixel of arc length, within ``max_fan_angles_deg``), finds on
    each arc the widest angular run in which at least half of a ``2 * filter_radius_px``
    sample window is ``>= brightness_threshold`` (edges at the window centre), takes the
    widest run over all arcs and narrows it by ``margin_deg`` on each side (clamped to
    ``max_fan_angles_deg``), as PLUS does.

    Parameters
    ----------
    frame : (n_rows, n_cols[, n_channels]) array, MF; the first channel is used.

    Returns
    -------
    (left_deg, right_deg) or None
        ``None`` when no bright sector is found (an empty frame: PLUS skips it).
    """
    image = np.asarray(frame)
    if image.ndim == 3:
        image = image[..., 0]
    n_rows, n_cols = image.shape
    a0, a1 = (math.radians(a) for a in max_fan_angles_deg)
    a0, a1 = min(a0, a1), max(a0, a1)
    ox, oy = int(fan_origin_px[0]), int(fan_origin_px[1])
    window = 2 * int(filter_radius_px)
    best = (0.0, 0.0)
    for fraction in depth_fractions:
        radius = fan_radius_start_px + (fan_radius_stop_px - fan_radius_start_px) * fraction
        if radius <= 0:
            continue
        step = 1.0 / radius
        count = int((a1 - a0) / step)
        theta = a0 + np.arange(count) * step
        px = np.floor(ox + radius * np.sin(theta) + 0.5).astype(np.int64)
        py = np.floor(oy + radius * np.cos(theta) + 0.5).astype(np.int64)
        inside = (px >= 0) & (px < n_cols) & (py >= 0) & (py < n_rows)
        theta, px, py = theta[inside], px[inside], py[inside]
        if theta.size <= window:
            continue
        values = image[py, px].astype(np.float64)
        left, right = _widest_bright_run(values, theta, float(brightness_threshold), window, a1)
        if right - left > best[1] - best[0]:
            best = (left, right)
    if best == (0.0, 0.0):
        return None
    lo = max(math.degrees(best[0]) + margin_deg, math.degrees(a0))
    hi = min(math.degrees(best[1]) - margin_deg, math.degrees(a1))
    if hi <= lo:
        return None
    return (lo, hi)
