"""Small synthetic sweeps shared by the sensorless tests (not a conftest: import it)."""

from __future__ import annotations

import numpy as np
import pytest

from FreehandUSLib.simulation import ProbeConfig, SweepConfig, TrajectoryConfig, simulate_sweep

TINY_PROBE = dict(n_rows=64, n_cols=64, depth_mm=12.8, width_mm=12.8, noise_db=-50.0)


GENTLE = dict(tilt_deg=2.0, rock_deg=1.0, twist_deg=1.0, lift_mm=0.2, tremor_mm=0.03, tremor_deg=0.05)


def tiny_sweep(seed: int = 0, n_frames: int = 24, length_mm: float = 8.0, trajectory=None, **probe):
    """A short simulated sweep (64 x 64 px at 0.2 mm by default) with its true ImageToReference;
    gentle freehand motion unless ``trajectory`` (TrajectoryConfig fields) says otherwise."""
    cfg = SweepConfig(
        probe=ProbeConfig(**{**TINY_PROBE, **probe}),
        trajectory=TrajectoryConfig(n_frames=n_frames, length_mm=length_mm, seed=seed, **{**GENTLE, **(trajectory or {})}),
        seed=seed,
    )
    return simulate_sweep(cfg)


def tiny_model_config(name="dualtrack", **kw):
    from SensorlessTrackingLib.models import ModelConfig

    base = dict(
        name=name,
        image_size=(32, 32),
        pixel_spacing_mm=0.4,
        clip_length=4,
        channels=(4, 8, 8, 8),
        token_dim=16,
        heads=2,
        max_global_tokens=4,
        global_size=16,
        corr_radius=1,
        lstm_hidden=16,
    )
    base.update(kw)
    return ModelConfig(**base)


def random_rigid(rng, n, t_scale=1.0, r_deg=2.0):
    from scipy.spatial.transform import Rotation

    m = np.tile(np.eye(4), (n, 1, 1))
    m[:, :3, :3] = Rotation.from_rotvec(np.radians(r_deg) * rng.normal(size=(n, 3))).as_matrix()
    m[:, :3, 3] = t_scale * rng.normal(size=(n, 3))
    return m


@pytest.fixture(autouse=True)
def one_torch_thread():
    """One torch thread per test (CI has 2 shared cores). Import it into a test module to use it."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def run_cli(argv) -> int:
    """Run ``freehandus`` in-process (:func:`FreehandUSApp.cli.main`); returns the exit code (2 on a FreehandUSError)."""
    from FreehandUSApp.cli import main

    return main(argv)
