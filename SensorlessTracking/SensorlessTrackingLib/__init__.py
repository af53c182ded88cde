"""SensorlessTrackingLib: probe trajectories from the ultrasound images alone.

Numpy-only parts are imported here: :mod:`.pose` (conventions), :mod:`.metrics` (TUS-REC drift
metrics), :mod:`.decorrelation` (the physics baseline). The learned models and their training
and inference (:mod:`.models`, :mod:`.data`, :mod:`.train`, :mod:`.predict`, :mod:`.losses`,
:mod:`.simdata`) import torch and are imported explicitly::

    from SensorlessTrackingLib.predict import load_model, track_sequence
    result = track_sequence(sequence, "default")          # the shipped model
    result.sequence.transforms["ImageToReference"]         # the estimated trajectory
"""

from .decorrelation import DecorrelationConfig, calibrate_decorrelation, estimate_frame_to_frame
from .metrics import TrackingMetrics, tracking_metrics

__all__ = [
    "DecorrelationConfig",
    "calibrate_decorrelation",
    "estimate_frame_to_frame",
    "TrackingMetrics",
    "tracking_metrics",
]
