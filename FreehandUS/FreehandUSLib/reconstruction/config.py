"""Reconstruction options: the one place where their defaults live.

:class:`ReconstructionOptions` mirrors PLUS's ``<VolumeReconstruction>`` element (see
:func:`~FreehandUSLib.reconstruction.inputs.options_from_plus_config` for the mapping)
plus a few FreehandUS additions (memory budget, threads, output orientation, grid alignment).
All lengths are millimetres in the Reference frame; all pixel quantities are pixels of the
MF-oriented image (i = column to the right, j = row down, origin at the first pixel).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from .errors import InvalidOptionError

__all__ = [
    "INTERPOLATIONS",
    "COMPOUNDINGS",
    "HOLE_FILLING_TYPES",
    "GRID_ALIGNMENTS",
    "PLUS_OPTIMIZATIONS",
    "HoleFillingElement",
    "ReconstructionOptions",
    "DEFAULT_MEMORY_BUDGET_BYTES",
]

#: Interpolation modes: ``nearest`` (each pixel into its nearest voxel) and ``linear``
#: (trilinear splat into the 8 surrounding voxels with weights).
INTERPOLATIONS = ("nearest", "linear")
#: Compounding modes: weighted running ``mean``, ``max``, ``latest`` (last inserted pixel wins)
#: and ``importance_mask`` (mean weighted by a per-pixel importance image).
COMPOUNDINGS = ("mean", "max", "latest", "importance_mask")
#: PLUS hole-filling kernels, tried in the order given for each voxel that received no pixel.
HOLE_FILLING_TYPES = (
    "GAUSSIAN",
    "GAUSSIAN_ACCUMULATION",
    "NEAREST_NEIGHBOR",
    "DISTANCE_WEIGHT_INVERSE",
    "STICK",
)
#: ``plus``: origin at the minimum corner of the clipped frame corners, extent rounded
#: (what produced PLUS's reference volumes); ``snap``: origin snapped down to a multiple of the
#: spacing so that separate sweeps share one voxel lattice (newer IGSIO).
GRID_ALIGNMENTS = ("plus", "snap")
#: PLUS's ``Optimization`` values, and those ``emulate_plus`` reproduces.
PLUS_OPTIMIZATIONS = ("FULL", "PARTIAL", "NONE", "GPU_ACCELERATION_OPENCL")
EMULATED_PLUS_OPTIMIZATIONS = ("FULL", "NONE")

DEFAULT_MEMORY_BUDGET_BYTES = 4 * 1024**3

_INTERPOLATION_ALIASES = {
    "nearest": "nearest",
    "nearest_neighbor": "nearest",
    "nearest_neighbour": "nearest",
    "nn": "nearest",
    "linear": "linear",
    "trilinear": "linear",
}
_COMPOUNDING_ALIASES = {
    "mean": "mean",
    "average": "mean",
    "max": "max",
    "maximum": "max",
    "latest": "latest",
    "last": "latest",
    "importance_mask": "importance_mask",
    "importancemask": "importance_mask",
}


def _enum(value, aliases, name) -> str:
    key = str(value).strip().lower().replace("-", "_")
    if key not in aliases:
        choices = ", ".join(sorted(set(aliases.values())))
        raise InvalidOptionError(f"{name}: expected one of {choices}, got {value!r}")
    return aliases[key]


def _vector(value, n, name, *, cast=float, allow_none=True):
    if value is None:
        if allow_none:
            return None
        raise InvalidOptionError(f"{name}: a value is required")
    if np.isscalar(value):
        value = [value] * n if n == 3 and name.endswith("spacing_mm") else [value]
    try:
        out = tuple(cast(v) for v in np.asarray(value, dtype=float).reshape(-1))
    except (TypeError, ValueError) as exc:
        raise InvalidOptionError(f"{name}: expected {n} numbers, got {value!r}") from exc
    if len(out) != n:
        raise InvalidOptionError(f"{name}: expected {n} numbers, got {len(out)} ({value!r})")
    if not all(math.isfinite(v) for v in out):
        raise InvalidOptionError(f"{name}: values must be finite, got {out}")
    return out


@dataclass(frozen=True)
class HoleFillingElement:
    """One PLUS ``<HoleFillingElement>``.

    Attributes
    ----------
    type : str
        One of :data:`HOLE_FILLING_TYPES`.
    size : int
        Odd kernel size in voxels (GAUSSIAN, GAUSSIAN_ACCUMULATION, NEAREST_NEIGHBOR,
        DISTANCE_WEIGHT_INVERSE).
    stdev : float
        Gaussian standard deviation in voxels (GAUSSIAN, GAUSSIAN_ACCUMULATION).
    minimum_known_voxels_ratio : float
        The element fills a voxel only if more than this fraction of the ``size**3``
        neighbourhood is known.
    stick_length_limit : int
        STICK: the longest stick, in voxels, counted from end to end inclusive.
    number_of_sticks_to_use : int
        STICK: how many best sticks (ties included) are averaged.
    """

    type: str
    size: int = 3
    stdev: float = 1.0
    minimum_known_voxels_ratio: float = 0.5
    stick_length_limit: int = 9
    number_of_sticks_to_use: int = 1

    def __post_init__(self):
        kind = str(self.type).strip().upper()
        if kind not in HOLE_FILLING_TYPES:
            raise InvalidOptionError(
                f"hole filling type: expected one of {', '.join(HOLE_FILLING_TYPES)}, got {self.type!r}"
            )
        object.__setattr__(self, "type", kind)
        size = int(self.size)
        if kind != "STICK" and (size < 1 or size % 2 == 0):
            raise InvalidOptionError(f"hole filling {kind} size: expected an odd number >= 1, got {self.size}")
        object.__setattr__(self, "size", size)
        if kind in ("GAUSSIAN", "GAUSSIAN_ACCUMULATION") and not float(self.stdev) > 0:
            raise InvalidOptionError(f"hole filling {kind} stdev: expected > 0 voxels, got {self.stdev}")
        object.__setattr__(self, "stdev", float(self.stdev))
        ratio = float(self.minimum_known_voxels_ratio)
        if not 0.0 <= ratio <= 1.0:
            raise InvalidOptionError(
                f"hole filling {kind} minimum_known_voxels_ratio: expected 0..1, got {ratio}"
            )
        object.__setattr__(self, "minimum_known_voxels_ratio", ratio)
        if kind == "STICK":
            if int(self.stick_length_limit) < 3:
                raise InvalidOptionError(
                    f"hole filling STICK stick_length_limit: expected >= 3 voxels, got {self.stick_length_limit}"
                )
            if int(self.number_of_sticks_to_use) < 1:
                raise InvalidOptionError(
                    f"hole filling STICK number_of_sticks_to_use: expected >= 1, got {self.number_of_sticks_to_use}"
                )
        object.__setattr__(self, "stick_length_limit", int(self.stick_length_limit))
        object.__setattr__(self, "number_of_sticks_to_use", int(self.number_of_sticks_to_use))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class ReconstructionOptions:
    """Everything that controls a reconstruction (defaults are FreehandUS's, PLUS-compatible).

    Attributes
    ----------
    output_spacing_mm : (3,) float
        Voxel size along the output i, j, k axes, mm (> 0).
    output_origin_mm : (3,) float or None
        Position of voxel index ``(0, 0, 0)`` of ``output_extent`` in the Reference frame, mm.
        With an extent: the ROI is fixed. Without one: the grid is anchored at this point and
        grown to cover all frames. ``None``: computed from the frames (see ``grid_alignment``).
    output_extent : (6,) int or None
        PLUS ``OutputExtent`` ``(i0, i1, j0, j1, k0, k1)``, inclusive voxel index ranges.
    output_directions : (3, 3) float or None
        Orientation of the output grid: columns are the i, j, k axes in the Reference frame
        (orthonormal). ``None``: the Reference axes.
    interpolation : {"nearest", "linear"}
    compounding : {"mean", "max", "latest", "importance_mask"}
    clip_rectangle_origin_px, clip_rectangle_size_px : (2,) int or None
        PLUS clip rectangle (x, y) in pixels; the pixels ``origin .. origin + size`` (inclusive,
        as in PLUS) are kept. ``None`` or a zero size: the whole image.
    fan_angles_deg : (2,) float or None
        Fan edges, degrees from the image's +y (depth) axis, positive towards +x. ``None`` or
        ``(0, 0)``: no fan mask.
    fan_origin_px : (2,) float
        Fan apex (x, y) in pixels.
    fan_radius_start_px, fan_radius_stop_px : float
        Pixels closer than start or farther than stop from the apex are dropped.
    fan_angles_auto_detect : bool
        Detect the fan angles of every frame from its brightness (within ``fan_angles_deg``);
        frames with no bright sector are skipped as empty.
    fan_auto_detect_brightness_threshold : float
    fan_auto_detect_filter_radius_px : int
    pixel_rejection_threshold : float or None
        Pixels whose channel mean is below this value are not inserted. ``None``: off.
    fill_holes : bool
    hole_filling : tuple of HoleFillingElement
        Tried in order for each voxel that received no pixel.
    skip_interval : int
        Use every n-th frame (PLUS ``SkipInterval``).
    image_to_reference_transform : str
        Name of the transform that maps Image pixels into the output's Reference frame.
    importance_mask_file : str or None
        Image (PNG, ...) of per-pixel weights for ``importance_mask`` compounding (0..255).
    grid_alignment : {"plus", "snap"}
        Automatic grid: ``plus`` reproduces PLUS's reference volumes exactly; ``snap`` puts the
        origin on a multiple of the spacing.
    memory_budget_bytes : int
        Refuse grids whose buffers would need more than this (default 4 GiB).
    number_of_threads : int or None
        Worker threads for insertion and hole filling; ``None``: all cores. Results do not
        depend on it.
    output_weight : bool
        Also return the accumulated weight (coverage) volume.
    emulate_plus : bool
        Reproduce PLUS's (IGSIO's) arithmetic instead of exact arithmetic, to get the volume
        PLUS makes from the same input and settings, voxel for voxel: pixel positions and
        trilinear weights in PLUS's 14-bit fixed point (or float64 with ``plus_optimization``
        ``NONE``), a linear pixel dropped unless all its corners are inside, ``mean`` as PLUS's
        running mean rounded at every insertion with a 16-bit accumulation buffer that
        saturates after 255 contributions, PLUS's hole-filling kernels and order, filled values
        truncated. Off by default: the exact mean is the more accurate (PLUS's nearest mean is
        biased low by the truncation at each insertion). Importance-mask compounding is not
        emulated exactly.
    plus_optimization : {"FULL", "NONE"}
        Which of PLUS's insertion code paths ``emulate_plus`` reproduces (PLUS's
        ``Optimization``): ``FULL`` (PLUS's default: 14-bit fixed point, fan mask from row
        bounds), ``NONE`` (double precision, fan mask tested pixel by pixel, nearest-neighbour
        max/latest count 256 per hit). Ignored without ``emulate_plus``; PLUS's ``PARTIAL`` and
        OpenCL paths are not emulated.
    engine : {"auto", "numba", "torch"}
        Pixel-insertion engine: ``numba`` (compiled CPU kernels), ``torch`` (scatter kernels on
        torch's device: the GPU when there is one), ``auto`` (torch on a CUDA GPU, else numba).
        Results agree within float rounding; ``emulate_plus`` always uses numba.
    """

    output_spacing_mm: tuple = (0.5, 0.5, 0.5)
    output_origin_mm: tuple | None = None
    output_extent: tuple | None = None
    output_directions: tuple | None = None
    interpolation: str = "nearest"
    compounding: str = "mean"
    clip_rectangle_origin_px: tuple | None = None
    clip_rectangle_size_px: tuple | None = None
    fan_angles_deg: tuple | None = None
    fan_origin_px: tuple = (0.0, 0.0)
    fan_radius_start_px: float = 0.0
    fan_radius_stop_px: float = 500.0
    fan_angles_auto_detect: bool = False
    fan_auto_detect_brightness_threshold: float = 30.0
    fan_auto_detect_filter_radius_px: int = 10
    pixel_rejection_threshold: float | None = None
    fill_holes: bool = False
    hole_filling: tuple = field(default_factory=tuple)
    skip_interval: int = 1
    image_to_reference_transform: str = "ImageToReference"
    importance_mask_file: str | None = None
    grid_alignment: str = "plus"
    memory_budget_bytes: int = DEFAULT_MEMORY_BUDGET_BYTES
    number_of_threads: int | None = None
    output_weight: bool = True
    emulate_plus: bool = False
    plus_optimization: str = "FULL"
    engine: str = "auto"

    def __post_init__(self):
        setv = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731  (frozen dataclass)
        spacing = _vector(self.output_spacing_mm, 3, "output_spacing_mm", allow_none=False)
        if min(spacing) <= 0:
            raise InvalidOptionError(f"output_spacing_mm: every value must be > 0 mm, got {spacing}")
        setv("output_spacing_mm", spacing)
        setv("output_origin_mm", _vector(self.output_origin_mm, 3, "output_origin_mm"))
        extent = _vector(self.output_extent, 6, "output_extent", cast=lambda v: int(round(v)))
        if extent is not None:
            for a in range(3):
                if extent[2 * a + 1] < extent[2 * a]:
                    raise InvalidOptionError(
                        f"output_extent: axis {'ijk'[a]} has max {extent[2 * a + 1]} < min {extent[2 * a]} "
                        f"(expected (i0, i1, j0, j1, k0, k1) with i0 <= i1 ...), got {extent}"
                    )
        setv("output_extent", extent)
        if self.output_directions is not None:
            d = np.asarray(self.output_directions, dtype=float)
            if d.shape != (3, 3) or not np.all(np.isfinite(d)):
                raise InvalidOptionError(f"output_directions: expected a finite 3x3 matrix, got {d.tolist()}")
            if not np.allclose(d.T @ d, np.eye(3), atol=1e-6):
                raise InvalidOptionError(
                    f"output_directions: columns must be orthonormal axes, got {np.round(d, 6).tolist()}"
                )
            setv("output_directions", tuple(tuple(float(x) for x in row) for row in d))
        engine = str(self.engine).lower()
        if engine not in ("auto", "numba", "torch"):
            raise InvalidOptionError(f"engine: expected auto, numba or torch, got {self.engine!r}")
        setv("engine", engine)
        setv("interpolation", _enum(self.interpolation, _INTERPOLATION_ALIASES, "interpolation"))
        setv("compounding", _enum(self.compounding, _COMPOUNDING_ALIASES, "compounding"))
        clip_o = _vector(self.clip_rectangle_origin_px, 2, "clip_rectangle_origin_px", cast=lambda v: int(round(v)))
        clip_s = _vector(self.clip_rectangle_size_px, 2, "clip_rectangle_size_px", cast=lambda v: int(round(v)))
        if clip_s is not None and min(clip_s) < 0:
            raise InvalidOptionError(f"clip_rectangle_size_px: expected sizes >= 0 pixels, got {clip_s}")
        setv("clip_rectangle_origin_px", clip_o)
        setv("clip_rectangle_size_px", clip_s)
        fan = _vector(self.fan_angles_deg, 2, "fan_angles_deg")
        if fan is not None and not all(-90.0 < a < 90.0 for a in fan):
            raise InvalidOptionError(f"fan_angles_deg: expected angles in (-90, 90) degrees, got {fan}")
        setv("fan_angles_deg", fan)
        setv("fan_origin_px", _vector(self.fan_origin_px, 2, "fan_origin_px", allow_none=False))
        r0, r1 = float(self.fan_radius_start_px), float(self.fan_radius_stop_px)
        if not (r0 >= 0 and r1 > r0):
            raise InvalidOptionError(
                f"fan_radius_start_px/fan_radius_stop_px: expected 0 <= start < stop, got {r0}, {r1}"
            )
        setv("fan_radius_start_px", r0)
        setv("fan_radius_stop_px", r1)
        setv("fan_angles_auto_detect", bool(self.fan_angles_auto_detect))
        if self.fan_angles_auto_detect and fan is None:
            raise InvalidOptionError(
                "fan_angles_auto_detect: needs fan_angles_deg (the widest fan to search in), got None"
            )
        setv("fan_auto_detect_brightness_threshold", float(self.fan_auto_detect_brightness_threshold))
        if int(self.fan_auto_detect_filter_radius_px) < 1:
            raise InvalidOptionError(
                f"fan_auto_detect_filter_radius_px: expected >= 1, got {self.fan_auto_detect_filter_radius_px}"
            )
        setv("fan_auto_detect_filter_radius_px", int(self.fan_auto_detect_filter_radius_px))
        if self.pixel_rejection_threshold is not None:
            setv("pixel_rejection_threshold", float(self.pixel_rejection_threshold))
        setv("fill_holes", bool(self.fill_holes))
        elements = []
        for e in self.hole_filling or ():
            if isinstance(e, HoleFillingElement):
                elements.append(e)
            elif isinstance(e, dict):
                elements.append(HoleFillingElement(**e))
            else:
                raise InvalidOptionError(f"hole_filling: expected HoleFillingElement or dict items, got {e!r}")
        setv("hole_filling", tuple(elements))
        if self.fill_holes and not elements:
            raise InvalidOptionError("fill_holes: needs at least one hole_filling element, got none")
        if int(self.skip_interval) < 1:
            raise InvalidOptionError(f"skip_interval: expected >= 1, got {self.skip_interval}")
        setv("skip_interval", int(self.skip_interval))
        if not isinstance(self.image_to_reference_transform, str) or "To" not in self.image_to_reference_transform:
            raise InvalidOptionError(
                "image_to_reference_transform: expected a name like 'ImageToReference', "
                f"got {self.image_to_reference_transform!r}"
            )
        if self.importance_mask_file is not None:
            setv("importance_mask_file", str(self.importance_mask_file))
        alignment = str(self.grid_alignment).lower()
        if alignment not in GRID_ALIGNMENTS:
            raise InvalidOptionError(
                f"grid_alignment: expected one of {', '.join(GRID_ALIGNMENTS)}, got {self.grid_alignment!r}"
            )
        setv("grid_alignment", alignment)
        if not int(self.memory_budget_bytes) > 0:
            raise InvalidOptionError(f"memory_budget_bytes: expected > 0, got {self.memory_budget_bytes}")
        setv("memory_budget_bytes", int(self.memory_budget_bytes))
        if self.number_of_threads is not None:
            if int(self.number_of_threads) < 1:
                raise InvalidOptionError(f"number_of_threads: expected >= 1 or None, got {self.number_of_threads}")
            setv("number_of_threads", int(self.number_of_threads))
        setv("output_weight", bool(self.output_weight))
        setv("emulate_plus", bool(self.emulate_plus))
        optimization = str(self.plus_optimization).upper()
        if optimization not in PLUS_OPTIMIZATIONS:
            raise InvalidOptionError(
                f"plus_optimization: expected one of {', '.join(PLUS_OPTIMIZATIONS)}, got {self.plus_optimization!r}"
            )
        if self.emulate_plus and optimization not in EMULATED_PLUS_OPTIMIZATIONS:
            raise InvalidOptionError(
                f"PLUS's Optimization=\"{optimization}\" is not emulated: use --emulate-plus with a config whose "
                "Optimization is FULL (PLUS's default) or NONE"
            )
        setv("plus_optimization", optimization)

    # -- helpers -----------------------------------------------------------------------------
    @property
    def fan_enabled(self) -> bool:
        """Whether a fan mask applies (angles given and not both zero, as in PLUS)."""
        return self.fan_angles_deg is not None and any(a != 0.0 for a in self.fan_angles_deg)

    @property
    def directions(self) -> np.ndarray:
        """Output axes as a (3, 3) array (columns i, j, k)."""
        if self.output_directions is None:
            return np.eye(3)
        return np.asarray(self.output_directions, dtype=float)

    def replace(self, **changes) -> ReconstructionOptions:
        """A copy with ``changes`` applied; ``None`` values are ignored (command-line overrides)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise InvalidOptionError(f"unknown reconstruction option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-safe dictionary of all options."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "hole_filling":
                value = [e.to_dict() for e in value]
            elif isinstance(value, tuple):
                value = [list(v) if isinstance(v, tuple) else v for v in value]
            out[f.name] = value
        return out
