"""A tiny tracked sweep over an analytic phantom, for tests of streaming, IO and the MRML bridge.

A fast stand-in for the speckle simulator (:mod:`.sweep`): no beam model, one multiplicative
speckle draw per pixel. Ground floor: imports only the sequence model.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.transform import Rotation

from ..sequence import TrackedSequence

__all__ = ["simulate_analytic_sweep"]


def simulate_analytic_sweep(
    n_frames: int = 60,
    n_rows: int = 160,
    n_cols: int = 128,
    *,
    pixel_spacing_mm: float = 0.3,
    step_mm: float = 0.5,
    seed: int = 0,
) -> tuple[TrackedSequence, np.ndarray]:
    """A linear sweep over an analytic phantom, tracked by a ProbeToTracker transform.

    The phantom (Tracker frame, mm) holds a vessel along y and two spherical inclusions in
    multiplicative speckle. The probe moves along +y by ``step_mm`` per frame with a slow rock.
    (A fast stand-in for tests of streaming and IO; the demo itself uses the speckle simulator.)

    Returns
    -------
    sequence : TrackedSequence with ProbeToTracker (all valid), frames uint8 (n, rows, cols), MF
    image_to_probe : (4, 4) float64, pixel -> Probe mm (spacing ``pixel_spacing_mm``, image
        centred laterally on the probe origin, depth along +z)
    """
    rng = np.random.default_rng(seed)
    # Image i (columns) -> Probe x, image j (rows, depth) -> Probe z, image normal -> Probe -y (right-handed).
    image_to_probe = np.zeros((4, 4))
    image_to_probe[3, 3] = 1.0
    image_to_probe[0, 0] = pixel_spacing_mm
    image_to_probe[2, 1] = pixel_spacing_mm
    image_to_probe[1, 2] = -1.0
    image_to_probe[0, 3] = -0.5 * n_cols * pixel_spacing_mm

    t = np.arange(n_frames)
    probe_to_tracker = np.tile(np.eye(4), (n_frames, 1, 1))
    rock_deg = 4.0 * np.sin(t / max(n_frames - 1, 1) * np.pi)
    rock = Rotation.from_euler("y", rock_deg[:, None], degrees=True)
    probe_to_tracker[:, :3, :3] = rock.as_matrix()
    probe_to_tracker[:, 1, 3] = t * step_mm

    jj, ii = np.mgrid[0:n_rows, 0:n_cols]
    pixels = np.stack([ii.ravel(), jj.ravel(), np.zeros(ii.size), np.ones(ii.size)])
    image_to_tracker = probe_to_tracker @ image_to_probe
    points = (image_to_tracker @ pixels)[:, :3, :]  # (n, 3, rows*cols) mm
    x, y, z = points[:, 0], points[:, 1], points[:, 2]
    depth = n_rows * pixel_spacing_mm
    echo = np.full(x.shape, 0.35)
    vessel = (x - 0.0) ** 2 + (z - 0.45 * depth) ** 2 < (0.12 * depth) ** 2
    echo[vessel] = 0.05
    for cx, cy, cz, r, level in ((-8.0, 8.0, 0.7 * depth, 5.0, 0.9), (9.0, 20.0, 0.25 * depth, 4.0, 0.8)):
        inside = (x - cx) ** 2 + (y - cy) ** 2 + (z - cz) ** 2 < r**2
        echo[inside] = level
    speckle = rng.rayleigh(scale=0.6, size=echo.shape)
    frames = np.clip(255.0 * echo * speckle, 0, 255).astype(np.uint8).reshape(n_frames, n_rows, n_cols)
    seq = TrackedSequence(
        frames=frames,
        timestamps_s=t / 20.0,
        transforms={"ProbeToTracker": (probe_to_tracker, np.ones(n_frames, dtype=bool))},
        pixel_spacing_mm=(pixel_spacing_mm, pixel_spacing_mm),
        metadata={"UltrasoundImageType": "BRIGHTNESS"},
    )
    return seq, image_to_probe
