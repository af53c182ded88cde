"""Test-time averaging of a learned model over the two mirror symmetries of a sweep.

A sweep has two symmetries that the physics respects exactly and a trained network only
approximately:

- **flip**: the sweep with every frame mirrored left-right is the sweep of the mirrored world;
  its frame-to-frame transforms are the original ones conjugated by :func:`~.pose.mirror_x`.
- **reverse**: the sweep played backwards is the sweep of the probe mirrored across the image
  plane moving forwards (see :func:`~.pose.mirror_z`); its transform for pair ``i`` is the
  inverse of the original pair ``n - 2 - i``, conjugated by ``mirror_z``.

A network learns these from augmentation but keeps a small bias that changes sign under the
mirror (a slight preference for one tilt direction, say). Single biased steps are harmless;
summed over hundreds of frames they become drift, and averaging models trained with other seeds
does not remove them because they share the bias. Averaging each frame-to-frame estimate with
its mirrored counterparts cancels every such odd component, and the averaged estimator is
exactly equivariant under both symmetries.

:func:`.predict.predict_poses_averaged` runs the model on each variant and averages with these
helpers. The cost is one forward pass per variant: 2x the inference time for ``"flip"``, 4x for
``"flip+reverse"``. Frame-to-frame parameters are averaged as vectors (mm, degrees): the
frame-to-frame steps are small (below about 2 mm and 2 degrees), where that is the mean of the
rotations to far better than the model's error.
"""

from __future__ import annotations

import numpy as np

from .pose import matrices_to_params, mirror_z, params_to_matrices

#: Accepted values of ``mode``: no averaging, left-right mirror, mirror and backwards sweep.
MODES = ("none", "flip", "flip+reverse")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ValueError that lists them."""
    if mode not in MODES:
        raise ValueError(f"unknown test-time averaging {mode!r}; use one of {', '.join(MODES)}")
    return mode


def conjugate(params: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    """Frame-to-frame parameters (mm, deg) of the mirrored sweep: each step conjugated by ``mirror``."""
    return matrices_to_params(mirror @ params_to_matrices(params) @ mirror)


def unreverse(params: np.ndarray) -> np.ndarray:
    """Estimates of the backwards sweep -> estimates of the forward sweep (pair order and direction)."""
    m = mirror_z()
    return matrices_to_params(m @ np.linalg.inv(params_to_matrices(params[::-1])) @ m)
