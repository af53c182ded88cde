"""The per-probe corrections an adapted model carries, checked and applied.

:mod:`.adapt` fits them on a probe's tracked sweeps and stores them in the checkpoint's
adaptation record; :func:`.predict.track_sequence` applies them to the model's frame-to-frame
estimate. Parameters are frame-to-frame (mm, deg) in the centred image-mm frame, in the
models' own "toward" convention and right-handed image frame.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .attribution import GROUPS

__all__ = ["apply_out_of_plane_scale", "check_decorrelation_blend", "apply_decorrelation_blend",
           "check_adapted_decorrelation", "adapted_decorrelation_config", "check_adapted_imaging", "imaging_mismatch"]


def apply_out_of_plane_scale(params, scale: float) -> np.ndarray:
    """Frame-to-frame parameters ``(..., 6)`` (mm, deg; centred image-mm frame) with the
    out-of-plane ones (tz, rx, ry) multiplied by ``scale``."""
    out = np.array(params, dtype=np.float64)
    out[..., list(GROUPS["out_of_plane"])] *= float(scale)
    return out


def check_decorrelation_blend(blend) -> dict | None:
    """The ``decorrelation_blend`` of an adaptation record, checked (None stays None).

    Raises
    ------
    ValueError
        Not a dict of finite ``model_tz_weight``, ``decorrelation_tz_weight``, positive
        ``rotation_scale`` and a valid ``decorrelation`` (:class:`.decorrelation.DecorrelationConfig`) dict.
    """
    from .decorrelation import DecorrelationConfig

    if blend is None:
        return None
    try:
        weights = [float(blend[k]) for k in ("model_tz_weight", "decorrelation_tz_weight", "rotation_scale")]
        DecorrelationConfig(**blend["decorrelation"])
    except (TypeError, KeyError, ValueError) as exc:
        raise ValueError(f"bad adaptation decorrelation_blend {blend!r}: {exc}") from None
    if not (np.all(np.isfinite(weights)) and weights[2] > 0):
        raise ValueError(f"bad adaptation decorrelation_blend {blend!r}: weights must be finite, rotation_scale > 0")
    return blend


def check_adapted_decorrelation(settings) -> dict | None:
    """The ``decorrelation`` of an adaptation record (the ``"decorrelation"`` correction: the
    probe's calibrated speckle decorrelation estimates instead of the model), checked (None stays None).

    Raises
    ------
    ValueError
        Not a dict of valid :class:`.decorrelation.DecorrelationConfig` settings.
    """
    if settings is None:
        return None
    try:
        adapted_decorrelation_config(settings)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"bad adaptation decorrelation {settings!r}: {exc}") from None
    return settings


def check_adapted_imaging(imaging) -> dict | None:
    """The ``imaging`` of an adaptation record (the sweeps' frame size and pixel spacing), checked
    (None, from a checkpoint adapted before it was recorded, stays None).

    Raises
    ------
    ValueError
        Not a dict of ``frame_shape`` (rows, cols: two whole numbers >= 1) and ``pixel_spacing_mm``
        (sx, sy: two finite numbers > 0).
    """
    if imaging is None:
        return None
    try:
        shape, spacing = imaging["frame_shape"], imaging["pixel_spacing_mm"]
        ok = (len(shape) == 2 and len(spacing) == 2
              and all(not isinstance(v, bool) and float(v).is_integer() and v >= 1 for v in shape)
              and all(not isinstance(v, bool) and np.isfinite(float(v)) and float(v) > 0 for v in spacing))
    except (TypeError, KeyError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"bad adaptation imaging {imaging!r}: needs frame_shape (rows, cols >= 1) and "
                         "pixel_spacing_mm (two numbers > 0)")
    return {"frame_shape": [int(v) for v in shape], "pixel_spacing_mm": [float(v) for v in spacing]}


def imaging_mismatch(imaging: dict | None, shape, spacing_mm) -> str | None:
    """A warning when frames of ``shape`` (rows, cols) and ``spacing_mm`` (sx, sy, mm) are not
    those the model was adapted on (another probe, depth or zoom: its correction belongs to the
    adaptation's imaging setting), else None. Spacings within 1 % count as the same."""
    if imaging is None:
        return None
    a_shape, a_spacing = imaging["frame_shape"], imaging["pixel_spacing_mm"]
    if list(shape) == list(a_shape) and np.allclose(spacing_mm, a_spacing, rtol=0.01):
        return None
    return (f"the model was adapted on {a_shape[0]}x{a_shape[1]} px frames of {a_spacing[0]:.3g} x "
            f"{a_spacing[1]:.3g} mm, these are {shape[0]}x{shape[1]} px of {spacing_mm[0]:.3g} x "
            f"{spacing_mm[1]:.3g} mm: its correction belongs to that probe, depth and zoom; adapt on tracked "
            "sweeps recorded with these settings")


def adapted_decorrelation_config(settings: dict):
    """The :class:`.decorrelation.DecorrelationConfig` of an adaptation record's ``decorrelation``
    in the models' own "toward" convention (``direction=-1``), as :func:`.predict.track_sequence`
    estimates with it.

    Raises
    ------
    TypeError, ValueError
        Not a dict, unknown keys, invalid settings.
    """
    from .decorrelation import DecorrelationConfig

    if not isinstance(settings, dict):
        raise TypeError(f"a dict of DecorrelationConfig settings, got {type(settings).__name__}")
    return replace(DecorrelationConfig(**settings), direction=-1)


def apply_decorrelation_blend(params, frames, spacing_mm, blend: dict, *, decorrelation_params=None) -> np.ndarray:
    """A model's frame-to-frame parameters with the probe's decorrelation blend applied.

    Parameters
    ----------
    params : (n - 1, 6) float64 the model's estimate (mm, deg; centred image-mm frame, the
        models' own "toward" convention, right-handed frame)
    frames : (n, rows, cols) the frames the model saw (right-handed: a mirrored calibration's
        mirrored left-right), B-mode
    spacing_mm : (sx, sy) pixel spacing of ``frames``
    blend : ``decorrelation_blend`` of an adaptation record (:func:`check_decorrelation_blend`)
    decorrelation_params : (n - 1, 6) the decorrelation's estimate in the same convention, when
        already computed (else it is estimated from ``frames``)

    Returns
    -------
    (n - 1, 6) float64: ``tz = model_tz_weight * tz + decorrelation_tz_weight * tz_decorrelation``,
    ``(rx, ry) *= rotation_scale``, the in-plane parameters unchanged.
    """
    out = np.array(params, dtype=np.float64)
    if decorrelation_params is None:
        from .decorrelation import DecorrelationConfig, estimate_frame_to_frame

        cfg = replace(DecorrelationConfig(**blend["decorrelation"]), direction=-1)  # "toward", as the models
        decorrelation_params = estimate_frame_to_frame(frames, spacing_mm, cfg)
    dec = np.asarray(decorrelation_params, dtype=np.float64)
    out[..., 2] = float(blend["model_tz_weight"]) * out[..., 2] + float(blend["decorrelation_tz_weight"]) * dec[..., 2]
    out[..., 3:5] *= float(blend["rotation_scale"])
    return out
