"""Synthetic tracked sweeps with known geometry for the reconstruction tests and benchmarks.

Import as ``from recon_synthetic import linear_sweep, ...`` (pytest has ``pythonpath = ["Testing"]``).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
from scipy.spatial.transform import Rotation

from FreehandUSLib import TrackedSequence

__all__ = ["image_to_reference_stack", "linear_sweep", "random_sweep", "traced_peak"]


def image_to_reference_stack(n_frames: int, *, pixel_mm: float = 0.2, step_mm: float = 0.5, z0_mm: float = 0.0,
                             tilt_deg: float = 0.0) -> np.ndarray:
    """Frames in parallel planes z = z0 + f * step (pixel x -> X, row y -> Y, pixel_mm per pixel).

    Returns (n_frames, 4, 4) float64 ImageToReference matrices.
    """
    m = np.tile(np.eye(4), (n_frames, 1, 1))
    rot = Rotation.from_euler("y", tilt_deg, degrees=True).as_matrix()
    m[:, :3, :3] = rot @ np.diag([pixel_mm, pixel_mm, 1.0])
    m[:, 2, 3] = z0_mm + step_mm * np.arange(n_frames)
    return m


def linear_sweep(n_frames: int = 12, n_rows: int = 40, n_cols: int = 50, *, value=None, dtype=np.uint8,
                 pixel_mm: float = 0.2, step_mm: float = 0.5, tilt_deg: float = 0.0, seed: int = 0) -> TrackedSequence:
    """A sweep of parallel frames with an ``ImageToReference`` transform (all valid).

    ``value``: constant pixel value (``None``: random speckle).
    """
    rng = np.random.default_rng(seed)
    shape = (n_frames, n_rows, n_cols)
    if value is not None:
        frames = np.full(shape, value, dtype=dtype)
    elif np.dtype(dtype) == np.uint8:
        frames = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        frames = rng.normal(10.0, 3.0, size=shape).astype(dtype)
    mats = image_to_reference_stack(n_frames, pixel_mm=pixel_mm, step_mm=step_mm, tilt_deg=tilt_deg)
    return TrackedSequence(
        frames=frames,
        timestamps_s=np.arange(n_frames) * 0.05,
        transforms={"ImageToReference": (mats, np.ones(n_frames, dtype=bool))},
    )


def random_sweep(n_frames: int = 10, n_rows: int = 36, n_cols: int = 44, *, dtype=np.uint8, seed: int = 1) -> TrackedSequence:
    """Frames at random orientations around a common centre (many oblique overlaps)."""
    rng = np.random.default_rng(seed)
    mats = np.tile(np.eye(4), (n_frames, 1, 1))
    rot = Rotation.from_rotvec(rng.normal(scale=0.6, size=(n_frames, 3))).as_matrix()
    mats[:, :3, :3] = rot * 0.23
    centre = np.array([n_cols / 2, n_rows / 2, 0.0]) * 0.23
    mats[:, :3, 3] = rng.normal(scale=1.5, size=(n_frames, 3)) - np.einsum("nab,b->na", rot, centre)
    if np.dtype(dtype) == np.uint8:
        frames = rng.integers(0, 256, size=(n_frames, n_rows, n_cols), dtype=np.uint8)
    else:
        frames = rng.normal(0.0, 5.0, size=(n_frames, n_rows, n_cols)).astype(dtype)
    return TrackedSequence(
        frames=frames,
        transforms={"ImageToReference": (mats, np.ones(n_frames, dtype=bool))},
    )


def traced_peak(fn):
    """``(fn(), peak bytes numpy allocated while it ran)`` (tracemalloc)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
