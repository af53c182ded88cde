"""The model input size that fits a probe's image ("fit" for ``--image-size`` / ``image_size``).

Every model pools its image features adaptively, so a checkpoint's weights work at any input
size, and a fine-tuning can look at more of the probe's image than the shipped model's 96 x 96
pixels of 0.3 mm (28.8 mm square). On the one-probe benchmark (a 40 x 38 mm image) fine-tuning
at 128 x 112 pixels drifted less than at 96 x 96 on validation sweeps: most of the remaining
drift is out-of-plane rotation, and a wider image is a longer lever for it.

:func:`fitting_image_size` turns the field of view of the recordings (mm, from the frame size in
pixels and the pixel spacing of their ImageToReference) into the largest input, in multiples of
16 pixels of the model's spacing, that every recording fills; capped at :data:`MAX_FIT_SIDE`
pixels per side, since training and inference time grow with the pixel count. The field of view
is the frame's bounding box: a convex probe's black corners count as image.
"""

from __future__ import annotations

import logging
import math

import numpy as np

from FreehandUSLib.errors import SequenceError

from .data import image_to_reference_of, pixel_spacing_of

__all__ = ["MAX_FIT_SIDE", "field_of_view_mm", "sequence_field_of_view_mm", "fitting_image_size"]

log = logging.getLogger(__name__)

#: Largest fitted input side, pixels of the model spacing (48 mm at 0.3 mm). 128 x 112 (1.6 times
#: the pixels of 96 x 96) trained about 1.6 times slower on a CPU; 160 x 160 has 2.8 times the pixels.
MAX_FIT_SIDE = 160


def field_of_view_mm(frame_shape, spacing_xy_mm) -> tuple[float, float]:
    """(depth, width) in mm of frames of ``frame_shape`` (rows, cols) with pixel spacing (sx, sy) mm."""
    rows, cols = int(frame_shape[0]), int(frame_shape[1])
    sx, sy = float(spacing_xy_mm[0]), float(spacing_xy_mm[1])
    return rows * sy, cols * sx


def sequence_field_of_view_mm(sequence, *, image_to_probe=None, valid=None) -> tuple[float, float]:
    """(depth, width) in mm of a tracked sequence's frames; spacing from its ImageToReference.

    ``valid`` (n,) bool, optional, limits the frames whose pose gives the spacing.
    Raises TransformError when no frame has a valid ImageToReference.
    """
    mats, ok = image_to_reference_of(sequence, image_to_probe=image_to_probe)
    if valid is not None:
        ok = ok & np.asarray(valid, dtype=bool)
    return field_of_view_mm(sequence.frames.shape[1:3], pixel_spacing_of(mats, ok))


def fitting_image_size(fields_mm, spacing_mm: float, *, max_side: int = MAX_FIT_SIDE,
                       names=None) -> tuple[int, int]:
    """The largest (rows, cols), multiples of 16 and at most ``max_side``, inside every field of view.

    Parameters
    ----------
    fields_mm : iterable of (depth, width) in mm, one per recording
    spacing_mm : the model's pixel spacing, mm
    names : recording names, for the error message

    Raises
    ------
    SequenceError
        No recording, or one narrower or shallower than 16 model pixels.
    """
    fields = [(float(d), float(w)) for d, w in fields_mm]
    if not fields:
        raise SequenceError("fitting the model input to the recordings: no recording given")
    depth, width = min(d for d, _ in fields), min(w for _, w in fields)
    rows, cols = (min(int(max_side), 16 * math.floor(v / spacing_mm / 16 + 1e-9)) for v in (depth, width))
    if rows < 16 or cols < 16:
        names = list(names) if names is not None else [f"recording {k + 1}" for k in range(len(fields))]
        k = int(np.argmin([min(d, w) for d, w in fields]))
        raise SequenceError(
            f"fitting the model input to the recordings: {names[k]} is {fields[k][0]:.1f} x {fields[k][1]:.1f} mm, "
            f"less than 16 pixels of {spacing_mm} mm ({16 * spacing_mm:.1f} mm) on a side; check its pixel spacing "
            "or give the input size in pixels"
        )
    log.info("model input fitted to the recordings: %d x %d pixels of %g mm (%.1f x %.1f mm; smallest recording "
             "%.1f x %.1f mm)", rows, cols, spacing_mm, rows * spacing_mm, cols * spacing_mm, depth, width)
    return rows, cols
