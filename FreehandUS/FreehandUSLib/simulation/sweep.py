"""Simulated freehand sweeps: tissue + probe + trajectory -> a tracked B-mode sequence.

:func:`simulate_sweep` images a :class:`~.tissue.TissueConfig` with a :class:`~.probe.ProbeConfig`
along a :class:`~.trajectory.TrajectoryConfig` and returns a :class:`~FreehandUSLib.TrackedSequence`
whose per-frame transforms are the truth:

- ``ImageToReference`` = ProbeToReference @ ImageToProbe (what reconstruction needs),
- ``ProbeToReference`` (the rigid probe pose),
- ``ImageToProbe`` (the calibration, the same on every frame; includes the pixel spacing).

Per frame: scatterers near the image plane (>= 10 per resolution cell) -> IQ image on the beam
grid (:mod:`.speckle`) -> electronic noise -> intensity -> scan conversion -> depth gain ->
log compression to the dynamic range -> uint8. With ``photoacoustic=True`` a second image of
the same frames is formed from absorbers that lie only in vessel lumens (one-way phase,
fluence decaying with depth).

:func:`random_sweep_config` draws everything (probe, tissue, trajectory) from one seed, so a
training set is reproducible from a list of seeds.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace

import cv2
import numpy as np

from ..sequence import TrackedSequence
from .probe import ProbeConfig, beam_grid, image_to_probe_matrix, random_probe_config, scan_conversion_maps
from .speckle import ScattererField, iq_normalisation, render_iq
from .tissue import TissueConfig, TissueVolume, build_tissue_volume, random_tissue_config
from .trajectory import TrajectoryConfig, make_trajectory, random_trajectory_config

__all__ = ["SweepConfig", "SweepResult", "random_sweep_config", "simulate_sweep", "simulate_frames", "sweep_bounds"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SweepConfig:
    """Everything that defines a simulated sweep (see the module docstring).

    Attributes
    ----------
    probe, trajectory : the probe and its motion
    tissue : the tissue; None draws a random one from ``seed`` that fills the swept volume
    scatterers_per_cell : scatterers per resolution cell (>= 10: fully developed speckle)
    frame_rate_hz : sets the timestamps
    photoacoustic : also image the vessel absorbers (second image stack)
    pa_attenuation_per_mm : effective fluence attenuation of the photoacoustic channel
    seed : scatterer positions and, when ``tissue`` is None, the tissue
    """

    probe: ProbeConfig = field(default_factory=ProbeConfig)
    trajectory: TrajectoryConfig = field(default_factory=TrajectoryConfig)
    tissue: TissueConfig | None = None
    scatterers_per_cell: float = 10.0
    frame_rate_hz: float = 20.0
    photoacoustic: bool = False
    pa_attenuation_per_mm: float = 0.05
    seed: int = 0

    def __post_init__(self):
        if not (self.scatterers_per_cell > 0 and math.isfinite(self.scatterers_per_cell)):
            raise ValueError(f"SweepConfig.scatterers_per_cell must be positive, got {self.scatterers_per_cell}")
        if not (self.frame_rate_hz > 0):
            raise ValueError(f"SweepConfig.frame_rate_hz must be positive, got {self.frame_rate_hz}")

    def to_dict(self) -> dict:
        return {
            "probe": self.probe.to_dict(),
            "trajectory": self.trajectory.to_dict(),
            "tissue": None if self.tissue is None else self.tissue.to_dict(),
            "scatterers_per_cell": self.scatterers_per_cell,
            "frame_rate_hz": self.frame_rate_hz,
            "photoacoustic": self.photoacoustic,
            "pa_attenuation_per_mm": self.pa_attenuation_per_mm,
            "seed": self.seed,
        }


@dataclass(frozen=True, eq=False)
class SweepResult:
    """A simulated sweep.

    Attributes
    ----------
    sequence : TrackedSequence, frames (n, n_rows, n_cols) uint8 MF; transforms ImageToReference,
        ProbeToReference, ImageToProbe (all valid)
    image_to_probe : (4, 4) float64, the calibration (pixel -> Probe mm)
    config : the SweepConfig used (with the drawn tissue filled in)
    photoacoustic : (n, n_rows, n_cols) uint8 or None, the photoacoustic frames
    intensity : (n, n_rows, n_cols) float32 or None, linear intensity before log compression
        (``keep_intensity=True``; 1 = mean of echogenicity-1 tissue)
    seconds : wall time of the simulation
    """

    sequence: TrackedSequence
    image_to_probe: np.ndarray
    config: SweepConfig
    photoacoustic: np.ndarray | None = None
    intensity: np.ndarray | None = None
    seconds: float = 0.0

    @property
    def frames_per_second(self) -> float:
        return self.sequence.n_frames / self.seconds if self.seconds > 0 else float("inf")

    @property
    def path_length_mm(self) -> float:
        t = self.sequence.transforms["ProbeToReference"].matrices[:, :3, 3]
        return float(np.linalg.norm(np.diff(t, axis=0), axis=1).sum())

    def photoacoustic_sequence(self) -> TrackedSequence | None:
        """The photoacoustic frames as a sequence sharing the trajectory (None without them)."""
        if self.photoacoustic is None:
            return None
        seq = self.sequence
        return TrackedSequence(
            frames=self.photoacoustic,
            timestamps_s=seq.timestamps_s.copy(),
            transforms={k: v.take(slice(None)) for k, v in seq.transforms.items()},
            pixel_spacing_mm=seq.pixel_spacing_mm,
            metadata={"UltrasoundImageType": "PHOTOACOUSTIC"},
        )

    def to_dict(self) -> dict:
        p = self.config.probe
        return {
            "frames": self.sequence.n_frames,
            "width": self.sequence.n_cols,
            "height": self.sequence.n_rows,
            "pixel_spacing_mm": list(self.sequence.pixel_spacing_mm),
            "geometry": p.geometry,
            "path_length_mm": self.path_length_mm,
            "shape": self.config.trajectory.shape,
            "sigma_elevation_mm": p.sigma_elevation_mm,
            "photoacoustic": self.photoacoustic is not None,
            "seconds": self.seconds,
            "frames_per_second": self.frames_per_second,
            "ImageToProbe": self.image_to_probe.tolist(),
            "config": self.config.to_dict(),
        }

    def __str__(self) -> str:
        p = self.config.probe
        return (
            f"Simulated sweep: {self.sequence.n_frames} frames {self.sequence.n_cols}x{self.sequence.n_rows}, "
            f"{p.geometry} probe {p.center_frequency_mhz:.1f} MHz, elevational sigma {p.sigma_elevation_mm:.2f} mm, "
            f"{self.config.trajectory.shape} path {self.path_length_mm:.1f} mm, "
            f"{self.seconds:.1f} s ({self.frames_per_second:.1f} frames/s)"
        )


def random_sweep_config(seed: int, *, probe_overrides: dict | None = None, trajectory_overrides: dict | None = None, **overrides) -> SweepConfig:
    """A fully random sweep drawn from ``seed`` (probe, trajectory; tissue drawn at simulation).

    ``probe_overrides`` fix probe fields (``{"n_rows": 128, "n_cols": 128}``),
    ``trajectory_overrides`` are passed to :func:`~.trajectory.random_trajectory_config`
    (``n_frames``, ``length_mm``, ``shape``), other keywords set SweepConfig fields.
    """
    rng = np.random.default_rng(seed)
    probe = random_probe_config(rng, **(probe_overrides or {}))
    trajectory = random_trajectory_config(rng, **(trajectory_overrides or {}))
    return SweepConfig(probe=probe, trajectory=trajectory, seed=int(seed), **overrides)


def _beam_region(probe: ProbeConfig) -> np.ndarray:
    """Probe-frame corner points of the imaged region (x, z) used for the bounding box."""
    if probe.geometry == "linear":
        w = 0.5 * probe.width_mm
        return np.array([[-w, 0.0], [w, 0.0], [-w, probe.depth_mm], [w, probe.depth_mm]])
    half = math.radians(probe.sector_deg) / 2
    r1 = probe.radius_mm + probe.depth_mm
    xs = r1 * math.sin(half)
    z_top = probe.radius_mm * math.cos(half) - probe.radius_mm
    return np.array([[-xs, z_top], [xs, z_top], [-xs, probe.depth_mm], [xs, probe.depth_mm]])


def sweep_bounds(probe: ProbeConfig, probe_to_reference: np.ndarray, *, margin_mm: float = 2.0):
    """Reference-frame bounding box ((x0, x1), (y0, y1), (z0, z1)) of all imaged regions."""
    region = _beam_region(probe)
    cut = 3.0 * probe.sigma_elevation_mm + margin_mm
    pts = np.array([[x, y, z, 1.0] for x, z in region for y in (-cut, cut)])
    world = np.einsum("nij,pj->npi", probe_to_reference, pts)[..., :3].reshape(-1, 3)
    lo = world.min(axis=0) - margin_mm
    hi = world.max(axis=0) + margin_mm
    return tuple((float(a), float(b)) for a, b in zip(lo, hi))


class _FrameRenderer:
    """Per-probe precomputation (beam grid, scan conversion, gain map) and one-frame rendering."""

    def __init__(self, probe: ProbeConfig, density_per_mm3: float, seed: int):
        self.probe = probe
        self.grid = beam_grid(probe)
        self.field = ScattererField(density_per_mm3, seed)
        self.norm = iq_normalisation(probe, self.grid, self.field.density_per_mm3)[:, None, None]
        self.map_lat, self.map_ax, self.inside = scan_conversion_maps(probe, self.grid)
        m = image_to_probe_matrix(probe)
        rows_z = m[2, 1] * np.arange(probe.n_rows) + m[2, 3]
        jj = np.broadcast_to(rows_z[:, None], (probe.n_rows, probe.n_cols))
        if probe.geometry == "convex":
            xx = m[0, 0] * np.arange(probe.n_cols) + m[0, 3]
            depth = np.hypot(xx[None, :], jj + probe.radius_mm) - probe.radius_mm
        else:
            depth = jj
        self.depth_mm = np.clip(depth, 0.0, None).astype(np.float32)
        self.gain = (10.0 ** (probe.tgc_db_per_mm * self.depth_mm / 10.0)).astype(np.float32)
        self.noise_sd = math.sqrt(10.0 ** (probe.noise_db / 10.0) / 2.0)

    def intensity(self, pose, vol_values, vol_origin, vol_spacing, rng, *, wavenumber_factor=2.0, noise=True):
        iq = render_iq(
            self.field,
            self.probe,
            self.grid,
            pose,
            vol_values,
            vol_origin,
            vol_spacing,
            wavenumber_factor=wavenumber_factor,
        )
        iq *= self.norm
        if noise and self.noise_sd > 0:
            iq += rng.normal(scale=self.noise_sd, size=iq.shape).astype(np.float32)
        inten = iq[..., 0] * iq[..., 0] + iq[..., 1] * iq[..., 1]
        out = cv2.remap(inten, self.map_lat, self.map_ax, interpolation=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
        out[~self.inside] = 0.0
        return out

    def log_compress(self, intensity: np.ndarray, *, gain_db: float, dynamic_range_db: float) -> np.ndarray:
        db = 10.0 * np.log10(intensity * self.gain + 1e-12) + (gain_db - self.probe.headroom_db)
        img = np.clip((db + dynamic_range_db) * (255.0 / dynamic_range_db), 0.0, 255.0)
        img[~self.inside] = 0.0
        return (img + 0.5).astype(np.uint8)


def simulate_frames(
    probe: ProbeConfig,
    probe_to_reference: np.ndarray,
    volume: TissueVolume,
    *,
    scatterers_per_cell: float = 10.0,
    seed: int = 0,
    noise: bool = True,
    output: str = "bmode",
) -> np.ndarray:
    """Image ``volume`` from the given probe poses (the engine of :func:`simulate_sweep`).

    Parameters
    ----------
    probe : ProbeConfig
    probe_to_reference : (n, 4, 4) float64 rigid poses
    volume : TissueVolume (echogenicity is imaged)
    scatterers_per_cell, seed : scatterer density and positions
    noise : add electronic noise
    output : "bmode" -> (n, rows, cols) uint8; "intensity" -> (n, rows, cols) float32 linear
        intensity (1 = mean of echogenicity-1 tissue)
    """
    if output not in ("bmode", "intensity"):
        raise ValueError(f"output must be 'bmode' or 'intensity', got {output!r}")
    poses = np.asarray(probe_to_reference, dtype=np.float64).reshape(-1, 4, 4)
    renderer = _FrameRenderer(probe, scatterers_per_cell / probe.resolution_cell_mm3, seed)
    rng = np.random.default_rng([seed, 7])
    dtype = np.uint8 if output == "bmode" else np.float32
    out = np.empty((len(poses), probe.n_rows, probe.n_cols), dtype=dtype)
    for i, pose in enumerate(poses):
        inten = renderer.intensity(pose, volume.echogenicity, volume.origin_mm, volume.spacing_mm, rng, noise=noise)
        out[i] = inten if output == "intensity" else renderer.log_compress(inten, gain_db=probe.gain_db, dynamic_range_db=probe.dynamic_range_db)
    return out


def simulate_sweep(config: SweepConfig, *, keep_intensity: bool = False, progress=None) -> SweepResult:
    """Simulate one tracked freehand sweep (see the module docstring).

    Parameters
    ----------
    config : SweepConfig
    keep_intensity : also return the linear intensity frames (float32; memory!)
    progress : optional callable ``progress(done, total)`` called after every frame

    Returns
    -------
    SweepResult
    """
    start = time.perf_counter()
    probe = config.probe
    poses = make_trajectory(config.trajectory)
    n = len(poses)
    bounds = sweep_bounds(probe, poses)
    tissue = config.tissue
    if tissue is None:
        tissue = random_tissue_config(np.random.default_rng([config.seed, 1]), bounds)
        config = replace(config, tissue=tissue)
    volume = build_tissue_volume(tissue, bounds, absorption=config.photoacoustic)
    log.info("tissue volume %s voxels at %.2f mm in %.2f s", volume.echogenicity.shape, volume.spacing_mm, time.perf_counter() - start)
    renderer = _FrameRenderer(probe, config.scatterers_per_cell / probe.resolution_cell_mm3, config.seed)
    pa_renderer = None
    if config.photoacoustic:
        # Absorbers are a separate random population (their own seed), imaged one way.
        pa_renderer = _FrameRenderer(probe, config.scatterers_per_cell / probe.resolution_cell_mm3, config.seed + 1_000_003)
        fluence = np.exp(-config.pa_attenuation_per_mm * renderer.depth_mm).astype(np.float32)
    rng = np.random.default_rng([config.seed, 2])
    frames = np.empty((n, probe.n_rows, probe.n_cols), dtype=np.uint8)
    pa = np.empty_like(frames) if config.photoacoustic else None
    intensity = np.empty(frames.shape, dtype=np.float32) if keep_intensity else None
    for i, pose in enumerate(poses):
        inten = renderer.intensity(pose, volume.echogenicity, volume.origin_mm, volume.spacing_mm, rng)
        if intensity is not None:
            intensity[i] = inten
        frames[i] = renderer.log_compress(inten, gain_db=probe.gain_db, dynamic_range_db=probe.dynamic_range_db)
        if pa_renderer is not None:
            p_int = pa_renderer.intensity(pose, volume.absorption, volume.origin_mm, volume.spacing_mm, rng, wavenumber_factor=1.0)
            pa[i] = pa_renderer.log_compress(p_int * fluence * fluence, gain_db=0.0, dynamic_range_db=40.0)
        if progress is not None:
            progress(i + 1, n)
    image_to_probe = image_to_probe_matrix(probe)
    image_to_reference = poses @ image_to_probe
    valid = np.ones(n, dtype=bool)
    seq = TrackedSequence(
        frames=frames,
        timestamps_s=np.arange(n) / config.frame_rate_hz,
        transforms={
            "ImageToReference": (image_to_reference, valid),
            "ProbeToReference": (poses, valid.copy()),
            "ImageToProbe": (np.broadcast_to(image_to_probe, (n, 4, 4)).copy(), valid.copy()),
        },
        pixel_spacing_mm=probe.pixel_spacing_mm,
        metadata={"UltrasoundImageType": "BRIGHTNESS"},
    )
    return SweepResult(
        sequence=seq,
        image_to_probe=image_to_probe,
        config=config,
        photoacoustic=pa,
        intensity=intensity,
        seconds=time.perf_counter() - start,
    )
