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

The cost is one forward pass per variant: 2x the inference time for ``"flip"``, 4x for
``"flip+reverse"``. Frame-to-frame parameters are averaged as vectors (mm, degrees): the
frame-to-frame steps are small (below about 2 mm and 2 degrees), where that is the mean of the
rotations to far better than the model's error.
"""

from __future__ import annotations

import numpy as np

from .pose import matrices_to_params, mirror_x, mirror_z, params_to_matrices

#: Accepted values of ``mode``: no averaging, left-right mirror, mirror and backwards sweep.
MODES = ("none", "flip", "flip+reverse")


def check_mode(mode: str) -> str:
    """``mode`` if it is one of :data:`MODES`, else a ValueError that lists them."""
    if mode not in MODES:
        raise ValueError(f"unknown test-time averaging {mode!r}; use one of {', '.join(MODES)}")
    return mode


def _conjugate(params: np.ndarray, mirror: np.ndarray) -> np.ndarray:
    return matrices_to_params(mirror @ params_to_matrices(params) @ mirror)


def _unreverse(params: np.ndarray) -> np.ndarray:
    """Estimates of the backwards sweep -> estimates of the forward sweep (pair order and direction)."""
    m = mirror_z()
    return matrices_to_params(m @ np.linalg.inv(params_to_matrices(params[::-1])) @ m)


def predict_poses_averaged(frames, model, *, mode: str = "flip+reverse", **predict_kwargs) -> np.ndarray:
    """Frame-to-frame poses of a sweep, averaged over its mirror images.

    Parameters
    ----------
    frames : (n, rows, cols) frames already at the model's input geometry (as for
        :func:`~.predict.predict_poses`)
    model : a loaded learned model
    mode : one of :data:`MODES`
    predict_kwargs : passed on to :func:`~.predict.predict_poses` (device, batch_size, fast);
        not ``global_frames``, which every variant makes from its own frames

    Returns
    -------
    (n - 1, 6) float64 frame-to-frame parameters (mm, deg) in the centred image-mm frame, pair
    ``i`` = frame ``i + 1`` -> ``i``, as :func:`~.predict.predict_poses`.
    """
    from .predict import predict_poses

    check_mode(mode)
    if "global_frames" in predict_kwargs:
        raise ValueError("predict_poses_averaged makes each variant's global frames itself; do not pass global_frames")
    f = np.asarray(frames)
    estimates = [predict_poses(f, model, **predict_kwargs)]
    if mode == "none":
        return estimates[0]
    mx = mirror_x()
    flipped = np.ascontiguousarray(f[:, :, ::-1])
    estimates.append(_conjugate(predict_poses(flipped, model, **predict_kwargs), mx))
    if mode == "flip+reverse":
        estimates.append(_unreverse(predict_poses(np.ascontiguousarray(f[::-1]), model, **predict_kwargs)))
        back_flipped = _unreverse(predict_poses(np.ascontiguousarray(flipped[::-1]), model, **predict_kwargs))
        estimates.append(_conjugate(back_flipped, mx))
    return np.mean(estimates, axis=0)
