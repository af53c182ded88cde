"""A 3D tissue model for the speckle simulator: layers, vessels and inclusions.

The tissue lives in the **Reference** frame (mm): ``x`` and ``y`` along the skin, ``z`` depth
(skin at ``z = 0``, tissue below). Each structure sets the *echogenicity* (standard deviation of
the scattering amplitude, 1 = ordinary soft tissue) of the points it covers; the photoacoustic
absorption is non-zero only inside vessel lumens.

:func:`build_tissue_volume` samples both onto a regular grid covering a bounding box (the volume
swept by a trajectory); the simulator looks scatterer echogenicity up there by trilinear
interpolation.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = [
    "Layer",
    "Vessel",
    "Inclusion",
    "TissueConfig",
    "TissueVolume",
    "random_tissue_config",
    "homogeneous_tissue",
    "build_tissue_volume",
]


@dataclass(frozen=True)
class Layer:
    """A tissue layer below a wavy boundary ``z = depth + amplitude * sin(2 pi u / wavelength + phase)``
    with ``u = x cos(angle) + y sin(angle)``; a thin bright interface (fascia) sits on the boundary."""

    depth_mm: float
    echogenicity: float
    amplitude_mm: float = 0.0
    wavelength_mm: float = 50.0
    angle_deg: float = 0.0
    phase: float = 0.0
    interface_mm: float = 0.5
    interface_echogenicity: float = 2.0


@dataclass(frozen=True)
class Vessel:
    """A tube along ``start + s * direction`` with a sinusoidal wobble of ``wobble_mm`` in depth.

    The lumen is nearly anechoic (``lumen_echogenicity``) and holds the photoacoustic absorber;
    the wall (``wall_mm`` thick) is bright."""

    start_mm: tuple[float, float, float]
    direction: tuple[float, float, float]
    radius_mm: float
    wall_mm: float = 0.6
    wall_echogenicity: float = 2.0
    lumen_echogenicity: float = 0.04
    wobble_mm: float = 0.0
    wobble_period_mm: float = 80.0
    absorption: float = 1.0


@dataclass(frozen=True)
class Inclusion:
    """An axis-aligned ellipsoid of different echogenicity (a cyst, a nodule, a fat lobule)."""

    center_mm: tuple[float, float, float]
    radii_mm: tuple[float, float, float]
    echogenicity: float


@dataclass(frozen=True)
class TissueConfig:
    """The whole tissue: a background level, layers (top to bottom), vessels, inclusions, and a
    smooth multiplicative texture of relative amplitude ``texture`` and scale ``texture_scale_mm``."""

    background: float = 1.0
    layers: tuple[Layer, ...] = ()
    vessels: tuple[Vessel, ...] = ()
    inclusions: tuple[Inclusion, ...] = ()
    texture: float = 0.0
    texture_scale_mm: float = 8.0
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> TissueConfig:
        return TissueConfig(
            background=d.get("background", 1.0),
            layers=tuple(Layer(**x) for x in d.get("layers", ())),
            vessels=tuple(
                Vessel(**{**x, "start_mm": tuple(x["start_mm"]), "direction": tuple(x["direction"])})
                for x in d.get("vessels", ())
            ),
            inclusions=tuple(
                Inclusion(**{**x, "center_mm": tuple(x["center_mm"]), "radii_mm": tuple(x["radii_mm"])})
                for x in d.get("inclusions", ())
            ),
            texture=d.get("texture", 0.0),
            texture_scale_mm=d.get("texture_scale_mm", 8.0),
            seed=d.get("seed", 0),
        )


@dataclass(frozen=True, eq=False)
class TissueVolume:
    """Echogenicity and photoacoustic absorption sampled on a regular grid (Reference mm).

    Attributes
    ----------
    echogenicity : (nz, ny, nx) float32, value at ``origin_mm + (ix, iy, iz) * spacing_mm``
    absorption : (nz, ny, nx) float32 or None
    origin_mm : (3,) float64, (x, y, z) of voxel (0, 0, 0)
    spacing_mm : float, isotropic voxel size
    """

    echogenicity: np.ndarray
    absorption: np.ndarray | None
    origin_mm: np.ndarray
    spacing_mm: float = field(default=0.5)


def homogeneous_tissue(echogenicity: float = 1.0) -> TissueConfig:
    """Uniform tissue (used by the speckle statistics and decorrelation tests)."""
    return TissueConfig(background=float(echogenicity))


def random_tissue_config(rng: np.random.Generator, bounds_mm, *, max_depth_mm: float = 60.0) -> TissueConfig:
    """A random tissue filling ``bounds_mm`` = ((x0, x1), (y0, y1), (z0, z1)).

    2-4 layers of echogenicity 0.3-1.3 with bright interfaces, 1-4 vessels (radius 1.5-5 mm,
    8-40 mm deep, crossing the sweep at random angles), 3-10 inclusions (0.15-2.5x) and a smooth
    texture of 10-30 %.
    """
    (x0, x1), (y0, y1), (z0, z1) = bounds_mm
    depth = min(max_depth_mm, z1)
    n_layers = int(rng.integers(2, 5))
    depths = np.sort(rng.uniform(3.0, 0.8 * depth, size=n_layers))
    layers = tuple(
        Layer(
            depth_mm=float(d),
            echogenicity=float(rng.uniform(0.3, 1.3)),
            amplitude_mm=float(rng.uniform(0.0, 4.0)),
            wavelength_mm=float(rng.uniform(30.0, 150.0)),
            angle_deg=float(rng.uniform(0, 360)),
            phase=float(rng.uniform(0, 2 * math.pi)),
            interface_mm=float(rng.uniform(0.3, 1.0)),
            interface_echogenicity=float(rng.uniform(1.2, 3.0)),
        )
        for d in depths
    )
    vessels = []
    for _ in range(int(rng.integers(1, 5))):
        angle = rng.uniform(0, 2 * math.pi)
        direction = (math.cos(angle), math.sin(angle), float(rng.uniform(-0.1, 0.1)))
        start = (float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)), float(rng.uniform(8.0, min(40.0, 0.8 * depth + 4))))
        vessels.append(
            Vessel(
                start_mm=start,
                direction=direction,
                radius_mm=float(rng.uniform(1.5, 5.0)),
                wall_mm=float(rng.uniform(0.3, 1.0)),
                wall_echogenicity=float(rng.uniform(1.2, 2.5)),
                lumen_echogenicity=float(rng.uniform(0.02, 0.1)),
                wobble_mm=float(rng.uniform(0.0, 4.0)),
                wobble_period_mm=float(rng.uniform(40.0, 150.0)),
                absorption=float(rng.uniform(0.5, 1.0)),
            )
        )
    inclusions = tuple(
        Inclusion(
            center_mm=(float(rng.uniform(x0, x1)), float(rng.uniform(y0, y1)), float(rng.uniform(3.0, depth))),
            radii_mm=tuple(float(v) for v in rng.uniform(1.5, 8.0, size=3)),
            echogenicity=float(rng.choice([rng.uniform(0.1, 0.5), rng.uniform(1.5, 2.5)])),
        )
        for _ in range(int(rng.integers(3, 11)))
    )
    return TissueConfig(
        background=float(rng.uniform(0.6, 1.2)),
        layers=layers,
        vessels=tuple(vessels),
        inclusions=inclusions,
        texture=float(rng.uniform(0.1, 0.3)),
        texture_scale_mm=float(rng.uniform(4.0, 15.0)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def _texture_waves(cfg: TissueConfig, n: int = 8):
    """Wave vectors (n, 3) and phases (n,) of the smooth multiplicative texture."""
    rng = np.random.default_rng(cfg.seed)
    ks, phases = [], []
    for _ in range(n):
        k = rng.normal(size=3)
        k *= 2 * math.pi / (cfg.texture_scale_mm * np.linalg.norm(k) * rng.uniform(0.7, 1.5))
        ks.append(k)
        phases.append(rng.uniform(0, 2 * math.pi))
    return np.array(ks), np.array(phases)


def build_tissue_volume(
    cfg: TissueConfig,
    bounds_mm,
    *,
    spacing_mm: float = 0.5,
    max_voxels: int = 12_000_000,
    absorption: bool = False,
) -> TissueVolume:
    """Sample ``cfg`` on a grid covering ``bounds_mm`` = ((x0, x1), (y0, y1), (z0, z1)).

    The spacing grows above ``spacing_mm`` when the box would need more than ``max_voxels``.
    Structures are applied in order: layers (with their interface bands), inclusions
    (multiplicative), texture (multiplicative, a sum of 8 random plane waves), vessels (wall, then
    lumen, which also holds the absorber). One pass per voxel (numba).
    """
    lo = np.array([b[0] for b in bounds_mm], dtype=np.float64)
    hi = np.array([b[1] for b in bounds_mm], dtype=np.float64)
    if not np.all(hi > lo):
        raise ValueError(f"bounds_mm must have lower < upper on every axis, got {bounds_mm}")
    extent = hi - lo
    spacing = float(spacing_mm)
    n_vox = np.prod(np.ceil(extent / spacing) + 2)
    if n_vox > max_voxels:
        spacing *= (n_vox / max_voxels) ** (1.0 / 3.0)
    shape = (np.ceil(extent / spacing).astype(int) + 2)[::-1]  # (nz, ny, nx)
    origin = lo - 0.5 * spacing
    nz, ny, nx = (int(v) for v in shape)
    x = origin[0] + spacing * np.arange(nx)
    y = origin[1] + spacing * np.arange(ny)
    z = origin[2] + spacing * np.arange(nz)

    nl = len(cfg.layers)
    boundaries = np.zeros((max(nl, 1), ny, nx), dtype=np.float64)
    layer_par = np.zeros((max(nl, 1), 3))
    for i, layer in enumerate(cfg.layers):
        a = math.radians(layer.angle_deg)
        u = x[None, :] * math.cos(a) + y[:, None] * math.sin(a)
        boundaries[i] = layer.depth_mm + layer.amplitude_mm * np.sin(2 * math.pi * u / layer.wavelength_mm + layer.phase)
        layer_par[i] = (layer.echogenicity, 0.5 * layer.interface_mm, layer.interface_echogenicity)
    inc = np.zeros((max(len(cfg.inclusions), 1), 7))
    for i, c in enumerate(cfg.inclusions):
        inc[i] = (*c.center_mm, *c.radii_mm, c.echogenicity)
    ves = np.zeros((max(len(cfg.vessels), 1), 16))
    for i, v in enumerate(cfg.vessels):
        d = np.asarray(v.direction, dtype=np.float64)
        d /= np.linalg.norm(d)
        up = np.array([0.0, 0.0, 1.0]) - d[2] * d
        up /= max(np.linalg.norm(up), 1e-9)
        ves[i] = (*v.start_mm, *d, *up, v.radius_mm, v.wall_mm, v.wall_echogenicity, v.lumen_echogenicity,
                  v.wobble_mm, v.wobble_period_mm, v.absorption)
    n_waves = 8 if cfg.texture > 0 else 0
    ks, phases = _texture_waves(cfg, 8) if n_waves else (np.zeros((1, 3)), np.zeros(1))
    ex = np.exp(1j * (ks[:, 0:1] * x[None, :] + phases[:, None])).astype(np.complex128)
    ey = np.exp(1j * ks[:, 1:2] * y[None, :]).astype(np.complex128)
    ez = np.exp(1j * ks[:, 2:3] * z[None, :]).astype(np.complex128)
    echo = np.empty((nz, ny, nx), dtype=np.float32)
    absorb = np.zeros((nz, ny, nx), dtype=np.float32)
    _volume_kernel(
        x, y, z, float(cfg.background), boundaries, layer_par, nl, inc, len(cfg.inclusions), ves, len(cfg.vessels),
        ex, ey, ez, n_waves, float(cfg.texture) * math.sqrt(2.0 / 8.0), echo, absorb,
    )
    return TissueVolume(
        echogenicity=echo,
        absorption=absorb if absorption else None,
        origin_mm=origin,
        spacing_mm=spacing,
    )


def _volume_kernel_py(x, y, z, background, boundaries, layer_par, nl, inc, ni, ves, nv, ex, ey, ez, nw, tex_amp, echo, absorb):
    nz, ny, nx = echo.shape
    for k in range(nz):
        zz = z[k]
        for j in range(ny):
            yy = y[j]
            for i in range(nx):
                xx = x[i]
                e = background
                for m in range(nl):
                    b = boundaries[m, j, i]
                    if zz >= b:
                        e = layer_par[m, 0]
                    if abs(zz - b) <= layer_par[m, 1]:
                        e = layer_par[m, 2]
                for m in range(ni):
                    dx = (xx - inc[m, 0]) / inc[m, 3]
                    dy = (yy - inc[m, 1]) / inc[m, 4]
                    dz = (zz - inc[m, 2]) / inc[m, 5]
                    if dx * dx + dy * dy + dz * dz <= 1.0:
                        e *= inc[m, 6]
                if nw > 0:
                    acc = 0.0
                    for m in range(nw):
                        acc += (ex[m, i] * ey[m, j] * ez[m, k]).real
                    e *= max(1.0 + tex_amp * acc, 0.05)
                a = 0.0
                for m in range(nv):
                    px = xx - ves[m, 0]
                    py = yy - ves[m, 1]
                    pz = zz - ves[m, 2]
                    s = px * ves[m, 3] + py * ves[m, 4] + pz * ves[m, 5]
                    qx = px - s * ves[m, 3]
                    qy = py - s * ves[m, 4]
                    qz = pz - s * ves[m, 5]
                    outer = ves[m, 9] + ves[m, 10] + abs(ves[m, 13])
                    if qx * qx + qy * qy + qz * qz > outer * outer:
                        continue
                    wob = ves[m, 13] * math.sin(2.0 * math.pi * s / ves[m, 14])
                    qx -= wob * ves[m, 6]
                    qy -= wob * ves[m, 7]
                    qz -= wob * ves[m, 8]
                    dist = math.sqrt(qx * qx + qy * qy + qz * qz)
                    if dist <= ves[m, 9]:
                        e = ves[m, 12]
                        a = ves[m, 15]
                    elif dist <= ves[m, 9] + ves[m, 10]:
                        e = ves[m, 11]
                echo[k, j, i] = e
                absorb[k, j, i] = a


try:
    from numba import njit as _njit

    _volume_kernel = _njit(cache=True, nogil=True)(_volume_kernel_py)
except ImportError:  # pragma: no cover
    _volume_kernel = _volume_kernel_py
