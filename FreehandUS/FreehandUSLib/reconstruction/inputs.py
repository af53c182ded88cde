"""A reconstruction's inputs: options from a PLUS config, each frame's ImageToReference, the importance mask.

- :func:`options_from_plus_config` maps a PLUS ``<VolumeReconstruction>`` element to
  :class:`~.config.ReconstructionOptions`.
- :func:`resolve_image_to_reference` gives each frame's ImageToReference from a sequence's
  transforms and fixed ones (ImageToProbe, a PLUS config's ``<CoordinateDefinitions>``).
- :func:`load_importance_mask` reads PLUS's importance mask image as per-pixel weights.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from ..errors import TransformError
from ..sequence import TrackedSequence
from ..transforms import TransformRepository, split_transform_name
from .config import PLUS_OPTIMIZATIONS, HoleFillingElement, ReconstructionOptions
from .errors import ReconstructionError

__all__ = ["options_from_plus_config", "resolve_image_to_reference", "load_importance_mask"]

log = logging.getLogger(__name__)


def resolve_image_to_reference(sequence: TrackedSequence, transforms=None, name: str = "ImageToReference"):
    """Per-frame ImageToReference of a sequence.

    Parameters
    ----------
    sequence : TrackedSequence
    transforms : None, (4, 4) array, mapping name -> (4, 4), or TransformRepository
        A 4x4 is taken as ImageToProbe; a mapping holds fixed transforms (e.g.
        ``PlusConfig.coordinate_definitions.repository_fixed()``); a repository is used as is.
        ``None``: the sequence's own transforms only.
    name : str
        The transform to resolve (``"ImageToReference"``).

    Returns
    -------
    matrices : (n_frames, 4, 4) float64, NaN where invalid
    valid : (n_frames,) bool

    Raises
    ------
    TransformError
        When ``name`` cannot be resolved; the message lists the known transforms and, when
        the chain lacks the image frame, asks for ImageToProbe.
    """
    split_transform_name(name)
    if isinstance(transforms, TransformRepository):
        repo = transforms
    else:
        fixed = {}
        if transforms is not None:
            if isinstance(transforms, Mapping):
                fixed = dict(transforms)
            else:
                matrix = np.asarray(transforms, dtype=np.float64)
                if matrix.shape != (4, 4):
                    raise TransformError(f"image_to_probe: expected a 4x4 matrix, got shape {matrix.shape}")
                fixed = {"ImageToProbe": matrix}
        repo = sequence.repository(fixed=fixed)
    try:
        matrices = repo.get(name)
    except TransformError as exc:
        src = split_transform_name(name)[0]
        hint = ""
        if src not in repo.frames:
            hint = (
                f" The calibration {src}ToProbe is missing: give it in the PLUS config's "
                f'<CoordinateDefinitions> (<Transform From="{src}" To="Probe" .../>) or as image_to_probe.'
            )
        raise TransformError(f"{exc}.{hint}") from exc
    if matrices.shape[0] != sequence.n_frames:
        matrices = np.broadcast_to(matrices, (sequence.n_frames, 4, 4)).copy()
    valid = np.all(np.isfinite(matrices), axis=(1, 2))
    return matrices, valid


def load_importance_mask(path, shape=None) -> np.ndarray:
    """Read an importance mask image (PNG...) as float32 weights in [0, 1], rows top to bottom.

    Raises
    ------
    ReconstructionError
        Unreadable file, or a size other than ``shape`` ``(n_rows, n_cols)``.
    """
    import cv2  # local: only this path needs OpenCV

    image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise ReconstructionError(f"{path}: cannot read the importance mask image")
    if shape is not None and image.shape != tuple(shape):
        raise ReconstructionError(
            f"{path}: importance mask is {image.shape[1]}x{image.shape[0]} pixels, frames are {shape[1]}x{shape[0]}"
        )
    return (image.astype(np.float32) / 255.0).astype(np.float32)


_PLUS_INTERPOLATION = {"NEAREST_NEIGHBOR": "nearest", "LINEAR": "linear"}
_PLUS_COMPOUNDING = {"MEAN": "mean", "MAXIMUM": "max", "LATEST": "latest", "IMPORTANCE_MASK": "importance_mask"}


def _plus_optimization(value) -> str:
    """PLUS's ``Optimization`` attribute; an unknown value is PLUS's default FULL (with a warning)."""
    text = str(value or "FULL").upper()
    if text not in PLUS_OPTIMIZATIONS:
        log.warning("Optimization=%r is not one of PLUS's (%s): using FULL, PLUS's default", text[:40],
                    ", ".join(PLUS_OPTIMIZATIONS))
        return "FULL"
    return text


def options_from_plus_config(config, **overrides) -> ReconstructionOptions:
    """Reconstruction options from a PLUS ``<VolumeReconstruction>`` element.

    Parameters
    ----------
    config : PlusConfig or VolumeReconstructionParameters
        From :func:`FreehandUSLib.io.plus_config.read_plus_config`.
    **overrides
        Option values that replace the config's (``None`` values are ignored), e.g. from the
        command line.

    Mapping (PLUS attribute -> option): OutputSpacing -> output_spacing_mm, OutputOrigin ->
    output_origin_mm, OutputExtent -> output_extent, ClipRectangleOrigin/Size ->
    clip_rectangle_*_px, FanAnglesDeg -> fan_angles_deg, FanOriginPixel -> fan_origin_px,
    FanRadiusStart/StopPixel -> fan_radius_*_px, EnableFanAnglesAutoDetect (+ its threshold and
    filter radius) -> fan_angles_auto_detect*, Interpolation -> interpolation, CompoundingMode ->
    compounding, FillHoles + HoleFilling -> fill_holes + hole_filling, PixelRejectionThreshold,
    SkipInterval, NumberOfThreads (0 = all cores), ImageCoordinateFrame/ReferenceCoordinateFrame
    -> image_to_reference_transform.

    Raises
    ------
    ConfigError
        The config has no ``<VolumeReconstruction>`` element.
    """
    params = config.require_volume_reconstruction() if hasattr(config, "require_volume_reconstruction") else config
    elements = []
    for e in params.hole_filling:
        kw = {"type": e.type}
        for key in ("size", "stdev", "minimum_known_voxels_ratio", "stick_length_limit", "number_of_sticks_to_use"):
            value = getattr(e, key)
            if value is not None:
                kw[key] = value
        elements.append(HoleFillingElement(**kw))
    kw = {
        "output_spacing_mm": tuple(np.asarray(params.output_spacing_mm, dtype=float)),
        "output_origin_mm": None if params.output_origin_mm is None else tuple(np.asarray(params.output_origin_mm, dtype=float)),
        "output_extent": None if params.output_extent is None else tuple(params.output_extent),
        "clip_rectangle_origin_px": params.clip_rectangle_origin_px,
        "clip_rectangle_size_px": params.clip_rectangle_size_px,
        "fan_angles_deg": None if params.fan_angles_deg is None else tuple(np.asarray(params.fan_angles_deg, dtype=float)),
        "fan_origin_px": (0.0, 0.0) if params.fan_origin_px is None else tuple(np.asarray(params.fan_origin_px, dtype=float)),
        "fan_radius_start_px": params.fan_radius_start_px,
        "fan_radius_stop_px": params.fan_radius_stop_px,
        "fan_angles_auto_detect": params.enable_fan_angles_auto_detect,
        "interpolation": _PLUS_INTERPOLATION.get(params.interpolation, params.interpolation),
        "compounding": _PLUS_COMPOUNDING.get(params.compounding_mode, params.compounding_mode),
        "fill_holes": bool(params.fill_holes and elements),
        "hole_filling": tuple(elements),
        "pixel_rejection_threshold": params.pixel_rejection_threshold,
        "skip_interval": params.skip_interval,
        "number_of_threads": params.number_of_threads or None,
        "image_to_reference_transform": params.image_to_reference_name,
        "plus_optimization": _plus_optimization(params.optimization),
    }
    if params.fan_angles_auto_detect_brightness_threshold is not None:
        kw["fan_auto_detect_brightness_threshold"] = params.fan_angles_auto_detect_brightness_threshold
    if params.fan_angles_auto_detect_filter_radius_px:
        kw["fan_auto_detect_filter_radius_px"] = params.fan_angles_auto_detect_filter_radius_px
    if params.importance_mask_filename:
        kw["importance_mask_file"] = params.importance_mask_filename
        base = getattr(config, "path", None)
        if base is not None and not Path(params.importance_mask_filename).is_absolute():
            kw["importance_mask_file"] = str(Path(base).parent / params.importance_mask_filename)
    return ReconstructionOptions(**kw).replace(**overrides)
