"""A second ultrasound sweep simulator, written independently of ``FreehandUSLib.simulation``.

For **testing only**: it is the project's stand-in for "a probe the models were not trained
on", so nothing may ever train on it (no training code imports it). It shares no code with the
training simulator and differs from it on purpose in every modelling choice:

- **scatterers**: a compound medium: diffuse scatterers whose density and log-normal amplitude
  vary with the tissue (not one scatterer law everywhere), plus specular interfaces drawn as
  dense bright sheets;
- **tissue**: wavy layers (skin, fat, muscle), vessels (anechoic tubes with a bright wall at any
  angle to the sweep), and ellipsoidal inclusions brighter or darker than their layer;
- **PSF**: axially a Gabor pulse (Gaussian envelope on the carrier, the phase from each
  scatterer's exact range), laterally a Gaussian-apodised sinc, elevationally a Hann window
  whose half-width follows a focused beam (narrowest at the elevation focus, growing away
  from it); on a convex probe the lateral width is an angle, so it widens with depth;
- **attenuation and TGC**: two-way attenuation in dB/(cm MHz), compensated only partly by the
  time-gain compensation, so the image darkens or brightens with depth;
- **probe geometry**: linear or convex (polar beam grid scan-converted to the pixels, black
  outside the sector), pixel size 0.2 mm by default (the training default is coarser);
- **trajectories**: freehand paths with pauses and direction changes along the sweep, lateral
  wander, slow tilt / rock / twist and tremor.

Frames: row 0 at the transducer face, column 0 on the left; the Probe frame has ``x`` lateral,
``y`` depth and ``z = x cross y`` (elevation), in mm, with its origin at the middle of the face.
``ImageToProbe`` is right-handed (PLUS-style, ``det > 0``). Sweeps go along ``-z`` of the image
("toward", the training convention) unless ``direction="away"``.

Everything is numpy + OpenCV; one ``seed`` fixes a sweep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import cv2
import numpy as np
from scipy.spatial.transform import Rotation

from FreehandUSLib.sequence import TrackedSequence

__all__ = ["IndependentProbe", "PROBES", "IndependentSweep", "simulate", "render_frame", "benchmark_sweeps"]

SPEED_MM_PER_US = 1.54


@dataclass(frozen=True)
class IndependentProbe:
    """A probe of the independent simulator (all lengths in mm, frequency in MHz).

    kind : "linear" or "convex"
    width_mm : linear: aperture width (image width); convex: unused (the sector sets the width)
    depth_mm : imaging depth below the face
    radius_mm, sector_deg : convex: radius of the face and full opening angle
    frequency_mhz : centre frequency (wavelength = 1.54 / f mm)
    cycles : pulse length in cycles (axial Gaussian envelope FWHM = cycles wavelengths / 2)
    lateral_mm : lateral beam width (first zero of the sinc) at the lateral focus, mm; convex:
        the same as an angle at ``radius_mm``
    elevation_half_mm : half-width of the elevational Hann window at the elevation focus
    elevation_focus_mm, elevation_rayleigh_mm : depth of the elevation focus and the depth over
        which the half-width grows by sqrt(2)
    attenuation_db_cm_mhz, tgc_fraction : two-way attenuation and the share the TGC undoes
    pixel_mm : output pixel size (square)
    dynamic_range_db : log compression
    """

    name: str = "L-7"
    kind: str = "linear"
    width_mm: float = 38.0
    depth_mm: float = 40.0
    radius_mm: float = 45.0
    sector_deg: float = 60.0
    frequency_mhz: float = 7.0
    cycles: float = 2.0
    lateral_mm: float = 0.7
    elevation_half_mm: float = 1.4
    elevation_focus_mm: float = 18.0
    elevation_rayleigh_mm: float = 14.0
    attenuation_db_cm_mhz: float = 0.5
    tgc_fraction: float = 0.8
    pixel_mm: float = 0.2
    dynamic_range_db: float = 55.0

    @property
    def wavelength_mm(self) -> float:
        return SPEED_MM_PER_US / self.frequency_mhz

    def elevation_half_width(self, depth_mm):
        """Half-width (mm) of the elevational Hann window at ``depth_mm``."""
        d = np.asarray(depth_mm, dtype=np.float64)
        return self.elevation_half_mm * np.sqrt(1.0 + ((d - self.elevation_focus_mm) / self.elevation_rayleigh_mm) ** 2)


#: The three benchmark probes: two linear (different bands and elevational beams), one convex.
PROBES = (
    IndependentProbe(name="L-7", kind="linear", frequency_mhz=7.0, lateral_mm=0.6, elevation_half_mm=1.2,
                     elevation_focus_mm=15.0, depth_mm=36.0, width_mm=36.0),
    IndependentProbe(name="L-5", kind="linear", frequency_mhz=5.0, cycles=2.5, lateral_mm=0.9, elevation_half_mm=2.0,
                     elevation_focus_mm=22.0, depth_mm=44.0, width_mm=40.0, attenuation_db_cm_mhz=0.6,
                     tgc_fraction=0.7),
    IndependentProbe(name="C-3.5", kind="convex", frequency_mhz=3.5, cycles=2.0, lateral_mm=1.2, elevation_half_mm=2.4,
                     elevation_focus_mm=30.0, elevation_rayleigh_mm=20.0, depth_mm=60.0, radius_mm=40.0,
                     sector_deg=56.0, pixel_mm=0.3, attenuation_db_cm_mhz=0.45, tgc_fraction=0.9),
)


# ---- tissue -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tissue:
    """A random tissue block in world mm (x lateral, y along the sweep, z depth down)."""

    layer_depths: np.ndarray  # (k,) mean depth of each interface
    layer_waves: np.ndarray  # (k, 4) amplitude, wavelength x, wavelength y, phase of each interface
    layer_gain: np.ndarray  # (k + 1,) echogenicity of each layer (amplitude factor)
    layer_density: np.ndarray  # (k + 1,) scatterers per mm^3 (relative)
    vessels: list = field(default_factory=list)  # (point, unit axis, radius)
    inclusions: list = field(default_factory=list)  # (centre, semi-axes, gain)

    def layer_index(self, p: np.ndarray) -> np.ndarray:
        x, y, z = p[:, 0], p[:, 1], p[:, 2]
        idx = np.zeros(len(p), dtype=int)
        for k, (d, (a, lx, ly, ph)) in enumerate(zip(self.layer_depths, self.layer_waves)):
            surface = d + a * np.sin(2 * np.pi * x / lx + ph) * np.cos(2 * np.pi * y / ly)
            idx += z > surface
        return idx


def _random_tissue(rng: np.random.Generator, depth_mm: float) -> Tissue:
    k = int(rng.integers(2, 4))
    depths = np.sort(rng.uniform(2.0, 0.6 * depth_mm, k))
    waves = np.column_stack([rng.uniform(0.3, 2.0, k), rng.uniform(15, 60, k), rng.uniform(20, 90, k), rng.uniform(0, 6, k)])
    gain = rng.uniform(0.4, 1.4, k + 1)
    density = rng.uniform(0.5, 1.5, k + 1)
    vessels = []
    for _ in range(int(rng.integers(1, 3))):
        axis = np.array([rng.uniform(-1, 1), rng.uniform(-1, 1), rng.uniform(-0.2, 0.2)])
        vessels.append((np.array([rng.uniform(-12, 12), rng.uniform(0, 40), rng.uniform(0.3, 0.8) * depth_mm]),
                        axis / np.linalg.norm(axis), float(rng.uniform(1.5, 4.0))))
    inclusions = []
    for _ in range(int(rng.integers(1, 4))):
        inclusions.append((np.array([rng.uniform(-15, 15), rng.uniform(0, 80), rng.uniform(0.2, 0.9) * depth_mm]),
                           rng.uniform(2.0, 7.0, 3), float(rng.choice([0.3, 2.2]))))
    return Tissue(depths, waves, gain, density, vessels, inclusions)


def _scatterers(tissue: Tissue, box_min, box_max, rng, per_mm3: float):
    """Scatterer positions (m, 3) and complex-free amplitudes (m,) in world mm."""
    lo, hi = np.asarray(box_min, float), np.asarray(box_max, float)
    n = int(per_mm3 * np.prod(hi - lo) * float(tissue.layer_density.max()))
    p = rng.uniform(lo, hi, (n, 3))
    layer = tissue.layer_index(p)
    keep = rng.random(n) < tissue.layer_density[layer] / tissue.layer_density.max()  # density per layer (thinning)
    p, layer = p[keep], layer[keep]
    amp = tissue.layer_gain[layer] * rng.lognormal(0.0, 0.5, len(p))  # log-normal, not Gaussian, amplitudes
    for centre, axis, radius in tissue.vessels:
        d = p - centre
        along = d @ axis
        r = np.linalg.norm(d - along[:, None] * axis, axis=1)
        amp = np.where(r < radius, 0.02 * amp, amp)
        amp = np.where(np.abs(r - radius) < 0.25, 3.0 * amp, amp)  # bright wall
    for centre, semi, g in tissue.inclusions:
        inside = (((p - centre) / semi) ** 2).sum(axis=1) < 1.0
        amp = np.where(inside, g * amp, amp)
    # specular interfaces: dense bright sheets on each layer surface
    sheets = []
    area = (hi[0] - lo[0]) * (hi[1] - lo[1])
    for d, (a, lx, ly, ph) in zip(tissue.layer_depths, tissue.layer_waves):
        m = int(6.0 * area)
        xy = rng.uniform(lo[:2], hi[:2], (m, 2))
        z = d + a * np.sin(2 * np.pi * xy[:, 0] / lx + ph) * np.cos(2 * np.pi * xy[:, 1] / ly) + rng.normal(0, 0.05, m)
        sheets.append((np.column_stack([xy, z]), 4.0 * rng.lognormal(0.0, 0.3, m)))
    pts = np.concatenate([p] + [s[0] for s in sheets])
    amps = np.concatenate([amp] + [s[1] for s in sheets])
    return pts, amps


# ---- trajectories -------------------------------------------------------------------------------


def _smooth_noise(rng, n, scale, knots):
    """A smooth random curve of n samples (cubic interpolation of ``knots`` random values)."""
    from scipy.interpolate import CubicSpline

    t = np.linspace(0, 1, knots)
    return CubicSpline(t, rng.normal(0, scale, knots))(np.linspace(0, 1, n))


def freehand_trajectory(rng, n_frames: int, length_mm: float, *, pauses: bool = True, reversals: bool = True):
    """Probe positions along the sweep (n,) with pauses and direction changes, and the probe
    poses' small angles (n, 3) deg and lateral / depth wander (n, 2) mm.

    The signed speed is a sum of segments: forward, optionally a pause (speed 0 for 5-15 % of
    the frames) and a short reversal (backwards for 5-10 % of the frames), scaled so that the
    **path length** along the sweep is ``length_mm``."""
    speed = np.ones(n_frames)
    if pauses:
        for _ in range(int(rng.integers(1, 3))):
            a = int(rng.integers(n_frames // 8, 7 * n_frames // 8))
            speed[a : a + int(rng.uniform(0.05, 0.15) * n_frames)] = 0.0
    if reversals:
        a = int(rng.integers(n_frames // 4, 3 * n_frames // 4))
        speed[a : a + int(rng.uniform(0.05, 0.1) * n_frames)] = -0.8
    speed = np.convolve(speed, np.ones(5) / 5, mode="same") * (1.0 + 0.3 * _smooth_noise(rng, n_frames, 1.0, 6))
    speed[0] = 0.0
    s = np.cumsum(speed)
    s *= length_mm / max(np.abs(np.diff(s)).sum(), 1e-9)
    angles = np.column_stack([_smooth_noise(rng, n_frames, a, 5) for a in rng.uniform(1.0, 6.0, 3)])
    angles += rng.normal(0, 0.05, angles.shape)  # tremor
    wander = np.column_stack([_smooth_noise(rng, n_frames, 2.0, 5), _smooth_noise(rng, n_frames, 0.3, 5)])
    return s, angles, wander


# ---- image formation ----------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class _Grid:
    """The beam grid of a probe: lateral coordinate u (mm or rad), range v (mm)."""

    u: np.ndarray
    v: np.ndarray
    du: float
    dv: float


def _grid(probe: IndependentProbe) -> _Grid:
    dv = probe.wavelength_mm / 4.0
    v = np.arange(0.0, probe.depth_mm, dv)
    if probe.kind == "linear":
        du = min(0.1, probe.lateral_mm / 6.0)
        u = np.arange(-probe.width_mm / 2.0, probe.width_mm / 2.0, du)
    else:
        du = min(0.1, probe.lateral_mm / 6.0) / probe.radius_mm
        half = math.radians(probe.sector_deg) / 2.0
        u = np.arange(-half, half, du)
    return _Grid(u, v, du, dv)


def _psf_kernel(probe: IndependentProbe, g: _Grid) -> np.ndarray:
    """In-plane PSF on the beam grid: Gaussian envelope axially x Gaussian-apodised sinc laterally."""
    sigma_ax = probe.cycles * probe.wavelength_mm / 2.0 / 2.3548
    va = np.arange(-4 * sigma_ax, 4 * sigma_ax + g.dv, g.dv)
    axial = np.exp(-0.5 * (va / sigma_ax) ** 2)
    lat_width = probe.lateral_mm if probe.kind == "linear" else probe.lateral_mm / probe.radius_mm
    ua = np.arange(-2.5 * lat_width, 2.5 * lat_width + g.du, g.du)
    lateral = np.sinc(ua / lat_width) * np.exp(-0.5 * (ua / (1.2 * lat_width)) ** 2)
    return np.outer(axial, lateral)


def _probe_to_beam(probe: IndependentProbe, q: np.ndarray):
    """Probe-frame points (m, 3) -> (u, v, depth) on the beam grid."""
    if probe.kind == "linear":
        return q[:, 0], q[:, 1], q[:, 1]
    r = np.hypot(q[:, 0], q[:, 1] + probe.radius_mm)
    return np.arctan2(q[:, 0], q[:, 1] + probe.radius_mm), r - probe.radius_mm, r - probe.radius_mm


def image_to_probe(probe: IndependentProbe) -> tuple[np.ndarray, tuple[int, int]]:
    """ImageToProbe (4, 4) (PLUS-style, det > 0) and the image shape (rows, cols)."""
    px = probe.pixel_mm
    if probe.kind == "linear":
        width = probe.width_mm
        depth = probe.depth_mm
        top = 0.0
    else:
        half = math.radians(probe.sector_deg) / 2.0
        outer = probe.radius_mm + probe.depth_mm
        width = 2.0 * outer * math.sin(half)
        top = probe.radius_mm * math.cos(half) - probe.radius_mm  # the sector's corners rise above the face centre
        depth = probe.depth_mm - top
    cols, rows = int(round(width / px)), int(round(depth / px))
    m = np.eye(4)
    m[0, 0] = m[1, 1] = px
    m[0, 3] = -(cols - 1) / 2.0 * px
    m[1, 3] = top
    return m, (rows, cols)


def _scan_conversion(probe: IndependentProbe, g: _Grid):
    """cv2.remap maps from the beam grid to the image pixels, and the inside-sector mask."""
    itp, (rows, cols) = image_to_probe(probe)
    c, r = np.meshgrid(np.arange(cols), np.arange(rows))
    x = itp[0, 0] * c + itp[0, 3]
    y = itp[1, 1] * r + itp[1, 3]
    u, v, _ = _probe_to_beam(probe, np.column_stack([x.ravel(), y.ravel(), np.zeros(x.size)]))
    u, v = u.reshape(x.shape), v.reshape(x.shape)
    inside = (u >= g.u[0]) & (u <= g.u[-1]) & (v >= 0) & (v <= g.v[-1])
    map_x = ((u - g.u[0]) / g.du).astype(np.float32)
    map_y = ((v - g.v[0]) / g.dv).astype(np.float32)
    return map_x, map_y, inside


def render_frame(probe: IndependentProbe, probe_to_world: np.ndarray, pts: np.ndarray, amps: np.ndarray,
                 *, noise: float = 0.0, rng=None, envelope: bool = False, _cache=None):
    """One frame: B-mode uint8 (rows, cols), or the envelope on the beam grid (float64) with
    ``envelope=True``.

    Parameters
    ----------
    probe : IndependentProbe
    probe_to_world : (4, 4) pose of the Probe frame (x lateral, y depth, z elevation), mm
    pts, amps : scatterers (m, 3) world mm and their amplitudes (m,)
    noise : electronic noise amplitude (relative to the median speckle amplitude of a
        unit-amplitude medium)
    """
    g = _cache["grid"] if _cache else _grid(probe)
    world_to_probe = np.linalg.inv(probe_to_world)
    reach = float(max(probe.elevation_half_width(0.0), probe.elevation_half_width(probe.depth_mm)))
    if _cache is not None and "order" in _cache:  # points sorted by world y: only a slab near the plane
        ys = _cache["sorted_y"]
        extent = probe.depth_mm + (probe.width_mm if probe.kind == "linear" else 2 * (probe.radius_mm + probe.depth_mm))
        corners = probe_to_world[1, :3] @ np.array([[sx * extent, sy * extent, sz * reach] for sx in (-1, 1)
                                                    for sy in (-1, 1) for sz in (-1, 1)]).T + probe_to_world[1, 3]
        i0, i1 = np.searchsorted(ys, [corners.min(), corners.max()])
        sel = _cache["order"][i0:i1]
        pts, amps = pts[sel], amps[sel]
    q = pts @ world_to_probe[:3, :3].T + world_to_probe[:3, 3]
    near = np.abs(q[:, 2]) < reach  # the Hann window is zero beyond its half-width
    q, a = q[near], amps[near]
    u, v, depth = _probe_to_beam(probe, q)
    half = probe.elevation_half_width(depth)
    w = np.where(np.abs(q[:, 2]) < half, np.cos(np.pi * q[:, 2] / (2.0 * half)) ** 2, 0.0)  # Hann, elevation
    alpha = probe.attenuation_db_cm_mhz * probe.frequency_mhz * 2.0 * np.clip(depth, 0, None) / 10.0  # dB two-way
    w = w * 10.0 ** (-(1.0 - probe.tgc_fraction) * alpha / 20.0)
    k = 2.0 * np.pi / probe.wavelength_mm
    contrib = a * w * np.exp(2j * k * v)  # the phase of the exact range (Gabor pulse)
    fu = (u - g.u[0]) / g.du
    fv = (v - g.v[0]) / g.dv
    ok = (fu >= 0) & (fu < len(g.u) - 1) & (fv >= 0) & (fv < len(g.v) - 1) & (w > 0)
    fu, fv, contrib = fu[ok], fv[ok], contrib[ok]
    iu, iv = np.floor(fu).astype(int), np.floor(fv).astype(int)
    du_, dv_ = fu - iu, fv - iv
    size = len(g.v) * len(g.u)
    field_ = np.zeros(size, dtype=np.complex128)
    for ov, ou, wt in ((0, 0, (1 - dv_) * (1 - du_)), (0, 1, (1 - dv_) * du_), (1, 0, dv_ * (1 - du_)), (1, 1, dv_ * du_)):
        flat = (iv + ov) * len(g.u) + iu + ou
        field_ += np.bincount(flat, weights=(contrib * wt).real, minlength=size)
        field_ += 1j * np.bincount(flat, weights=(contrib * wt).imag, minlength=size)
    field_ = field_.reshape(len(g.v), len(g.u))
    kernel = _cache["kernel"] if _cache else _psf_kernel(probe, g)
    from scipy.signal import fftconvolve

    iq = fftconvolve(field_, kernel, mode="same")
    if noise > 0:
        rng = rng or np.random.default_rng(0)
        iq = iq + noise * (rng.normal(size=iq.shape) + 1j * rng.normal(size=iq.shape))
    env = np.abs(iq)
    if envelope:
        return env
    if _cache is None or "map" not in _cache:
        mp = _scan_conversion(probe, g)
        if _cache is not None:
            _cache["map"] = mp
    else:
        mp = _cache["map"]
    map_x, map_y, inside = mp
    img = cv2.remap(env.astype(np.float32), map_x, map_y, interpolation=cv2.INTER_LINEAR, borderValue=0.0)
    ref = _cache.get("ref") if _cache else None
    if ref is None:  # a fixed gain for the sweep: the first frame's median amplitude shows at 55 % of the range
        ref = float(np.median(img[inside])) if inside.any() else 1.0
        if _cache is not None:
            _cache["ref"] = ref
    db = 20.0 * np.log10(np.maximum(img, 1e-12) / ref)
    out = np.clip(0.55 + db / probe.dynamic_range_db, 0.0, 1.0) * 255.0
    out[~inside] = 0.0
    return out.astype(np.uint8)


@dataclass(frozen=True, eq=False)
class IndependentSweep:
    """A simulated tracked sweep: the sequence (ImageToReference, ImageToProbe, ProbeToReference,
    pixel spacing), its probe, its seed and direction."""

    sequence: TrackedSequence
    probe: IndependentProbe
    seed: int
    direction: str


def simulate(probe: IndependentProbe, seed: int, *, n_frames: int = 120, length_mm: float = 50.0,
             direction: str = "toward", pauses: bool = True, reversals: bool = True, per_mm3: float = 6.0,
             noise: float = 0.02, tilts: bool = True, elevation_stretch: float = 1.0) -> IndependentSweep:
    """Simulate one tracked freehand sweep (see the module docstring).

    The probe moves along world ``+y`` with its image normal along ``-y`` ("toward") or ``+y``
    ("away", the probe turned round about its depth axis). Timestamps are 20 frames/s.

    ``tilts=False``: the probe only translates (its tilt / rock / twist and tremor angles are
    drawn, so the random stream and the rest of the sweep stay the same, then set to 0).

    ``elevation_stretch`` (k > 0, only with ``tilts=False``): the sweep's *stretched twin*, the
    scale ambiguity of image-only tracking. The tissue and the scatterers are drawn exactly as
    for k = 1, then the world ``y`` (the sweep's, i.e. the probe's elevational, direction) of
    the scatterers and of the probe's path are multiplied by k (about world ``y = 0``), and the
    sweep's probe has ``elevation_half_mm`` times k (its elevational beam k times wider at every
    depth). Every scatterer's distance from the image plane and the beam's half-width there
    both grow by k, so the frames equal those of k = 1 (to rounding), while the true
    elevational path (``ImageToReference``, ``ProbeToReference``: the stretched poses) is k
    times longer. The returned sweep's ``probe`` is the stretched one.
    """
    if direction not in ("toward", "away"):
        raise ValueError(f"direction must be 'toward' or 'away', got {direction!r}")
    stretch = float(elevation_stretch)
    if not (math.isfinite(stretch) and stretch > 0):
        raise ValueError(f"elevation_stretch must be a finite number > 0, got {elevation_stretch!r}")
    if tilts and stretch != 1.0:
        raise ValueError(f"elevation_stretch={elevation_stretch!r} needs tilts=False (the frames of a tilted probe "
                         "change when the elevation is stretched), got tilts=True")
    rng = np.random.default_rng(seed)
    s, angles, wander = freehand_trajectory(rng, n_frames, length_mm, pauses=pauses, reversals=reversals)
    if not tilts:
        angles = np.zeros_like(angles)
    # Probe x lateral = world x, y depth = world z (down), z = x cross y = -world y ("toward" when moving +y)
    base = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]).T
    if direction == "away":
        base = Rotation.from_euler("z", 180, degrees=True).as_matrix() @ base  # turned round: normal along +y
    poses = np.tile(np.eye(4), (n_frames, 1, 1))
    rots = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
    poses[:, :3, :3] = base @ rots
    poses[:, 0, 3] = wander[:, 0]
    poses[:, 1, 3] = s + 10.0
    poses[:, 2, 3] = wander[:, 1]
    tissue = _random_tissue(rng, probe.depth_mm)
    lateral = probe.width_mm if probe.kind == "linear" else 2 * (probe.radius_mm + probe.depth_mm) * math.sin(math.radians(probe.sector_deg) / 2)
    margin = 3.0 * probe.elevation_half_width(probe.depth_mm) + 3.0
    lo = [-lateral / 2 - 4, s.min() + 10 - margin - 4, -1.0]
    hi = [lateral / 2 + 4, s.max() + 10 + margin + 4, probe.depth_mm + 2.0]
    pts, amps = _scatterers(tissue, lo, hi, rng, per_mm3)
    if stretch != 1.0:  # the stretched twin: world y of the scatterers and the probe, and the elevational beam
        pts[:, 1] *= stretch
        poses[:, 1, 3] *= stretch
        probe = replace(probe, elevation_half_mm=probe.elevation_half_mm * stretch)
    order = np.argsort(pts[:, 1])
    cache = {"grid": _grid(probe), "order": order, "sorted_y": pts[order, 1]}
    cache["kernel"] = _psf_kernel(probe, cache["grid"])
    noise_rng = np.random.default_rng(seed + 1)
    frames = np.stack([render_frame(probe, p, pts, amps, noise=noise, rng=noise_rng, _cache=cache) for p in poses])
    itp, _ = image_to_probe(probe)
    itr = poses @ itp
    seq = TrackedSequence(
        frames=frames,
        timestamps_s=np.arange(n_frames) / 20.0,
        transforms={},
        image_ok=np.ones(n_frames, dtype=bool),
        pixel_spacing_mm=(probe.pixel_mm, probe.pixel_mm),
        metadata={"Simulator": f"FreehandUS independent test simulator, probe {probe.name}, seed {seed}"
                  + ("" if tilts else ", no tilts") + ("" if stretch == 1.0 else f", elevation stretched x {stretch:g}")},
    )
    seq.set_transform("ImageToReference", itr)
    seq.set_transform("ImageToProbe", np.broadcast_to(itp, (n_frames, 4, 4)).copy())
    seq.set_transform("ProbeToReference", poses)
    return IndependentSweep(seq, probe, seed, direction)


def benchmark_sweeps(n_per_probe: int, *, n_frames: int = 120, length_mm=(40.0, 80.0), seed_base: int = 5_000_000,
                     probes=PROBES):
    """``n_per_probe`` sweeps of each probe of :data:`PROBES` (directions alternating), as
    (name, IndependentSweep) pairs; seeds ``seed_base + 1000 * probe index + k``."""
    out = []
    for j, probe in enumerate(probes):
        for k in range(n_per_probe):
            seed = seed_base + 1000 * j + k
            length = float(np.random.default_rng(seed).uniform(*length_mm))
            direction = "toward" if k % 2 == 0 else "away"
            out.append((f"{probe.name}-{seed}-{direction}",
                        simulate(probe, seed, n_frames=n_frames, length_mm=length, direction=direction)))
    return out


def with_probe(probe: IndependentProbe, **changes) -> IndependentProbe:
    """A copy of ``probe`` with fields changed (``dataclasses.replace``)."""
    return replace(probe, **changes)
