"""Simulated training and test sweeps (FreehandUS speckle simulator -> model inputs).

One integer seed defines a whole sweep (probe, tissue, trajectory, scatterers), so a data set is
a list of seeds; :data:`TRAIN_SEEDS` and :data:`TEST_SEEDS` never overlap. Sweeps can be made in
several processes (the simulator is single-threaded).
"""

from __future__ import annotations

import logging
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from .data import prepare_sweep

__all__ = ["TRAIN_SEED_BASE", "TEST_SEED_BASE", "train_seeds", "test_seeds", "simulate_sequence", "simulated_sweeps"]

log = logging.getLogger(__name__)

#: Training sweeps use seeds TRAIN_SEED_BASE + k, held-out test sweeps TEST_SEED_BASE + k.
TRAIN_SEED_BASE = 1_000
TEST_SEED_BASE = 900_000


def train_seeds(n: int) -> list[int]:
    return [TRAIN_SEED_BASE + k for k in range(n)]


def test_seeds(n: int) -> list[int]:
    return [TEST_SEED_BASE + k for k in range(n)]


def simulate_sequence(seed: int, *, n_frames=(150, 400), length_mm=(60.0, 250.0), shape=None, probe_overrides=None):
    """Simulate the sweep of ``seed`` (random probe, tissue, trajectory; ``shape`` fixes the
    sweep shape); returns the SweepResult."""
    from FreehandUSLib.simulation import random_sweep_config, simulate_sweep

    overrides = {"n_frames": n_frames, "length_mm": length_mm}
    if shape is not None:
        overrides["shape"] = shape
    cfg = random_sweep_config(seed, probe_overrides=probe_overrides, trajectory_overrides=overrides)
    return simulate_sweep(cfg)


def _one(args):
    seed, model_config, margin_px, n_frames, length_mm, keep_sequence, probe_overrides = args
    res = simulate_sequence(seed, n_frames=n_frames, length_mm=length_mm, probe_overrides=probe_overrides)
    seq = res.sequence
    sweep = prepare_sweep(
        seq.frames,
        seq.transforms["ImageToReference"].matrices,
        model_spacing_mm=model_config.pixel_spacing_mm,
        image_size=model_config.image_size,
        global_size=model_config.global_size,
        margin_px=margin_px,
        name=f"sim-{seed}",
        group=f"sim-{seed}",
    )
    return sweep, (seq if keep_sequence else None), res.seconds


def simulated_sweeps(
    seeds,
    model_config,
    *,
    margin_px: int = 0,
    n_frames=(150, 400),
    length_mm=(60.0, 250.0),
    processes: int = 1,
    keep_sequences: bool = False,
    probe_overrides: dict | None = None,
    progress=None,
):
    """Simulate and prepare sweeps for ``model_config`` (``probe_overrides`` fix probe fields).

    Returns
    -------
    sweeps : list of PreparedSweep (group = one per seed)
    sequences : list of TrackedSequence (native resolution) or None entries
    seconds : total simulation time (sum over sweeps)
    """
    jobs = [(int(s), model_config, margin_px, n_frames, length_mm, keep_sequences, probe_overrides) for s in seeds]
    out = []
    if processes > 1:
        with ProcessPoolExecutor(processes) as pool:
            for i, r in enumerate(pool.map(_one, jobs)):
                out.append(r)
                if progress is not None:
                    progress(i + 1, len(jobs))
    else:
        for i, job in enumerate(jobs):
            out.append(_one(job))
            if progress is not None:
                progress(i + 1, len(jobs))
    sweeps = [o[0] for o in out]
    sequences = [o[1] for o in out]
    return sweeps, sequences, float(np.sum([o[2] for o in out]))
