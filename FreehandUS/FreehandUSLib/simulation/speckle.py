"""Speckle formation: random point scatterers imaged by a Gaussian PSF (numba kernel).

Scatterers fill space at a fixed density (``scatterers_per_cell`` per resolution cell, >= 10
for fully developed speckle). They are never stored: space is cut into cubic blocks of
``block_mm`` and the scatterers of a block are a pure function of (seed, block index), drawn
with a counter-based hash. A frame visits only the blocks near its image plane, so a sweep of
any length costs the same per frame, and two frames that see the same tissue see the same
scatterers: speckle decorrelates with elevational motion and moves with in-plane motion.

For one frame, every scatterer within ``cutoff_sigmas`` elevational sigmas of the plane adds
``echogenicity * exp(-y^2 / (2 sigma_e^2)) * exp(-2i k0 a)`` (``a`` its axial coordinate: depth
for a linear probe, range from the apex for a convex one) to the beam-space grid by bilinear
splatting; a separable Gaussian blur then applies the in-plane PSF. That is the demodulated
(IQ) signal of the RF image ``sum_s w_s h(p - p_s)``. Its magnitude is the envelope.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

try:  # numba is a declared dependency; the fallback keeps imports working without it
    from numba import njit
except ImportError:  # pragma: no cover
    njit = None

from .probe import BeamGrid, ProbeConfig

__all__ = ["ScattererField", "render_iq", "candidate_blocks", "iq_normalisation"]

_GOLDEN = 0x9E3779B97F4A7C15


class ScattererField:
    """Implicit random scatterers: ``density_per_mm3`` in blocks of ``block_mm`` (see module doc).

    Parameters
    ----------
    density_per_mm3 : float
    seed : int
    block_mm : float, edge of the cubic blocks (small blocks waste little outside the slab;
        the density is rounded up to a whole number of scatterers per block)
    """

    def __init__(self, density_per_mm3: float, seed: int, *, block_mm: float = 0.6):
        if not (density_per_mm3 > 0 and math.isfinite(density_per_mm3)):
            raise ValueError(f"density_per_mm3 must be positive, got {density_per_mm3}")
        self.block_mm = float(block_mm)
        self.per_block = max(1, int(math.ceil(density_per_mm3 * self.block_mm**3 - 1e-9)))
        self.density_per_mm3 = self.per_block / self.block_mm**3
        self.seed = int(seed) & 0xFFFFFFFFFFFF

    def positions(self, blocks: np.ndarray) -> np.ndarray:
        """Scatterer positions of ``blocks`` ((n, 3) int64 block indices): (n * per_block, 3) mm.

        The same draws the imaging kernel makes (it never stores them); for tests and inspection.
        """
        out = np.empty((len(blocks) * self.per_block, 3))
        _positions_kernel(np.ascontiguousarray(blocks, dtype=np.int64), self.per_block, self.block_mm, np.uint64(self.seed), out)
        return out


def _aabb_blocks(field, probe_to_reference, lateral_mm, axial_mm, cutoff_mm):
    b = field.block_mm
    r = probe_to_reference[:3, :3]
    t = probe_to_reference[:3, 3]
    corners = np.array(
        [[x, y, z] for x in lateral_mm for y in (-cutoff_mm, cutoff_mm) for z in axial_mm], dtype=np.float64
    )
    world = corners @ r.T + t
    lo = np.floor(world.min(axis=0) / b).astype(np.int64) - 1
    hi = np.floor(world.max(axis=0) / b).astype(np.int64) + 1
    return lo, hi


def candidate_blocks(
    field: ScattererField,
    probe_to_reference: np.ndarray,
    lateral_mm: tuple[float, float],
    axial_mm: tuple[float, float],
    cutoff_mm: float,
) -> np.ndarray:
    """Blocks that may hold scatterers within ``cutoff_mm`` of the image plane, inside the
    rectangle ``lateral_mm`` x ``axial_mm`` (Probe x and z ranges); what the kernel visits.

    Returns
    -------
    (n, 3) int64 block indices (x, y, z)
    """
    lo, hi = _aabb_blocks(field, probe_to_reference, lateral_mm, axial_mm, cutoff_mm)
    grid = np.stack(
        np.meshgrid(*(np.arange(lo[i], hi[i] + 1) for i in range(3)), indexing="ij"), axis=-1
    ).reshape(-1, 3)
    local = ((grid + 0.5) * field.block_mm - probe_to_reference[:3, 3]) @ probe_to_reference[:3, :3]
    half_diag = 0.5 * math.sqrt(3.0) * field.block_mm
    keep = (
        (np.abs(local[:, 1]) <= cutoff_mm + half_diag)
        & (local[:, 0] >= lateral_mm[0] - half_diag)
        & (local[:, 0] <= lateral_mm[1] + half_diag)
        & (local[:, 2] >= axial_mm[0] - half_diag)
        & (local[:, 2] <= axial_mm[1] + half_diag)
    )
    return np.ascontiguousarray(grid[keep])


def iq_normalisation(probe: ProbeConfig, grid: BeamGrid, density_per_mm3: float) -> np.ndarray:
    """Per-row factors making the mean intensity ``E|IQ|^2`` of echogenicity-1 tissue equal to 1.

    The blur kernel sums to 1 over grid cells, so a scatterer density ``rho`` (per mm^3) with a
    Gaussian elevational weight gives ``E|IQ|^2 = rho sigma_e sqrt(pi) A^2 / (4 pi sigma_a
    sigma_l)`` where ``A`` is the area of one grid cell and ``sigma_l`` the lateral PSF in grid
    units times the cell width. For a convex grid (``theta``, radians) the density per
    ``(r, theta)`` cell grows with the range, so the factor falls as ``1 / sqrt(r)``.

    Returns
    -------
    (n_axial,) float32
    """
    sa = grid.sigma_axial_px * grid.d_axial
    sl = grid.sigma_lateral_px * grid.d_lateral
    cell = grid.d_axial * grid.d_lateral
    base = density_per_mm3 * probe.sigma_elevation_mm * math.sqrt(math.pi) * cell * cell / (4.0 * math.pi * sa * sl)
    rows = grid.axial0 + grid.d_axial * np.arange(grid.n_axial)
    if grid.convex:
        mean_intensity = base * np.maximum(rows, 1e-6)
    else:
        mean_intensity = np.full(grid.n_axial, base)
    return (1.0 / np.sqrt(mean_intensity)).astype(np.float32)


def render_iq(
    field: ScattererField,
    probe: ProbeConfig,
    grid: BeamGrid,
    probe_to_reference: np.ndarray,
    volume_values: np.ndarray,
    volume_origin_mm: np.ndarray,
    volume_spacing_mm: float,
    *,
    cutoff_sigmas: float = 3.0,
    wavenumber_factor: float = 2.0,
    blur: bool = True,
) -> np.ndarray:
    """The IQ image of one frame on the beam grid (not normalised: see :func:`iq_normalisation`).

    Parameters
    ----------
    field : the scatterers
    probe, grid : the probe and its beam grid
    probe_to_reference : (4, 4) float64 rigid pose of the probe
    volume_values : (nz, ny, nx) float32 scattering amplitude (echogenicity or absorption)
    volume_origin_mm, volume_spacing_mm : grid geometry of ``volume_values`` (Reference mm)
    cutoff_sigmas : elevational extent of the slab considered, in ``sigma_elevation_mm``
    wavenumber_factor : 2 for pulse-echo (round trip), 1 for photoacoustic (one way)
    blur : apply the in-plane PSF (False returns the splatted scatterers)

    Returns
    -------
    (n_axial, n_lateral, 2) float32, real and imaginary parts
    """
    cutoff = cutoff_sigmas * probe.sigma_elevation_mm
    if grid.convex:
        half = -grid.lateral0
        r_max = grid.axial0 + grid.d_axial * (grid.n_axial - 1)
        lat = (-r_max * math.sin(half) - 1.0, r_max * math.sin(half) + 1.0)
        ax = (grid.axial0 * math.cos(half) + grid.apex_z_mm - 1.0, r_max + grid.apex_z_mm + 1.0)
    else:
        lat = (grid.lateral0 - 1.0, grid.lateral0 + grid.d_lateral * (grid.n_lateral - 1) + 1.0)
        ax = (grid.axial0 - 1.0, grid.axial0 + grid.d_axial * (grid.n_axial - 1) + 1.0)
    lo, hi = _aabb_blocks(field, probe_to_reference, lat, ax, cutoff)
    ref_to_probe = np.linalg.inv(probe_to_reference)
    out = np.zeros((grid.n_axial, grid.n_lateral, 2), dtype=np.float32)
    k0 = wavenumber_factor * 2.0 * math.pi / probe.wavelength_mm
    bounds = np.array([lat[0], lat[1], ax[0], ax[1]], dtype=np.float64)
    _splat_kernel(
        _COS_TABLE,
        _SIN_TABLE,
        lo,
        hi,
        bounds,
        field.per_block,
        field.block_mm,
        np.uint64(field.seed),
        np.ascontiguousarray(ref_to_probe[:3, :3]),
        np.ascontiguousarray(ref_to_probe[:3, 3]),
        float(cutoff),
        float(probe.sigma_elevation_mm),
        float(k0),
        volume_values,
        np.asarray(volume_origin_mm, dtype=np.float64),
        float(volume_spacing_mm),
        bool(grid.convex),
        float(grid.apex_z_mm),
        float(grid.axial0),
        float(grid.d_axial),
        float(grid.lateral0),
        float(grid.d_lateral),
        out,
    )
    if blur:
        # Bilinear splatting already spreads a scatterer with variance 1/6 cell^2 per axis.
        out = cv2.GaussianBlur(
            out,
            (0, 0),
            sigmaX=_blur_sigma(grid.sigma_lateral_px),
            sigmaY=_blur_sigma(grid.sigma_axial_px),
            borderType=cv2.BORDER_CONSTANT,
        )
    return out


def _blur_sigma(sigma_px: float) -> float:
    return math.sqrt(max(sigma_px * sigma_px - 1.0 / 6.0, 0.25))


# -- numba kernels ------------------------------------------------------------------------------


def _jit(fn):
    return njit(cache=True, nogil=True, fastmath=True)(fn) if njit is not None else fn


@_jit
def _mix(z):
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@_jit
def _block_key(seed, bx, by, bz):
    off = np.int64(1) << np.int64(40)
    k = _mix(seed ^ np.uint64(bx + off))
    k = _mix(k ^ np.uint64(by + off))
    return _mix(k ^ np.uint64(bz + off))


@_jit
def _unit(z):
    return np.float64(z >> np.uint64(11)) * (1.0 / 9007199254740992.0)


@_jit
def _positions_kernel(blocks, per_block, block_mm, seed, out):
    g = np.uint64(_GOLDEN)
    n = 0
    for b in range(blocks.shape[0]):
        bx = blocks[b, 0]
        by = blocks[b, 1]
        bz = blocks[b, 2]
        key = _block_key(seed, bx, by, bz)
        for k in range(per_block):
            s = key + np.uint64(3 * k) * g
            out[n, 0] = (bx + _unit(_mix(s))) * block_mm
            out[n, 1] = (by + _unit(_mix(s + g))) * block_mm
            out[n, 2] = (bz + _unit(_mix(s + g + g))) * block_mm
            n += 1


@_jit
def _atan2(y, x):
    """atan2 for the sector (|y| <= x): Abramowitz & Stegun 4.4.49 polynomial, error < 1e-7 rad."""
    if x > 0.0 and -x <= y <= x:
        t = y / x
        t2 = t * t
        return t * (
            0.9999993329
            + t2 * (-0.3332985605 + t2 * (0.1994653599 + t2 * (-0.1390853351 + t2 * (0.0964200441 + t2 * (-0.0559098861 + t2 * (0.0218612288 - t2 * 0.0040540580))))))
        )
    return math.atan2(y, x)


@_jit
def _trilinear(vol, ox, oy, oz, sp, x, y, z):
    nz, ny, nx = vol.shape
    fx = (x - ox) / sp
    fy = (y - oy) / sp
    fz = (z - oz) / sp
    fx = min(max(fx, 0.0), nx - 1.000001)
    fy = min(max(fy, 0.0), ny - 1.000001)
    fz = min(max(fz, 0.0), nz - 1.000001)
    ix = int(fx)
    iy = int(fy)
    iz = int(fz)
    ax = fx - ix
    ay = fy - iy
    az = fz - iz
    c00 = vol[iz, iy, ix] * (1 - ax) + vol[iz, iy, ix + 1] * ax
    c01 = vol[iz, iy + 1, ix] * (1 - ax) + vol[iz, iy + 1, ix + 1] * ax
    c10 = vol[iz + 1, iy, ix] * (1 - ax) + vol[iz + 1, iy, ix + 1] * ax
    c11 = vol[iz + 1, iy + 1, ix] * (1 - ax) + vol[iz + 1, iy + 1, ix + 1] * ax
    c0 = c00 * (1 - ay) + c01 * ay
    c1 = c10 * (1 - ay) + c11 * ay
    return c0 * (1 - az) + c1 * az


_TABLE_SIZE = 4096
_COS_TABLE = np.cos(np.arange(_TABLE_SIZE + 1) * (2 * math.pi / _TABLE_SIZE))
_SIN_TABLE = np.sin(np.arange(_TABLE_SIZE + 1) * (2 * math.pi / _TABLE_SIZE))
_EXP_SIZE = 1024


@_jit
def _splat_kernel(
    cos_table,
    sin_table,
    lo,
    hi,
    bounds,
    per_block,
    block_mm,
    seed,
    rot,
    trans,
    cutoff,
    sigma_e,
    k0,
    vol,
    vol_origin,
    vol_spacing,
    convex,
    apex_z,
    axial0,
    d_axial,
    lateral0,
    d_lateral,
    out,
):
    g = np.uint64(_GOLDEN)
    n_ax = out.shape[0]
    n_lat = out.shape[1]
    # Tables (linear interpolation): elevational weight over [0, cutoff], cos/sin over a turn.
    n_exp = _EXP_SIZE
    exp_table = np.empty(n_exp + 2)
    for e in range(n_exp + 2):
        y = e * cutoff / n_exp
        exp_table[e] = math.exp(-y * y / (2.0 * sigma_e * sigma_e))
    exp_scale = n_exp / cutoff
    n_tab = cos_table.shape[0] - 1
    turn_scale = n_tab / (2.0 * math.pi)
    ox = vol_origin[0]
    oy = vol_origin[1]
    oz = vol_origin[2]
    half_diag = 0.5 * math.sqrt(3.0) * block_mm
    y_lim = cutoff + half_diag
    r_min = axial0
    r_max = axial0 + d_axial * (n_ax - 1)
    half_angle = -lateral0
    # x innermost: neighbouring blocks are neighbours in memory (volume [z, y, x]) and on the grid
    for bz in range(lo[2], hi[2] + 1):
        for by in range(lo[1], hi[1] + 1):
            for bx in range(lo[0], hi[0] + 1):
                # Block centre in Probe coordinates: skip blocks far from the slab or the image.
                cx = (bx + 0.5) * block_mm
                cy = (by + 0.5) * block_mm
                cz = (bz + 0.5) * block_mm
                ly = rot[1, 0] * cx + rot[1, 1] * cy + rot[1, 2] * cz + trans[1]
                if ly > y_lim or ly < -y_lim:
                    continue
                lx = rot[0, 0] * cx + rot[0, 1] * cy + rot[0, 2] * cz + trans[0]
                if lx < bounds[0] - half_diag or lx > bounds[1] + half_diag:
                    continue
                lz = rot[2, 0] * cx + rot[2, 1] * cy + rot[2, 2] * cz + trans[2]
                if lz < bounds[2] - half_diag or lz > bounds[3] + half_diag:
                    continue
                if convex:  # skip blocks outside the sector (range and angle)
                    rr = math.sqrt(lx * lx + (lz - apex_z) * (lz - apex_z))
                    if rr < r_min - half_diag or rr > r_max + half_diag:
                        continue
                    if abs(math.atan2(lx, lz - apex_z)) > half_angle + half_diag / max(rr, 1e-6):
                        continue
                key = _block_key(seed, bx, by, bz)
                for k in range(per_block):
                    s = key + np.uint64(3 * k) * g
                    px = (bx + _unit(_mix(s))) * block_mm
                    py = (by + _unit(_mix(s + g))) * block_mm
                    pz = (bz + _unit(_mix(s + g + g))) * block_mm
                    # Probe coordinates
                    qy = rot[1, 0] * px + rot[1, 1] * py + rot[1, 2] * pz + trans[1]
                    if qy > cutoff or qy < -cutoff:
                        continue
                    qx = rot[0, 0] * px + rot[0, 1] * py + rot[0, 2] * pz + trans[0]
                    qz = rot[2, 0] * px + rot[2, 1] * py + rot[2, 2] * pz + trans[2]
                    if convex:
                        dz = qz - apex_z
                        a = math.sqrt(qx * qx + dz * dz)
                        lat = _atan2(qx, dz)
                    else:
                        a = qz
                        lat = qx
                    fa = (a - axial0) / d_axial
                    fl = (lat - lateral0) / d_lateral
                    if fa < 0.0 or fl < 0.0 or fa >= n_ax - 1 or fl >= n_lat - 1:
                        continue
                    amp = _trilinear(vol, ox, oy, oz, vol_spacing, px, py, pz)
                    if amp == 0.0:
                        continue
                    fe = abs(qy) * exp_scale
                    ie = int(fe)
                    te = fe - ie
                    w = amp * (exp_table[ie] * (1.0 - te) + exp_table[ie + 1] * te)
                    # phase = -k0 a, wrapped to [0, 2 pi) in table units
                    fp = -k0 * a * turn_scale
                    fp -= math.floor(fp / n_tab) * n_tab
                    ip = int(fp)
                    if ip >= n_tab:
                        ip = n_tab - 1
                    tp = fp - ip
                    re = w * (cos_table[ip] * (1.0 - tp) + cos_table[ip + 1] * tp)
                    im = w * (sin_table[ip] * (1.0 - tp) + sin_table[ip + 1] * tp)
                    ia = int(fa)
                    il = int(fl)
                    ta = fa - ia
                    tl = fl - il
                    w00 = (1.0 - ta) * (1.0 - tl)
                    w01 = (1.0 - ta) * tl
                    w10 = ta * (1.0 - tl)
                    w11 = ta * tl
                    out[ia, il, 0] += re * w00
                    out[ia, il, 1] += im * w00
                    out[ia, il + 1, 0] += re * w01
                    out[ia, il + 1, 1] += im * w01
                    out[ia + 1, il, 0] += re * w10
                    out[ia + 1, il, 1] += im * w10
                    out[ia + 1, il + 1, 0] += re * w11
                    out[ia + 1, il + 1, 1] += im * w11
