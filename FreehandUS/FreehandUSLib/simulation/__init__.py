"""Simulation of tracked freehand ultrasound: speckle sweeps over a 3D tissue model.

- :mod:`.probe`: linear/convex probe geometry, PSF, display settings, randomised probes;
- :mod:`.tissue`: layers, vessels, inclusions (echogenicity; photoacoustic absorbers in vessels);
- :mod:`.trajectory`: straight / C / S freehand sweeps with tilt, rock, twist and tremor;
- :mod:`.speckle`: the scatterer field and the numba imaging kernel;
- :mod:`.sweep`: :func:`simulate_sweep` -> a TrackedSequence with the true ImageToReference;
- :mod:`.cli`: ``freehandus simulate sweep``.
"""

from .probe import ProbeConfig, image_to_probe_matrix, random_probe_config
from .sweep import SweepConfig, SweepResult, random_sweep_config, simulate_frames, simulate_sweep, sweep_bounds
from .tissue import (
    Inclusion,
    Layer,
    TissueConfig,
    TissueVolume,
    Vessel,
    build_tissue_volume,
    homogeneous_tissue,
    random_tissue_config,
)
from .trajectory import SHAPES, TrajectoryConfig, make_trajectory, random_trajectory_config

__all__ = [
    "ProbeConfig",
    "image_to_probe_matrix",
    "random_probe_config",
    "SweepConfig",
    "SweepResult",
    "random_sweep_config",
    "simulate_frames",
    "simulate_sweep",
    "sweep_bounds",
    "Inclusion",
    "Layer",
    "TissueConfig",
    "TissueVolume",
    "Vessel",
    "build_tissue_volume",
    "homogeneous_tissue",
    "random_tissue_config",
    "SHAPES",
    "TrajectoryConfig",
    "make_trajectory",
    "random_trajectory_config",
]
