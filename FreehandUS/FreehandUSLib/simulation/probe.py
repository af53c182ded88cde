"""Simulated 2D ultrasound probes: geometry (linear, convex), point-spread function, display.

Frames used here (mm unless named ``_px``):

- **Probe**: origin at the centre of the transducer face; ``x`` lateral (along the array, image
  columns), ``y`` elevational (out of the image plane), ``z`` axial (depth, into the tissue).
  The image plane is ``y = 0``.
- **Image**: pixels ``(i, j)`` = (column, row), MF orientation, origin at the first pixel.
  ``ImageToProbe`` maps ``(i, j, 0, 1)`` to Probe mm: ``x = x0 + i * sx``, ``z = z0 + j * sy`` and
  the image normal ``k`` to ``-y`` (so Image and Probe are both right-handed).
- **Beam space**: where speckle is formed. Linear probe: Cartesian ``(z, x)``. Convex probe:
  polar ``(r, theta)`` about the virtual apex at Probe ``(0, 0, -radius_mm)``, ``r`` from the
  apex, ``theta`` from the probe axis towards ``+x``.

The PSF is Gaussian in every direction (standard deviations of the *amplitude* profile):
``sigma_axial_mm`` (from the pulse length), ``sigma_lateral_mm`` (from the lateral F-number;
for a convex probe it is constant in angle, so it widens with depth) and ``sigma_elevation_mm``.
With a Gaussian elevational amplitude profile of standard deviation ``s`` the intensity
correlation of fully developed speckle between two planes ``d`` apart is
``exp(-d**2 / (2 s**2))``: ``sigma_elevation_mm`` *is* the sigma of the decorrelation curve.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

__all__ = [
    "SPEED_OF_SOUND_MM_PER_US",
    "FWHM_PER_SIGMA",
    "ProbeConfig",
    "BeamGrid",
    "random_probe_config",
    "image_to_probe_matrix",
    "beam_grid",
    "scan_conversion_maps",
]

#: Speed of sound in soft tissue, mm per microsecond (1540 m/s).
SPEED_OF_SOUND_MM_PER_US = 1.54
#: Full width at half maximum of a Gaussian, in standard deviations.
FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))


@dataclass(frozen=True)
class ProbeConfig:
    """A simulated probe and its scanner settings.

    Attributes
    ----------
    geometry : "linear" or "convex"
    n_rows, n_cols : output image size in pixels (rows = depth)
    depth_mm : imaging depth below the transducer face
    width_mm : linear probe: field of view width (array length)
    radius_mm, sector_deg : convex probe: radius of curvature and field-of-view angle
    center_frequency_mhz : transmit centre frequency (sets the speckle phase, 2 k0 z)
    sigma_axial_mm, sigma_lateral_mm, sigma_elevation_mm : Gaussian amplitude PSF standard
        deviations (lateral: at the face for a convex probe, where it is converted to an angle)
    gain_db : overall gain added before display (0 = a medium of echogenicity 1 sits
        ``headroom_db`` below white)
    dynamic_range_db : displayed range of the log-compressed envelope
    headroom_db : white level above the mean intensity of echogenicity-1 tissue
    tgc_db_per_mm : residual depth gain slope (imperfect time-gain compensation)
    noise_db : electronic noise power relative to echogenicity-1 tissue (e.g. -40)
    """

    geometry: str = "linear"
    n_rows: int = 256
    n_cols: int = 256
    depth_mm: float = 40.0
    width_mm: float = 38.0
    radius_mm: float = 40.0
    sector_deg: float = 60.0
    center_frequency_mhz: float = 7.5
    sigma_axial_mm: float = 0.12
    sigma_lateral_mm: float = 0.25
    sigma_elevation_mm: float = 0.7
    gain_db: float = 0.0
    dynamic_range_db: float = 60.0
    headroom_db: float = 12.0
    tgc_db_per_mm: float = 0.0
    noise_db: float = -45.0

    def __post_init__(self):
        if self.geometry not in ("linear", "convex"):
            raise ValueError(f"ProbeConfig.geometry must be 'linear' or 'convex', got {self.geometry!r}")
        for name in ("n_rows", "n_cols"):
            if int(getattr(self, name)) < 8:
                raise ValueError(f"ProbeConfig.{name} must be >= 8 pixels, got {getattr(self, name)}")
        for name in (
            "depth_mm",
            "width_mm",
            "radius_mm",
            "center_frequency_mhz",
            "sigma_axial_mm",
            "sigma_lateral_mm",
            "sigma_elevation_mm",
            "dynamic_range_db",
        ):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"ProbeConfig.{name} must be a positive number, got {value}")
        if not 5.0 <= float(self.sector_deg) <= 150.0:
            raise ValueError(f"ProbeConfig.sector_deg must be in [5, 150] degrees, got {self.sector_deg}")

    @property
    def wavelength_mm(self) -> float:
        return SPEED_OF_SOUND_MM_PER_US / float(self.center_frequency_mhz)

    @property
    def resolution_cell_mm3(self) -> float:
        """Volume of the resolution cell: product of the three amplitude-PSF FWHMs (mm^3)."""
        return FWHM_PER_SIGMA**3 * self.sigma_axial_mm * self.sigma_lateral_mm * self.sigma_elevation_mm

    @property
    def pixel_spacing_mm(self) -> tuple[float, float]:
        """Output pixel spacing ``(sx, sy)`` (columns, rows), mm; isotropic for a convex probe."""
        if self.geometry == "linear":
            return (self.width_mm / self.n_cols, self.depth_mm / self.n_rows)
        x_extent, z_top, z_bottom = _convex_extent(self)
        s = max(2.0 * x_extent / self.n_cols, (z_bottom - z_top) / self.n_rows)
        return (s, s)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True, eq=False)
class BeamGrid:
    """The beam-space grid speckle is formed on (see module docstring).

    ``axial0 + a * d_axial`` is the axial coordinate of row ``a`` (mm: Probe ``z`` for a
    linear probe, range from the apex for a convex one); ``lateral0 + b * d_lateral`` of column
    ``b`` (Probe ``x`` in mm, or the angle in radians). ``sigma_axial_px`` and
    ``sigma_lateral_px`` are the in-plane PSF in grid cells.
    """

    convex: bool
    n_axial: int
    n_lateral: int
    axial0: float
    d_axial: float
    lateral0: float
    d_lateral: float
    apex_z_mm: float
    sigma_axial_px: float
    sigma_lateral_px: float


def _convex_extent(probe: ProbeConfig) -> tuple[float, float, float]:
    half = math.radians(probe.sector_deg) / 2.0
    r_max = probe.radius_mm + probe.depth_mm
    x_extent = r_max * math.sin(half)
    z_top = probe.radius_mm * math.cos(half) - probe.radius_mm
    return x_extent, z_top, probe.depth_mm


def image_to_probe_matrix(probe: ProbeConfig) -> np.ndarray:
    """ImageToProbe of the simulated probe (pixel -> Probe mm), see the module docstring.

    Returns
    -------
    (4, 4) float64; columns scaled by the pixel spacing (not rigid).
    """
    sx, sy = probe.pixel_spacing_mm
    x0 = -0.5 * (probe.n_cols - 1) * sx
    if probe.geometry == "linear":
        z0 = 0.5 * sy
    else:
        _, z_top, z_bottom = _convex_extent(probe)
        z0 = 0.5 * (z_top + z_bottom) - 0.5 * (probe.n_rows - 1) * sy
    m = np.zeros((4, 4))
    m[0, 0] = sx
    m[0, 3] = x0
    m[2, 1] = sy
    m[2, 3] = z0
    m[1, 2] = -1.0
    m[3, 3] = 1.0
    return m


def beam_grid(probe: ProbeConfig, *, oversampling: float = 1.25) -> BeamGrid:
    """Beam-space grid fine enough for the PSF (at least ``oversampling`` cells per sigma).

    The grid is never coarser than the output pixels, so scan conversion only interpolates.
    """
    sx, sy = probe.pixel_spacing_mm
    if probe.geometry == "linear":
        d_ax = min(probe.sigma_axial_mm / oversampling, sy)
        d_lat = min(probe.sigma_lateral_mm / oversampling, sx)
        n_ax = int(math.ceil(probe.depth_mm / d_ax)) + 1
        half_w = 0.5 * probe.n_cols * sx
        n_lat = int(math.ceil(2 * half_w / d_lat)) + 1
        return BeamGrid(
            convex=False,
            n_axial=n_ax,
            n_lateral=n_lat,
            axial0=0.0,
            d_axial=d_ax,
            lateral0=-half_w,
            d_lateral=d_lat,
            apex_z_mm=0.0,
            sigma_axial_px=probe.sigma_axial_mm / d_ax,
            sigma_lateral_px=probe.sigma_lateral_mm / d_lat,
        )
    half = math.radians(probe.sector_deg) / 2.0
    r0 = probe.radius_mm
    r1 = probe.radius_mm + probe.depth_mm
    d_ax = min(probe.sigma_axial_mm / oversampling, sy)
    # Lateral PSF constant in angle: the face value converted to radians at the face radius.
    sigma_theta = probe.sigma_lateral_mm / probe.radius_mm
    # Angular step fine for the PSF and for the output pixels at the deepest range.
    d_theta = min(sigma_theta / oversampling, sx / r1)
    n_ax = int(math.ceil((r1 - r0) / d_ax)) + 1
    n_lat = int(math.ceil(2 * half / d_theta)) + 1
    return BeamGrid(
        convex=True,
        n_axial=n_ax,
        n_lateral=n_lat,
        axial0=r0,
        d_axial=d_ax,
        lateral0=-half,
        d_lateral=d_theta,
        apex_z_mm=-probe.radius_mm,
        sigma_axial_px=probe.sigma_axial_mm / d_ax,
        sigma_lateral_px=sigma_theta / d_theta,
    )


def scan_conversion_maps(probe: ProbeConfig, grid: BeamGrid) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Output-pixel -> beam-grid lookup maps for ``cv2.remap``.

    Returns
    -------
    map_lateral, map_axial : (n_rows, n_cols) float32, beam-grid column / row of each pixel
    inside : (n_rows, n_cols) bool, pixels inside the field of view
    """
    m = image_to_probe_matrix(probe)
    jj, ii = np.mgrid[0 : probe.n_rows, 0 : probe.n_cols].astype(np.float64)
    x = m[0, 0] * ii + m[0, 3]
    z = m[2, 1] * jj + m[2, 3]
    if not grid.convex:
        axial, lateral = z, x
        inside = (z >= 0) & (z <= probe.depth_mm) & (np.abs(x) <= 0.5 * probe.width_mm + 1e-9)
    else:
        dz = z - grid.apex_z_mm
        axial = np.hypot(x, dz)
        lateral = np.arctan2(x, dz)
        half = math.radians(probe.sector_deg) / 2.0
        inside = (axial >= probe.radius_mm) & (axial <= probe.radius_mm + probe.depth_mm) & (np.abs(lateral) <= half)
    map_axial = ((axial - grid.axial0) / grid.d_axial).astype(np.float32)
    map_lateral = ((lateral - grid.lateral0) / grid.d_lateral).astype(np.float32)
    return map_lateral, map_axial, inside


def random_probe_config(rng: np.random.Generator, **overrides) -> ProbeConfig:
    """A randomised probe, so that a model trained on many does not learn one simulated probe.

    Draws the geometry (70 % linear), centre frequency (linear 5-10 MHz, convex 2.5-6 MHz),
    pulse length (1.8-3 cycles -> axial PSF), lateral F-number (1.8-3.5), elevational PSF sigma
    in 0.4-1.2 mm (correlated with the wavelength, as a lens of fixed F-number would be), depth,
    gain (+-6 dB), dynamic range (45-70 dB), residual TGC slope and noise level. ``overrides``
    replace any drawn field (``n_rows=128``...).
    """
    geometry = overrides.get("geometry") or ("linear" if rng.random() < 0.7 else "convex")
    if geometry == "linear":
        f0 = rng.uniform(5.0, 10.0)
        depth = rng.uniform(25.0, 50.0)
    else:
        f0 = rng.uniform(2.5, 6.0)
        depth = rng.uniform(50.0, 80.0)
    lam = SPEED_OF_SOUND_MM_PER_US / f0
    cycles = rng.uniform(1.8, 3.0)
    f_number = rng.uniform(1.8, 3.5)
    # Elevation: a fixed lens focus gives a beam that scales with the wavelength; spread it and
    # keep it inside the range real probes show (0.4-1.2 mm).
    sigma_e = float(np.clip(lam * rng.uniform(2.0, 6.0), 0.4, 1.2))
    fields = dict(
        geometry=geometry,
        n_rows=256,
        n_cols=256,
        depth_mm=depth,
        width_mm=rng.uniform(30.0, 45.0),
        radius_mm=rng.uniform(30.0, 60.0),
        sector_deg=rng.uniform(50.0, 75.0),
        center_frequency_mhz=f0,
        sigma_axial_mm=cycles * lam / 2.0 / FWHM_PER_SIGMA,
        sigma_lateral_mm=f_number * lam / FWHM_PER_SIGMA,
        sigma_elevation_mm=sigma_e,
        gain_db=rng.uniform(-6.0, 6.0),
        dynamic_range_db=rng.uniform(45.0, 70.0),
        headroom_db=12.0,
        tgc_db_per_mm=rng.uniform(-0.08, 0.08),
        noise_db=rng.uniform(-55.0, -35.0),
    )
    fields.update(overrides)
    return ProbeConfig(**fields)
