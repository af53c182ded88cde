"""Simulated tracked N-wire recordings with a known calibration (``freehandus simulate nwire``).

The simulator places an N-wire phantom in front of a tracked probe, moves the probe around a
nominal pose (tilts, in-plane rotations, sweeps along the wires), and renders each B-mode frame:

- **Geometry**: the true ImageToProbe (an image-plane pose on the probe marker times the pixel
  spacing, slightly anisotropic), a true PhantomToReference, and per-frame ProbeToReference; the
  dots are the exact intersections of the wires with the image plane.
- **Phantom**: any :class:`NWirePhantom` (every PLUS phantom is built in);
  :func:`settings_for_phantom` picks a depth and field-of-view width that show it whole.
- **Probe**: ``"linear"`` (rectangular field of view, beams along +y), ``"convex"`` (sector
  from an apex behind the transducer arc, beams along the radius) or ``"trus"`` (a transrectal
  transverse array: a convex sector with a small radius and a wide opening), any depth.
- **Image**: correlated Rayleigh speckle; wire echoes with a Gaussian point-spread function whose
  lateral width grows away from the focal depth (and along the beam for convex probes);
  reverberation tails below each wire; long specular reflections of the phantom's walls and
  bottom; echo dropouts (a wire missing in a frame); an overall gain (saturating).
- **Frame grabbing** (``overlays``): what a video grabber records from a scanner's screen:
  burned-in text and a depth scale, caliper crosses on the image, a grey-level bar, and
  letterboxing (the image inside a grey screen with a frame line).
- **Visibility**: ``partial_fraction`` of the frames show only part of the phantom (some wires
  outside the field of view: their truth is NaN and the frame is not ``visible``);
  ``tilt_deg`` sets how oblique the image plane gets.
- **Tracking**: Gaussian pose noise, and a fraction of outlier poses (several mm / degrees off).

Everything is driven by :class:`SimulationSettings` and a seed (deterministic).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from xml.sax.saxutils import quoteattr

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from FreehandUSLib import TrackedSequence

from .correspondences import wire_plane_intersections
from .phantom import NWirePhantom, load_phantom
from .sim_choices import OVERLAYS, PROBES

__all__ = ["SimulationSettings", "SimulatedAcquisition", "simulate_nwire", "settings_for_phantom", "write_simulation",
           "PROBES", "OVERLAYS"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationSettings:
    """What to simulate (sizes in mm, angles in degrees).

    Attributes
    ----------
    phantom : str or NWirePhantom
        Built-in name, file, or phantom object.
    probe : str
        ``"linear"``, ``"convex"`` or ``"trus"``.
    depth_mm : float
        Imaging depth (from the transducer face).
    n_frames : int
    image_size_px : (width, height)
    linear_width_mm : float
        Field-of-view width of the linear probe.
    convex_radius_mm, convex_fov_deg : float
        Radius of the convex transducer's arc and the sector's opening angle.
    trus_radius_mm, trus_fov_deg : float
        The same for the ``"trus"`` probe (a transverse transrectal array).
    tilt_deg : float
        Standard deviation of the random probe rotations about the nominal pose (pose diversity).
    sweep_fraction : float
        The probe slides along the wires over this fraction of their length.
    echo_level, speckle_level : float
        Mean grey level of a wire echo and of the speckle background (0-255).
    psf_axial_mm, psf_lateral_mm : float
        Gaussian sigma of the point-spread function along / across the beam at the focus.
    focus_depth_mm : float or None
        Focal depth (default: half the depth); the lateral sigma grows linearly away from it.
    reverberation : bool
        Add a comet tail (decaying repeated echoes) below each wire.
    walls : bool
        Add specular reflections of the phantom's bottom and side walls.
    dropout_fraction : float
        Fraction of frames where one wire gives no echo.
    partial_fraction : float
        Fraction of frames where some wires are outside the field of view (partial visibility).
    gain : float
        Overall gain applied to the rendered grey levels before clipping to 0-255 (1 = none).
    overlays : tuple of str
        Frame-grabbed screen content, any of :data:`OVERLAYS`.
    tracker_noise_mm, tracker_noise_deg : float
        Gaussian noise of the recorded probe poses (1 sigma per axis).
    outlier_fraction : float
        Fraction of frames whose recorded pose is an outlier.
    outlier_mm, outlier_deg : float
        Size of the outlier pose errors.
    registration_error_mm : float
        Translation error added to the PhantomToReference written to the config (the truth
        stays exact).
    anisotropy : float
        ``sx / sy`` of the pixel spacing.
    seed : int
    """

    phantom: object = "fCal-2.0"
    probe: str = "linear"
    depth_mm: float = 80.0
    n_frames: int = 100
    image_size_px: tuple = (820, 616)
    linear_width_mm: float = 40.0
    convex_radius_mm: float = 60.0
    convex_fov_deg: float = 70.0
    trus_radius_mm: float = 10.0
    trus_fov_deg: float = 140.0
    tilt_deg: float = 10.0
    sweep_fraction: float = 0.5
    echo_level: float = 200.0
    speckle_level: float = 12.0
    psf_axial_mm: float = 0.25
    psf_lateral_mm: float = 0.45
    focus_depth_mm: float | None = None
    reverberation: bool = True
    walls: bool = True
    dropout_fraction: float = 0.0
    partial_fraction: float = 0.0
    gain: float = 1.0
    overlays: tuple = ()
    tracker_noise_mm: float = 0.1
    tracker_noise_deg: float = 0.1
    outlier_fraction: float = 0.0
    outlier_mm: float = 6.0
    outlier_deg: float = 3.0
    registration_error_mm: float = 0.0
    anisotropy: float = 1.03
    seed: int = 0

    def __post_init__(self):
        if self.probe not in PROBES:
            raise ValueError(f"probe: expected one of {', '.join(PROBES)}, got {self.probe!r}")
        object.__setattr__(self, "overlays", tuple(self.overlays))
        unknown = [o for o in self.overlays if o not in OVERLAYS]
        if unknown:
            raise ValueError(f"overlays: expected any of {', '.join(OVERLAYS)}, got {unknown!r}")
        if not (self.gain > 0 and np.isfinite(self.gain)):
            raise ValueError(f"gain: expected a positive number, got {self.gain!r}")
        if not 10.0 <= self.depth_mm <= 300.0:
            raise ValueError(f"depth_mm: expected 10-300 mm, got {self.depth_mm!r}")
        if self.n_frames < 1:
            raise ValueError(f"n_frames: expected at least 1, got {self.n_frames!r}")
        w, h = self.image_size_px
        if w < 64 or h < 64:
            raise ValueError(f"image_size_px: expected at least 64 x 64 pixels, got {self.image_size_px!r}")
        for name in ("dropout_fraction", "outlier_fraction", "sweep_fraction", "partial_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name}: expected a fraction in [0, 1], got {getattr(self, name)!r}")


@dataclass(frozen=True, eq=False)
class SimulatedAcquisition:
    """A simulated recording and its truth.

    Attributes
    ----------
    sequence : TrackedSequence
        Frames (MF, uint8) with ``ProbeToTracker`` and ``ReferenceToTracker`` (recorded, noisy).
    phantom : NWirePhantom
    image_to_probe : (4, 4) float64
        True calibration (pixels -> Probe mm).
    phantom_to_reference : (4, 4) float64
        True phantom pose.
    probe_to_reference_true : (n, 4, 4) float64
        Noise-free poses.
    true_points_px : (n, n_wires, 2) float64
        Exact dot positions (x, y), MF pixels.
    visible : (n,) bool
        Every wire's echo is in the image (no dropout, no wire outside the field of view).
    outlier : (n,) bool
        The recorded pose is an outlier.
    pixel_spacing_mm : (sx, sy)
    settings : SimulationSettings
    fov_mask : (rows, cols) bool
        Pixels inside the probe's field of view.
    partial : (n,) bool
        Frames where some wires are outside the field of view (their ``true_points_px`` are NaN).
    """

    sequence: TrackedSequence
    phantom: NWirePhantom
    image_to_probe: np.ndarray
    phantom_to_reference: np.ndarray
    probe_to_reference_true: np.ndarray
    true_points_px: np.ndarray
    visible: np.ndarray
    outlier: np.ndarray
    pixel_spacing_mm: tuple
    settings: SimulationSettings
    fov_mask: np.ndarray = None
    partial: np.ndarray = None

    def fov_points_px(self, grid: int = 15) -> np.ndarray:
        """Points of a ``grid x grid`` lattice over the image that fall in the field of view, (n, 2) px."""
        h, w = self.fov_mask.shape
        xs, ys = np.meshgrid(np.linspace(0, w - 1, grid), np.linspace(0, h - 1, grid))
        pts = np.stack([xs.ravel(), ys.ravel()], axis=1)
        inside = self.fov_mask[np.round(pts[:, 1]).astype(int), np.round(pts[:, 0]).astype(int)]
        return pts[inside]

    def config_xml(self) -> str:
        """A PLUS configuration with the phantom, its (registered) pose and a spacing hint."""
        return _config_xml(self)

    def summary(self) -> dict:
        s = asdict(self.settings)
        s["phantom"] = self.phantom.name
        s["overlays"] = list(s["overlays"])
        return {
            "phantom": self.phantom.name,
            "frames": int(self.visible.size),
            "frames_visible": int(self.visible.sum()),
            "frames_outlier": int(self.outlier.sum()),
            "frames_partial": int(0 if self.partial is None else self.partial.sum()),
            "pixel_spacing_mm": [float(v) for v in self.pixel_spacing_mm],
            "ImageToProbe": self.image_to_probe.tolist(),
            "PhantomToReference": self.phantom_to_reference.tolist(),
            "settings": s,
        }

    def __str__(self) -> str:
        st = self.settings
        return (f"simulated {st.probe} probe, depth {st.depth_mm:g} mm, phantom {self.phantom.name}: "
                f"{self.visible.size} frames {st.image_size_px[0]}x{st.image_size_px[1]}, "
                f"{self.visible.sum()} with every wire visible, {self.outlier.sum()} outlier poses, "
                f"spacing {self.pixel_spacing_mm[0]:.4f} x {self.pixel_spacing_mm[1]:.4f} mm/px")


# --------------------------------------------------------------------------------------------
# Geometry
# --------------------------------------------------------------------------------------------


@dataclass
class _Probe:
    kind: str
    width: int
    height: int
    sx: float
    sy: float
    cx: float
    y0: float
    depth: float
    half_width_mm: float = 0.0
    radius: float = 0.0
    half_fov: float = 0.0
    mask: np.ndarray = field(default=None, repr=False)

    def plane_mm(self, x, y):
        return (np.asarray(x) - self.cx) * self.sx, (np.asarray(y) - self.y0) * self.sy

    def pixels(self, u, v):
        return np.asarray(u) / self.sx + self.cx, np.asarray(v) / self.sy + self.y0

    def inside(self, u, v, margin_mm):
        """Whether plane points (mm) are inside the field of view, ``margin_mm`` from its edges."""
        u, v = np.asarray(u), np.asarray(v)
        if self.kind == "linear":
            return (np.abs(u) <= self.half_width_mm - margin_mm) & (v >= margin_mm) & (v <= self.depth - margin_mm)
        r = np.hypot(u, v + self.radius)
        theta = np.arctan2(u, v + self.radius)
        ang_margin = margin_mm / np.maximum(r, 1e-6)
        return ((r >= self.radius + margin_mm) & (r <= self.radius + self.depth - margin_mm)
                & (np.abs(theta) <= self.half_fov - ang_margin))

    def beam_angle(self, u, v):
        """Angle of the beam through (u, v) from the +y axis (0 for linear probes)."""
        if self.kind == "linear":
            return np.zeros_like(np.asarray(u, dtype=float))
        return np.arctan2(u, v + self.radius)


def _make_probe(st: SimulationSettings) -> _Probe:
    full_w, full_h = st.image_size_px
    # Letterboxing: the scanner's image sits inside a larger grabbed screen.
    lx, ly = (int(0.08 * full_w), int(0.10 * full_h)) if "letterbox" in st.overlays else (0, 0)
    w, h = full_w - 2 * lx, full_h - 2 * ly
    margin_px = max(4, int(0.02 * h))
    if st.probe == "linear":
        sy = st.depth_mm / (h - 2 * margin_px)
        sx = sy * st.anisotropy
        width_px = st.linear_width_mm / sx
        if width_px > w - 2 * margin_px:
            raise ValueError(
                f"image_size_px {st.image_size_px}: a {st.linear_width_mm:g} mm wide field of view at "
                f"{sx:.3f} mm/px needs {width_px:.0f} px; use a wider image")
        probe = _Probe("linear", full_w, full_h, sx, sy, (full_w - 1) / 2.0, float(ly + margin_px), st.depth_mm,
                       half_width_mm=st.linear_width_mm / 2.0)
    else:
        radius, fov = ((st.convex_radius_mm, st.convex_fov_deg) if st.probe == "convex"
                       else (st.trus_radius_mm, st.trus_fov_deg))
        half = np.radians(fov) / 2.0
        r0, r1 = radius, radius + st.depth_mm
        height_mm = r1 - r0 * np.cos(half)
        width_mm = 2.0 * r1 * np.sin(half)
        sy = max(height_mm / (h - 2 * margin_px), width_mm / (w - 2 * margin_px) / st.anisotropy)
        sx = sy * st.anisotropy
        # The TRUS sector is wide: its arc's ends rise above the arc's middle, keep them in the image.
        top = (r0 - r0 * np.cos(half)) / sy if st.probe == "trus" else 0.0
        probe = _Probe("convex", full_w, full_h, sx, sy, (full_w - 1) / 2.0, float(ly + margin_px + top), st.depth_mm,
                       radius=r0, half_fov=half)
    yy, xx = np.mgrid[0:full_h, 0:full_w]
    u, v = probe.plane_mm(xx, yy)
    probe.mask = probe.inside(u, v, 0.0)
    return probe


def _rigid(rot: np.ndarray, t) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rot
    m[:3, 3] = t
    return m


def _nominal_plane_pose(phantom: NWirePhantom, centre_depth_mm: float):
    """Rotation (image plane -> Phantom) and the phantom point at the image centre line."""
    p0 = phantom.patterns[0]
    d = p0.wires[0].direction
    n = p0.normal.copy()
    last = phantom.patterns[-1].wires[0].front_mm
    if (last - p0.wires[0].front_mm) @ n < 0:
        n = -n
    lateral = p0.wires[0].front_mm - p0.wires[2].front_mm  # from wire 3 to wire 1: image +x (right)
    lateral -= (lateral @ d) * d + (lateral @ n) * n
    lateral /= np.linalg.norm(lateral)
    normal = np.cross(lateral, n)
    rot = np.stack([lateral, n, normal], axis=1)
    # Centre: middle of the side wires of all patterns, half way along the wires.
    mids = []
    for p in phantom.patterns:
        a, c = p.wires[0], p.wires[2]
        mids.append(0.25 * (a.front_mm + a.back_mm + c.front_mm + c.back_mm))
    centre = np.mean(mids, axis=0)
    return rot, centre, d


def _pose_is_good(probe, phantom, plane_to_phantom, margin_mm, blocked=None, partial=False):
    """Whether the image plane ``plane_to_phantom`` shows the phantom; returns (ok, dots (w, 2) mm).

    Every wire crosses the plane within its length. ``partial=False``: all dots inside the field of
    view (``margin_mm`` from its edges) and off the ``blocked`` pixels (screen overlays).
    ``partial=True``: at least 3 dots inside, at least one clearly outside (NaN rows).
    """
    origin = plane_to_phantom[:3, 3]
    normal = plane_to_phantom[:3, 2]
    pts = wire_plane_intersections(origin[None], normal[None], phantom)[0]
    if not np.all(np.isfinite(pts)):
        return False, None
    rel = pts - phantom.wire_front_mm
    t = np.einsum("wk,wk->w", rel, phantom.wire_directions) / np.linalg.norm(
        phantom.wire_back_mm - phantom.wire_front_mm, axis=1)
    if np.any(t < 0.03) or np.any(t > 0.97):
        return False, None
    local = (pts - origin) @ plane_to_phantom[:3, :3]
    inside = probe.inside(local[:, 0], local[:, 1], margin_mm)
    if blocked is not None:
        x, y = probe.pixels(local[:, 0], local[:, 1])
        xi = np.clip(np.round(x).astype(int), 0, blocked.shape[1] - 1)
        yi = np.clip(np.round(y).astype(int), 0, blocked.shape[0] - 1)
        inside &= ~blocked[yi, xi]
    if not partial:
        return (True, local[:, :2]) if np.all(inside) else (False, None)
    outside = ~probe.inside(local[:, 0], local[:, 1], -3.0 * margin_mm)
    if inside.sum() < 3 or not outside.any() or not np.all(inside | outside):
        return False, None
    dots = local[:, :2].copy()
    dots[~inside] = np.nan
    return True, dots


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _speckle(rng, shape, sig_x, sig_y):
    re = rng.standard_normal(shape).astype(np.float32)
    im = rng.standard_normal(shape).astype(np.float32)
    re = cv2.GaussianBlur(re, (0, 0), sigmaX=sig_x, sigmaY=sig_y)
    im = cv2.GaussianBlur(im, (0, 0), sigmaX=sig_x, sigmaY=sig_y)
    mag = cv2.magnitude(re, im)
    return mag / max(float(mag.mean()), 1e-6)


def _add_blob(img, x, y, amp, sig_along, sig_across, angle):
    """Add an oriented Gaussian (sigmas in px; ``angle``: beam direction from +y, radians)."""
    r = int(np.ceil(4.0 * max(sig_along, sig_across))) + 1
    x0, x1 = max(0, int(x) - r), min(img.shape[1], int(x) + r + 2)
    y0, y1 = max(0, int(y) - r), min(img.shape[0], int(y) + r + 2)
    if x0 >= x1 or y0 >= y1:
        return
    yy, xx = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    dx, dy = xx - x, yy - y
    c, s = np.cos(angle), np.sin(angle)
    along = dx * s + dy * c
    across = dx * c - dy * s
    img[y0:y1, x0:x1] += amp * np.exp(-0.5 * ((along / sig_along) ** 2 + (across / sig_across) ** 2))


def _draw_wall(img, probe, p_a, p_b, amp, thickness_px):
    """A specular reflection along the segment between plane points p_a, p_b (mm)."""
    xa, ya = probe.pixels(*p_a)
    xb, yb = probe.pixels(*p_b)
    layer = np.zeros_like(img)
    cv2.line(layer, (int(round(xa)), int(round(ya))), (int(round(xb)), int(round(yb))), float(amp),
             max(1, int(round(thickness_px))), lineType=cv2.LINE_AA)
    img += cv2.GaussianBlur(layer, (0, 0), max(0.8, thickness_px / 2.0))


def _plane_line(plane_to_phantom, point, normal):
    """Intersection of the image plane with a phantom plane: (point (u, v), direction (u, v))."""
    n_img = plane_to_phantom[:3, :3].T @ normal  # the wall normal in plane coordinates
    p_img = plane_to_phantom[:3, :3].T @ (point - plane_to_phantom[:3, 3])
    # Points (u, v, 0) with n_img . ((u, v, 0) - p_img) = 0.
    a, b = n_img[0], n_img[1]
    if np.hypot(a, b) < 1e-6:
        return None
    c = n_img @ p_img
    base = np.array([a, b]) * c / (a * a + b * b)
    return base, np.array([-b, a]) / np.hypot(a, b)


def _render(rng, st: SimulationSettings, probe: _Probe, phantom: NWirePhantom, plane_to_phantom, dots_mm,
            drop_wire):
    h, w = probe.height, probe.width
    focus = st.focus_depth_mm if st.focus_depth_mm is not None else 0.5 * st.depth_mm
    sig_ax_px = st.psf_axial_mm / probe.sy
    img = _speckle(rng, (h, w), st.psf_lateral_mm / probe.sx, sig_ax_px) * np.float32(st.speckle_level)
    # Depth attenuation of the background (time-gain compensation is not perfect).
    img *= np.linspace(1.0, 0.75, h, dtype=np.float32)[:, None]
    echoes = np.zeros((h, w), np.float32)
    for k, (u, v) in enumerate(dots_mm):
        if k == drop_wire or not (np.isfinite(u) and np.isfinite(v)):
            continue
        rng_depth = v if probe.kind == "linear" else np.hypot(u, v + probe.radius) - probe.radius
        sig_lat_mm = st.psf_lateral_mm * (1.0 + 1.2 * abs(rng_depth - focus) / max(focus, 1.0))
        angle = float(probe.beam_angle(u, v))
        x, y = probe.pixels(u, v)
        amp = st.echo_level * rng.uniform(0.55, 1.0) * (1.0 - 0.3 * rng_depth / st.depth_mm)
        sx_px = sig_lat_mm / probe.sx
        _add_blob(echoes, x, y, amp, sig_ax_px, sx_px, angle)
        if st.reverberation:
            step = 1.2 * st.psf_axial_mm * 3.0
            for j in range(1, 4):
                du, dv = j * step * np.sin(angle), j * step * np.cos(angle)
                xr, yr = probe.pixels(u + du, v + dv)
                _add_blob(echoes, xr, yr, amp * 0.35 ** j, sig_ax_px * 1.3, sx_px * 0.8, angle)
    # Speckle modulates the echoes a little (they are not perfectly smooth).
    img += echoes * (0.8 + 0.2 * _speckle(rng, (h, w), 1.0, 1.0))
    if st.walls:
        _add_walls(img, st, probe, phantom, plane_to_phantom)
    img *= np.float32(st.gain)
    img[~probe.mask] = 0
    return np.clip(img, 0, 255).astype(np.uint8)


def _add_walls(img, st, probe, phantom, plane_to_phantom):
    p0 = phantom.patterns[0]
    n = p0.normal.copy()
    last = phantom.patterns[-1]
    if (last.wires[0].front_mm - p0.wires[0].front_mm) @ n < 0:
        n = -n
    d = p0.wires[0].direction
    lateral = np.cross(n, d)
    fronts = phantom.wire_front_mm
    # Bottom: 8 mm below the last pattern; sides: 8 mm beyond the outermost wires.
    walls = [(last.wires[0].front_mm + 8.0 * n, n)]
    proj = fronts @ lateral
    walls.append((fronts[np.argmax(proj)] + 8.0 * lateral, lateral))
    walls.append((fronts[np.argmin(proj)] - 8.0 * lateral, lateral))
    thickness = 0.35 / probe.sy
    diag = np.hypot(probe.width * probe.sx, probe.height * probe.sy)
    for point, normal in walls:
        line = _plane_line(plane_to_phantom, point, normal)
        if line is None:
            continue
        base, direction = line
        _draw_wall(img, probe, base - diag * direction, base + diag * direction, 0.6 * st.echo_level, thickness)


# --------------------------------------------------------------------------------------------
# Frame-grabbed screen content
# --------------------------------------------------------------------------------------------


def _screen_layer(st: SimulationSettings, probe: _Probe):
    """The static screen content of a frame grabber (text, depth scale, grey bar, letterbox).

    Returns (layer uint8 (h, w), drawn bool (h, w)): grey levels and where they replace the image.
    """
    h, w = probe.height, probe.width
    layer = np.zeros((h, w), np.uint8)
    drawn = np.zeros((h, w), np.uint8)
    if "letterbox" in st.overlays:
        inner = np.zeros((h, w), np.uint8)
        lx, ly = int(0.08 * w), int(0.10 * h)
        inner[ly:h - ly, lx:w - lx] = 1
        layer[inner == 0] = 45  # the scanner's grey user interface around the image
        drawn[inner == 0] = 1
        cv2.rectangle(layer, (lx - 1, ly - 1), (w - lx, h - ly), 120, 1)
        cv2.rectangle(drawn, (lx - 1, ly - 1), (w - lx, h - ly), 1, 1)
    scale = max(0.3, 0.4 * h / 308.0)
    if "text" in st.overlays:
        lines = [(f"{st.probe.upper()} {st.depth_mm / 10:.1f}cm G{round(50 * st.gain)}%", (4, 0)),
                 ("MI 0.9 TIs 0.4", (-1, 0)), ("FR 21Hz", (-1, 1))]
        for text, (col, row) in lines:
            (tw, th), base = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, scale, 1)
            x = col if col >= 0 else w - tw - 4
            y = 4 + (row + 1) * (th + base + 2)
            for img, value in ((layer, 230), (drawn, 1)):
                cv2.putText(img, text, (x, y), cv2.FONT_HERSHEY_SIMPLEX, scale, value, 1, cv2.LINE_AA)
        # Depth scale: a tick every 10 mm (a longer one every 50 mm) left of the field of view.
        cols = np.flatnonzero(probe.mask.any(axis=0))
        x0 = max(2, int(cols[0]) - 10) if cols.size else 2
        for depth in np.arange(0.0, st.depth_mm + 1e-6, 10.0):
            y = int(round(probe.pixels(0.0, depth)[1]))
            length = 6 if depth % 50 == 0 else 3
            for img, value in ((layer, 200), (drawn, 1)):
                cv2.line(img, (x0 - length, y), (x0, y), value, 1)
    if "colour-bar" in st.overlays:
        x1 = w - 6 - (int(0.08 * w) if "letterbox" in st.overlays else 0)
        x0, y0, y1 = x1 - max(6, w // 60), int(0.2 * h), int(0.6 * h)
        layer[y0:y1, x0:x1] = np.linspace(255, 0, y1 - y0, dtype=np.float32).astype(np.uint8)[:, None]
        drawn[y0:y1, x0:x1] = 1
        for img, value in ((layer, 180), (drawn, 1)):
            cv2.rectangle(img, (x0 - 1, y0 - 1), (x1, y1), value, 1)
    return layer, drawn.astype(bool)


def _grab(img, rng, st: SimulationSettings, probe: _Probe, layer, drawn, dots_mm):
    """Put the screen content over a rendered frame; calipers at random places away from the dots."""
    out = np.where(drawn, layer, img)
    if "calipers" in st.overlays:
        arm = max(3, int(round(1.5 / probe.sx)))
        finite = dots_mm[np.all(np.isfinite(dots_mm), axis=1)]
        placed = 0
        for _ in range(200):
            u = rng.uniform(-0.5, 0.5) * probe.width * probe.sx
            v = rng.uniform(0.1, 0.9) * st.depth_mm
            if not probe.inside(u, v, 3.0) or (finite.size and np.min(np.hypot(*(finite - [u, v]).T)) < 4.0):
                continue
            x, y = (int(round(c)) for c in probe.pixels(u, v))
            cv2.line(out, (x - arm, y), (x + arm, y), 255, 1)
            cv2.line(out, (x, y - arm), (x, y + arm), 255, 1)
            placed += 1
            if placed == 2:
                break
        scale = max(0.3, 0.4 * probe.height / 308.0)
        cv2.putText(out, f"D1 {rng.uniform(5, 40):.1f}mm", (4, probe.height - 6), cv2.FONT_HERSHEY_SIMPLEX, scale,
                    230, 1, cv2.LINE_AA)
    return out


def settings_for_phantom(phantom, probe: str = "linear", *, margin_mm: float = 12.0, **overrides) -> SimulationSettings:
    """Simulation settings whose field of view shows the whole ``phantom`` with room to tilt.

    The depth covers the phantom's pattern stack (its layer offsets) plus ``margin_mm`` above and
    below; a linear probe is made wide enough for the widest pattern plus ``margin_mm`` each
    side; a convex/TRUS probe gets the depth at which its sector is wide enough.

    Parameters
    ----------
    phantom : str, Path or NWirePhantom
    probe : str
        One of :data:`PROBES`.
    margin_mm : float
        Room around the phantom, mm.
    **overrides
        Other :class:`SimulationSettings` fields (``depth_mm`` given here wins).
    """
    ph = load_phantom(phantom)
    rot, _, d = _nominal_plane_pose(ph, 0.0)
    lateral = rot[:, 0]
    side = np.concatenate([[p.wires[0].front_mm, p.wires[2].front_mm] for p in ph.patterns])
    width = float(np.ptp(side @ lateral))
    span = float(np.ptp(ph.layer_offsets_mm))
    depth = span + 2.0 * margin_mm + 10.0
    base = SimulationSettings(phantom=ph, probe=probe)
    extra = {}
    if probe == "linear":
        extra["linear_width_mm"] = max(40.0, width + 2.0 * margin_mm)
        # A wide field of view on a small image needs a coarser spacing, i.e. a larger depth.
        w_px, h_px = overrides.get("image_size_px", base.image_size_px)
        m = 2 * max(4, int(0.02 * h_px)) + 2
        anisotropy = overrides.get("anisotropy", base.anisotropy)
        depth = max(depth, 1.05 * extra["linear_width_mm"] * (h_px - m) / ((w_px - m) * anisotropy))
    else:
        radius, fov = ((base.convex_radius_mm, base.convex_fov_deg) if probe == "convex"
                       else (base.trus_radius_mm, base.trus_fov_deg))
        half = np.radians(fov) / 2.0
        # Depth where the sector's chord at the phantom's first pattern is wide enough.
        need = (width / 2.0 + margin_mm) / np.sin(half) - radius
        depth = max(depth, need + span + margin_mm)
    extra["depth_mm"] = float(np.ceil(depth / 5.0) * 5.0)
    return SimulationSettings(**{**asdict(base), "phantom": ph, **extra, **overrides})


# --------------------------------------------------------------------------------------------
# Simulation
# --------------------------------------------------------------------------------------------


def _random_rigid(rng, sigma_mm, sigma_deg):
    return _rigid(Rotation.from_rotvec(np.radians(sigma_deg) * rng.standard_normal(3)).as_matrix(),
                  sigma_mm * rng.standard_normal(3))


def simulate_nwire(settings: SimulationSettings | None = None, **overrides) -> SimulatedAcquisition:
    """Simulate a tracked N-wire recording (see the module docstring).

    Parameters
    ----------
    settings : SimulationSettings, optional
    **overrides
        Fields of :class:`SimulationSettings` to change.

    Returns
    -------
    SimulatedAcquisition

    Raises
    ------
    ValueError
        Bad settings, or no probe pose shows the whole phantom (phantom too large for the
        field of view at this depth).
    """
    st = settings or SimulationSettings()
    if overrides:
        st = SimulationSettings(**{**asdict(st), **overrides})
    rng = np.random.default_rng(st.seed)
    phantom = load_phantom(st.phantom)
    probe = _make_probe(st)

    # True calibration: image plane -> probe marker (rigid), times the pixel spacing.
    plane_to_probe = _rigid(Rotation.from_euler("xyz", [92.0, -3.0, 88.0], degrees=True).as_matrix(),
                            [12.0, -8.0, 45.0])
    pixel_to_plane = np.array([[probe.sx, 0, 0, -probe.cx * probe.sx],
                               [0, probe.sy, 0, -probe.y0 * probe.sy],
                               [0, 0, 0.5 * (probe.sx + probe.sy), 0],
                               [0, 0, 0, 1.0]])
    image_to_probe = plane_to_probe @ pixel_to_plane
    phantom_to_reference = _rigid(Rotation.from_euler("zyx", [30.0, -20.0, 10.0], degrees=True).as_matrix(),
                                  [40.0, -25.0, 120.0])
    reference_to_tracker = _rigid(Rotation.from_euler("xyz", [10.0, 20.0, -30.0], degrees=True).as_matrix(),
                                  [300.0, -50.0, -900.0])

    rot0, centre, wire_dir = _nominal_plane_pose(phantom, 0.0)
    span = float(np.ptp(phantom.layer_offsets_mm))
    if probe.kind == "linear":
        v_c = float(np.clip(0.5 * st.depth_mm, span / 2 + 6.0, st.depth_mm - span / 2 - 6.0))
    else:
        v_c = float(np.clip(0.5 * st.depth_mm, span / 2 + 8.0, st.depth_mm - span / 2 - 6.0))
    wire_len = float(np.linalg.norm(phantom.patterns[0].wires[0].back_mm - phantom.patterns[0].wires[0].front_mm))

    n = st.n_frames
    poses_true = np.zeros((n, 4, 4))
    plane_poses = np.zeros((n, 4, 4))
    dots_plane = np.zeros((n, phantom.n_wires, 2))
    margin = 1.5
    layer, drawn = _screen_layer(st, probe)
    blocked = cv2.dilate(drawn.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool) if drawn.any() else None
    # Half-width of the field of view at the phantom's centre depth (partial frames shift by about it).
    half_view = probe.half_width_mm if probe.kind == "linear" else (probe.radius + v_c) * np.sin(probe.half_fov)
    want_partial = rng.uniform(size=n) < st.partial_fraction if st.partial_fraction > 0 else np.zeros(n, bool)
    partial = np.zeros(n, bool)
    for f in range(n):
        for attempt in range(700):
            part = bool(want_partial[f]) and attempt < 400
            tilt = st.tilt_deg * (1.0 if attempt < 300 else 0.5)
            rot = Rotation.from_rotvec(np.radians(tilt) * rng.standard_normal(3)).as_matrix() @ rot0
            along = st.sweep_fraction * wire_len * (rng.uniform() - 0.5)
            du = rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 1.2) * half_view if part else rng.normal(0, 1.5)
            shift = along * wire_dir + rot @ np.array([du, rng.normal(0, 1.5), 0.0])
            t = centre + shift - rot @ np.array([0.0, v_c, 0.0])
            pose = _rigid(rot, t)
            ok, local = _pose_is_good(probe, phantom, pose, margin, blocked, partial=part)
            if ok:
                partial[f] = part
                break
        else:
            raise ValueError(
                f"no probe pose shows the whole {phantom.name} phantom in a {st.probe} field of view of depth "
                f"{st.depth_mm:g} mm; increase the depth or the field of view")
        plane_poses[f] = pose
        dots_plane[f] = local
        poses_true[f] = phantom_to_reference @ pose @ np.linalg.inv(plane_to_probe)

    xs, ys = probe.pixels(dots_plane[..., 0], dots_plane[..., 1])
    true_points = np.stack([xs, ys], axis=-1)

    dropout = rng.uniform(size=n) < st.dropout_fraction
    drop_wire = np.where(dropout, rng.integers(0, phantom.n_wires, size=n), -1)
    outlier = rng.uniform(size=n) < st.outlier_fraction
    recorded = poses_true.copy()
    for f in range(n):
        recorded[f] = recorded[f] @ _random_rigid(rng, st.tracker_noise_mm, st.tracker_noise_deg)
        if outlier[f]:
            dirv = rng.standard_normal(3)
            axis = rng.standard_normal(3)
            err = _rigid(Rotation.from_rotvec(np.radians(st.outlier_deg) * axis / np.linalg.norm(axis)).as_matrix(),
                         st.outlier_mm * dirv / np.linalg.norm(dirv))
            recorded[f] = recorded[f] @ err
    frames = np.zeros((n, probe.height, probe.width), np.uint8)
    screen_rng = np.random.default_rng([st.seed, 7])  # its own stream: overlays change nothing else
    for f in range(n):
        frames[f] = _render(rng, st, probe, phantom, plane_poses[f], dots_plane[f], int(drop_wire[f]))
        if st.overlays:
            frames[f] = _grab(frames[f], screen_rng, st, probe, layer, drawn, dots_plane[f])

    probe_to_tracker = reference_to_tracker @ recorded
    timestamps = np.arange(n, dtype=np.float64) / 10.0
    seq = TrackedSequence(
        frames=frames, timestamps_s=timestamps,
        transforms={"ProbeToTracker": (probe_to_tracker, np.ones(n, bool)),
                    "ReferenceToTracker": (np.repeat(reference_to_tracker[None], n, axis=0), np.ones(n, bool))},
        pixel_spacing_mm=(probe.sx, probe.sy),
        metadata={"UltrasoundImageType": "BRIGHTNESS"},
    )
    return SimulatedAcquisition(seq, phantom, image_to_probe, phantom_to_reference, poses_true, true_points,
                                ~dropout & ~partial, outlier, (probe.sx, probe.sy), st, probe.mask, partial)


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _matrix_text(m) -> str:
    return "\n".join("        " + " ".join(f"{v:.10g}" for v in row) for row in np.asarray(m))


def _config_xml(sim: SimulatedAcquisition) -> str:
    st = sim.settings
    y = sim.phantom_to_reference.copy()
    if st.registration_error_mm > 0:
        err = np.random.default_rng(st.seed + 1).standard_normal(3)
        y[:3, 3] += st.registration_error_mm * err / np.linalg.norm(err)
    hint = round(float(np.mean(sim.pixel_spacing_mm)), 3)
    patterns = []
    for p in sim.phantom.patterns:
        wires = "\n".join(
            f"        <Wire Name={quoteattr(w.name)} EndPointFront=\"{' '.join(f'{v:g}' for v in w.front_mm)}\" "
            f"EndPointBack=\"{' '.join(f'{v:g}' for v in w.back_mm)}\" />" for w in p.wires)
        patterns.append(f"      <Pattern Type=\"NWire\">\n{wires}\n      </Pattern>")
    return f"""<PlusConfiguration version="2.1">
  <DataCollection StartupDelaySec="1.0">
    <DeviceSet Name="FreehandUS simulated N-wire recording" Description={quoteattr(str(sim))} />
  </DataCollection>
  <CoordinateDefinitions>
    <Transform From="Phantom" To="Reference"
      Matrix="
{_matrix_text(y)}"
      Error="{st.registration_error_mm:g}" />
  </CoordinateDefinitions>
  <Segmentation ApproximateSpacingMmPerPixel="{hint:g}" />
  <PhantomDefinition>
    <Description Name={quoteattr(sim.phantom.name)} Type="Multi-N" Version="1.0" WiringVersion="1.0"
      Institution="FreehandUS simulation" />
    <Geometry>
{chr(10).join(patterns)}
    </Geometry>
  </PhantomDefinition>
</PlusConfiguration>
"""


def write_simulation(sim: SimulatedAcquisition, out, *, config_path=None, truth_path=None) -> dict:
    """Write the sequence, a PLUS config and a truth JSON.

    Parameters
    ----------
    sim : SimulatedAcquisition
    out : str or Path
        Sequence file (``.igs.mha``, ``.igs.nrrd``...).
    config_path, truth_path : optional
        Defaults: ``<out stem>.config.xml`` and ``<out stem>.truth.json`` next to ``out``.

    Returns
    -------
    dict with the paths written (``sequence``, ``config``, ``truth``).
    """
    from FreehandUSLib.io import write_sequence

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    stem = out.name.split(".")[0]
    config_path = Path(config_path) if config_path else out.with_name(stem + ".config.xml")
    truth_path = Path(truth_path) if truth_path else out.with_name(stem + ".truth.json")
    seq_path = write_sequence(sim.sequence, out)
    config_path.write_text(sim.config_xml(), encoding="utf-8")
    truth = sim.summary()
    truth.update({
        "wire_names": sim.phantom.wire_names,
        "true_points_px": np.where(np.isfinite(sim.true_points_px), sim.true_points_px, None).tolist(),
        "visible": sim.visible.tolist(),
        "outlier": sim.outlier.tolist(),
        "ProbeToReference_true": sim.probe_to_reference_true.tolist(),
    })
    truth_path.write_text(json.dumps(truth, indent=1) + "\n", encoding="utf-8")
    return {"sequence": Path(seq_path), "config": config_path, "truth": truth_path}
