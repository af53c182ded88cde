"""Volume reconstruction from tracked 2D ultrasound frames (PLUS/IGSIO-compatible, fast, live).

- :func:`reconstruct_volume` — a sequence in, a :class:`ReconstructionResult` out.
- :class:`IncrementalReconstructor` — frames in one at a time or in batches (live), fixed or
  growing grid, dropped/skipped frames reported.
- :class:`ReconstructionOptions` / :class:`HoleFillingElement` — every option, defaults once.
- :func:`options_from_plus_config` — PLUS ``<VolumeReconstruction>`` -> options.
- :func:`reconstruct_from_arrays` — the entry point of the Slicer Logic (numpy in, numpy out).

The hot loops are numba kernels (:mod:`.kernels`, :mod:`.holefill`), and for PLUS's
fixed-point insertion a C library when it is built (:mod:`.native`); numba is imported only
when a numba kernel runs. The geometry follows PLUS (:mod:`.geometry`, :mod:`.masks`).
"""

from .config import (
    COMPOUNDINGS,
    HOLE_FILLING_TYPES,
    INTERPOLATIONS,
    HoleFillingElement,
    ReconstructionOptions,
)
from .errors import InvalidOptionError, NoUsableFramesError, ReconstructionError, VolumeTooLargeError
from .geometry import OutputGrid, grid_from_options
from .holefill_common import HoleFillingStats
from .masks import detect_fan_angles, fan_row_ranges, pixel_mask
from .reconstructor import (
    SKIP_REASONS,
    IncrementalReconstructor,
    ReconstructionResult,
    options_from_plus_config,
    reconstruct_volume,
    resolve_image_to_reference,
)
from .slicer_support import reconstruct_from_arrays, roi_options


def __getattr__(name):
    # fill_holes lives with hole filling's numba kernels: imported on first use, so importing the
    # package (and reconstructing in PLUS's arithmetic on the C kernels) does not load numba.
    if name == "fill_holes":
        from .holefill import fill_holes

        return fill_holes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "COMPOUNDINGS",
    "HOLE_FILLING_TYPES",
    "INTERPOLATIONS",
    "HoleFillingElement",
    "ReconstructionOptions",
    "InvalidOptionError",
    "NoUsableFramesError",
    "ReconstructionError",
    "VolumeTooLargeError",
    "OutputGrid",
    "grid_from_options",
    "HoleFillingStats",
    "fill_holes",
    "detect_fan_angles",
    "fan_row_ranges",
    "pixel_mask",
    "SKIP_REASONS",
    "IncrementalReconstructor",
    "ReconstructionResult",
    "options_from_plus_config",
    "reconstruct_volume",
    "resolve_image_to_reference",
    "reconstruct_from_arrays",
    "roi_options",
]
