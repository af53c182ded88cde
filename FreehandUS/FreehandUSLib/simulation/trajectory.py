"""Freehand probe trajectories: straight, C- and S-shaped sweeps with tilt, rock, twist, tremor.

A trajectory is a stack of ProbeToReference poses ``(n_frames, 4, 4)`` (Probe frame of
:mod:`.probe`: ``x`` lateral, ``y`` elevational, ``z`` depth; Reference frame of :mod:`.tissue`:
skin at ``z = 0``, tissue at ``z > 0``). The probe glides along a path on the skin with its
elevational axis along the path tangent (the usual sweep across the image plane), at a variable
speed; on top come slow orientation changes (tilt about the lateral axis = fanning, rock about the
elevational axis, twist about the beam axis), a slow change of contact pressure (depth), and
tremor (small, fast, in all six degrees of freedom).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.ndimage import gaussian_filter1d
from scipy.spatial.transform import Rotation

__all__ = ["TrajectoryConfig", "random_trajectory_config", "make_trajectory", "SHAPES"]

SHAPES = ("straight", "C", "S")


@dataclass(frozen=True)
class TrajectoryConfig:
    """A freehand sweep.

    Attributes
    ----------
    n_frames : number of frames
    length_mm : path length on the skin (the probe's own travel adds tilt and tremor to this)
    shape : "straight", "C" (one arc) or "S" (turn and turn back)
    turn_deg : total heading change of a C, or the peak heading deviation of an S
    speed_variation : relative amplitude of the smooth speed changes (0 = constant speed);
        speeds stay within ``min_speed_mm`` .. ``max_speed_mm`` per frame
    tilt_deg, rock_deg, twist_deg : standard deviations of the slow orientation changes
        (smooth over about ``max(20, n_frames / 5)`` frames)
    lift_mm : amplitude of the slow depth (contact pressure) change
    tremor_mm, tremor_deg : standard deviations of the fast translation / rotation tremor
    seed : random seed of the smooth curves and the tremor
    """

    n_frames: int = 200
    length_mm: float = 100.0
    shape: str = "straight"
    turn_deg: float = 60.0
    speed_variation: float = 0.4
    min_speed_mm: float = 0.05
    max_speed_mm: float = 1.0
    tilt_deg: float = 8.0
    rock_deg: float = 5.0
    twist_deg: float = 5.0
    lift_mm: float = 1.0
    tremor_mm: float = 0.05
    tremor_deg: float = 0.2
    seed: int = 0

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"TrajectoryConfig.shape must be one of {SHAPES}, got {self.shape!r}")
        if int(self.n_frames) < 2:
            raise ValueError(f"TrajectoryConfig.n_frames must be >= 2, got {self.n_frames}")
        if not (self.length_mm >= 0 and math.isfinite(self.length_mm)):
            raise ValueError(f"TrajectoryConfig.length_mm must be >= 0, got {self.length_mm}")
        if not 0 < self.min_speed_mm <= self.max_speed_mm:
            raise ValueError(
                f"TrajectoryConfig speeds must satisfy 0 < min_speed_mm <= max_speed_mm, got "
                f"{self.min_speed_mm}, {self.max_speed_mm}"
            )

    def to_dict(self) -> dict:
        return asdict(self)


def random_trajectory_config(
    rng: np.random.Generator,
    *,
    n_frames: tuple[int, int] | int = (150, 400),
    length_mm: tuple[float, float] | float = (50.0, 250.0),
    shape: str | None = None,
) -> TrajectoryConfig:
    """A random sweep: frame count and length drawn from the ranges (lengths that would need more
    than 0.9 mm per frame on average are shortened), a random shape, tilt/rock/twist and tremor."""
    n = int(rng.integers(n_frames[0], n_frames[1] + 1)) if isinstance(n_frames, tuple) else int(n_frames)
    if isinstance(length_mm, tuple):
        hi = min(length_mm[1], 0.9 * n)
        lo = min(length_mm[0], hi)
        length = float(rng.uniform(lo, hi))
    else:
        length = float(length_mm)
    return TrajectoryConfig(
        n_frames=n,
        length_mm=length,
        shape=shape or str(rng.choice(SHAPES)),
        turn_deg=float(rng.uniform(30.0, 120.0)),
        speed_variation=float(rng.uniform(0.1, 0.6)),
        tilt_deg=float(rng.uniform(0.0, 8.0)),
        rock_deg=float(rng.uniform(0.0, 6.0)),
        twist_deg=float(rng.uniform(0.0, 6.0)),
        lift_mm=float(rng.uniform(0.0, 2.0)),
        tremor_mm=float(rng.uniform(0.0, 0.1)),
        tremor_deg=float(rng.uniform(0.0, 0.3)),
        seed=int(rng.integers(0, 2**31 - 1)),
    )


def _smooth_curve(rng, n, *, scale_frames) -> np.ndarray:
    """Zero-mean smooth random curve of unit standard deviation (n,)."""
    x = gaussian_filter1d(rng.normal(size=n + 4 * int(scale_frames)), scale_frames, mode="wrap")
    x = x[2 * int(scale_frames) : 2 * int(scale_frames) + n]
    x = x - x.mean()
    sd = x.std()
    return x / sd if sd > 0 else x


def _speeds(cfg: TrajectoryConfig, rng) -> np.ndarray:
    n_steps = cfg.n_frames - 1
    mean = cfg.length_mm / n_steps
    if mean <= 0:
        return np.zeros(n_steps)
    profile = 1.0 + cfg.speed_variation * _smooth_curve(rng, n_steps, scale_frames=max(3, n_steps / 6))
    profile = np.maximum(profile, 0.05)
    v = mean * profile / profile.mean()
    lo, hi = cfg.min_speed_mm, cfg.max_speed_mm
    if lo <= mean <= hi:
        for _ in range(50):  # clip and renormalise until the total length is kept
            v = np.clip(v, lo, hi)
            v *= cfg.length_mm / v.sum()
            if v.min() >= lo - 1e-9 and v.max() <= hi + 1e-9:
                break
        v = np.clip(v, lo, hi)
    return v


def make_trajectory(cfg: TrajectoryConfig) -> np.ndarray:
    """ProbeToReference poses of the sweep described by ``cfg``.

    Returns
    -------
    (n_frames, 4, 4) float64, rigid; frame 0 starts at the Reference origin heading along +y.
    """
    rng = np.random.default_rng(cfg.seed)
    n = cfg.n_frames
    v = _speeds(cfg, rng)
    s = np.concatenate([[0.0], np.cumsum(v)])
    u = s / cfg.length_mm if cfg.length_mm > 0 else np.linspace(0, 1, n)
    turn = math.radians(cfg.turn_deg)
    if cfg.shape == "straight":
        heading = 0.05 * turn * _smooth_curve(rng, n, scale_frames=max(5, n / 4))
    elif cfg.shape == "C":
        heading = turn * (u - 0.5)
    else:
        heading = turn * np.sin(2 * math.pi * u) * 0.5
    # Integrate the path on the skin (mid-point rule on the per-step heading).
    h_mid = 0.5 * (heading[1:] + heading[:-1])
    dx = -np.sin(h_mid) * v
    dy = np.cos(h_mid) * v
    x = np.concatenate([[0.0], np.cumsum(dx)])
    y = np.concatenate([[0.0], np.cumsum(dy)])
    slow = max(20.0, n / 5)
    z = cfg.lift_mm * _smooth_curve(rng, n, scale_frames=slow)
    tilt = cfg.tilt_deg * _smooth_curve(rng, n, scale_frames=slow)
    rock = cfg.rock_deg * _smooth_curve(rng, n, scale_frames=slow)
    twist = cfg.twist_deg * _smooth_curve(rng, n, scale_frames=slow)

    # Base orientation: Probe y along the tangent, Probe z down (+z Reference), x = y cross z.
    tangent = np.stack([-np.sin(heading), np.cos(heading), np.zeros(n)], axis=1)
    down = np.tile([0.0, 0.0, 1.0], (n, 1))
    lateral = np.cross(tangent, down)
    base = np.stack([lateral, tangent, down], axis=2)  # columns = Probe axes in Reference
    # Tilt about Probe x, rock about Probe y, twist about Probe z (intrinsic, applied on the right).
    local = Rotation.from_euler("xyz", np.stack([tilt, rock, twist], axis=1), degrees=True)
    tremor_r = Rotation.from_rotvec(
        np.radians(cfg.tremor_deg) * np.stack([_smooth_curve(rng, n, scale_frames=1.5) for _ in range(3)], axis=1)
    )
    rot = base @ (local * tremor_r).as_matrix()
    tremor_t = cfg.tremor_mm * np.stack([_smooth_curve(rng, n, scale_frames=1.5) for _ in range(3)], axis=1)
    poses = np.tile(np.eye(4), (n, 1, 1))
    poses[:, :3, :3] = rot
    poses[:, :3, 3] = np.stack([x, y, z - z[0]], axis=1) + tremor_t
    return poses
