"""Test data helpers: where the PLUS test data lives, and synthetic tracked sequences.

Import from tests as ``from testdata import plus_file, make_synthetic_sequence``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from FreehandUSLib import TrackedSequence

REPO_ROOT = Path(__file__).resolve().parents[1]
PLUS_DATA = REPO_ROOT.parent / "shared" / "data" / "plus"
PLUS_IMAGES = PLUS_DATA / "TestImages"
PLUS_CONFIGS = PLUS_DATA / "ConfigFiles"


def plus_file(relative: str) -> Path:
    """Path of a file in ../shared/data/plus; skips the test cleanly when it is absent."""
    path = PLUS_DATA / relative
    if not path.is_file():
        pytest.skip(f"PLUS test data not found: {path} (expected ../shared/data/plus beside the repo)")
    return path


def make_synthetic_sequence(
    n_frames: int = 12,
    n_rows: int = 48,
    n_cols: int = 64,
    *,
    dtype=np.uint8,
    n_channels: int = 1,
    seed: int = 0,
) -> TrackedSequence:
    """A small random tracked sequence with ProbeToTracker + ReferenceToTracker (one invalid)."""
    rng = np.random.default_rng(seed)
    shape = (n_frames, n_rows, n_cols) + ((n_channels,) if n_channels > 1 else ())
    if np.dtype(dtype) == np.uint8:
        frames = rng.integers(0, 256, size=shape, dtype=np.uint8)
    else:
        frames = rng.normal(size=shape).astype(dtype)

    def poses(scale):
        m = np.tile(np.eye(4), (n_frames, 1, 1))
        m[:, :3, :3] = Rotation.from_rotvec(rng.normal(scale=0.3, size=(n_frames, 3))).as_matrix()
        m[:, :3, 3] = rng.normal(scale=scale, size=(n_frames, 3))
        return m

    ref_valid = np.ones(n_frames, dtype=bool)
    ref_valid[n_frames // 2] = False
    return TrackedSequence(
        frames=frames,
        timestamps_s=100.0 + np.cumsum(rng.uniform(0.02, 0.05, size=n_frames)),
        transforms={
            "ProbeToTracker": (poses(100.0), np.ones(n_frames, dtype=bool)),
            "ReferenceToTracker": (poses(50.0), ref_valid),
        },
    )
