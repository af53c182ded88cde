"""The PLUS device-set configuration model: what :func:`~.plus_config.read_plus_config` returns.

Frozen dataclasses for the parts of a ``PlusDeviceSet_*.xml`` file that FreehandUS uses: the fixed
transforms (:class:`CoordinateDefinitions`), the calibration phantom (:class:`PhantomDefinition`
with its :class:`NWire` patterns of :class:`Wire`), N-wire segmentation
(:class:`SegmentationParameters`), volume reconstruction (:class:`VolumeReconstructionParameters`
with its :class:`HoleFillingElement` passes) and the whole file (:class:`PlusConfig`). Each field's
docstring names the attribute it comes from; defaults are PLUS's and IGSIO's. The XML side (reading,
and :func:`~.plus_config.transform_element`) is :mod:`.plus_config_xml`; :mod:`.plus_config`
describes the file and gathers both.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError, TransformError
from ..transforms import split_transform_name, transform_name

__all__ = [
    "CoordinateDefinitions",
    "Wire",
    "NWire",
    "PhantomDefinition",
    "NWirePhantom",
    "SegmentationParameters",
    "HoleFillingElement",
    "VolumeReconstructionParameters",
    "PlusConfig",
    "INTERPOLATION_MODES",
    "COMPOUNDING_MODES",
    "HOLE_FILLING_TYPES",
]

INTERPOLATION_MODES = ("LINEAR", "NEAREST_NEIGHBOR")
"""Values of ``VolumeReconstruction/@Interpolation`` (IGSIO)."""

COMPOUNDING_MODES = ("MEAN", "MAXIMUM", "LATEST", "IMPORTANCE_MASK")
"""Values of ``VolumeReconstruction/@CompoundingMode`` (IGSIO)."""

HOLE_FILLING_TYPES = (
    "GAUSSIAN",
    "GAUSSIAN_ACCUMULATION",
    "DISTANCE_WEIGHT_INVERSE",
    "NEAREST_NEIGHBOR",
    "STICK",
)
"""Values of ``HoleFillingElement/@Type`` (IGSIO ``vtkIGSIOFillHolesInVolume``)."""


# --------------------------------------------------------------------------------------------
# JSON / printing helpers
# --------------------------------------------------------------------------------------------


def _jsonable(value):
    """Turn numpy arrays/scalars, tuples, dicts and dataclass-like objects into JSON types."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "to_dict"):
        return value.to_dict()
    return value


def _fmt_vec(values) -> str:
    return " ".join(_fmt_number(v) for v in np.asarray(values).ravel())


def _fmt_number(x) -> str:
    """Shortest text that reads back to the same float64 (``1.0`` -> ``"1"``, ``-0.0`` -> ``"0"``)."""
    x = float(x)
    if x == 0.0:
        return "0"
    if x.is_integer() and abs(x) < 1e16:
        return str(int(x))
    return repr(x)


# --------------------------------------------------------------------------------------------
# CoordinateDefinitions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class CoordinateDefinitions:
    """The fixed transforms of ``<CoordinateDefinitions>``.

    Attributes
    ----------
    transforms : dict name -> (4, 4) float64
        ``"<From>To<To>"`` (``"ImageToProbe"``) -> the ``Matrix`` attribute (16 numbers, row
        major), mapping coordinates in ``From`` to ``To`` (mm; ImageToProbe maps pixels to mm).
        Every matrix is finite, has last row ``0 0 0 1`` and is invertible.
    errors : dict name -> float
        The ``Error`` attribute (mm, the calibration/registration error PLUS stored), where given.
    dates : dict name -> str
        The ``Date`` attribute as written (PLUS uses several formats), where given.
    """

    transforms: dict[str, np.ndarray] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    dates: dict[str, str] = field(default_factory=dict)

    def repository_fixed(self) -> dict[str, np.ndarray]:
        """The transforms as the ``fixed=`` mapping of a
        :class:`~FreehandUSLib.transforms.TransformRepository` (writable copies)."""
        return {name: np.array(m, dtype=np.float64) for name, m in self.transforms.items()}

    def get(self, name: str) -> np.ndarray | None:
        """The 4x4 stored as ``name`` or, inverted, as its inverse; None when neither is stored."""
        base = name[: -len("Transform")] if name.endswith("Transform") else name
        if base in self.transforms:
            return np.array(self.transforms[base])
        src, dst = split_transform_name(base)
        inverse = transform_name(dst, src)
        if inverse in self.transforms:
            return np.linalg.inv(self.transforms[inverse])
        return None

    def to_dict(self) -> dict:
        return {
            "transforms": _jsonable(self.transforms),
            "errors": dict(self.errors),
            "dates": dict(self.dates),
        }

    def __str__(self) -> str:
        if not self.transforms:
            return "no coordinate definitions"
        parts = []
        for name in self.transforms:
            err = self.errors.get(name)
            parts.append(f"{name}" + (f" (error {err:.3g} mm)" if err is not None else ""))
        return "transforms: " + ", ".join(parts)


# --------------------------------------------------------------------------------------------
# PhantomDefinition
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Wire:
    """One straight wire of a phantom, in the Phantom frame.

    Attributes
    ----------
    name : str
        ``Wire/@Name`` (fCal names such as ``"7:G1_g1"``; empty if absent).
    end_point_front_mm, end_point_back_mm : (3,) float64, mm, Phantom frame
        ``Wire/@EndPointFront`` and ``Wire/@EndPointBack``.
    id : int or None
        ``Wire/@Id`` (PLUS 1.x and CIRS definitions), where given.
    """

    name: str
    end_point_front_mm: np.ndarray
    end_point_back_mm: np.ndarray
    id: int | None = None

    @property
    def direction(self) -> np.ndarray:
        """(3,) unit vector from the front to the back end point."""
        d = self.end_point_back_mm - self.end_point_front_mm
        return d / np.linalg.norm(d)

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "id": self.id,
            "end_point_front_mm": self.end_point_front_mm.tolist(),
            "end_point_back_mm": self.end_point_back_mm.tolist(),
        }

    def __str__(self) -> str:
        front, back = _fmt_vec(self.end_point_front_mm), _fmt_vec(self.end_point_back_mm)
        return f"wire {self.name!r}: {front} -> {back} mm"


@dataclass(frozen=True, eq=False)
class NWire:
    """One wire pattern of the phantom's ``<Geometry>``: an N (Z) of three wires, or another type.

    Attributes
    ----------
    wires : list of Wire
        In file order; for an N-wire the middle one is the diagonal.
    type : str
        ``Pattern/@Type`` (``"NWire"``, ``"CoplanarParallelWires"``); ``"NWire"`` for the
        PLUS 1.x ``<NWire>`` element.
    id : str or None
        ``Pattern/@Id``, where given.
    """

    wires: list[Wire]
    type: str = "NWire"
    id: str | None = None

    @property
    def front_mm(self) -> np.ndarray:
        """(n_wires, 3) float64 front end points, mm, Phantom frame."""
        return np.stack([w.end_point_front_mm for w in self.wires])

    @property
    def back_mm(self) -> np.ndarray:
        """(n_wires, 3) float64 back end points, mm, Phantom frame."""
        return np.stack([w.end_point_back_mm for w in self.wires])

    def to_dict(self) -> dict:
        return {"type": self.type, "id": self.id, "wires": [w.to_dict() for w in self.wires]}

    def __str__(self) -> str:
        return f"{self.type} ({', '.join(w.name or '?' for w in self.wires)})"


@dataclass(frozen=True, eq=False)
class PhantomDefinition:
    """A calibration phantom (``<PhantomDefinition>``): description, model and wire geometry.

    Attributes
    ----------
    name, type, version, wiring_version, institution : str or None
        ``Description/@Name``, ``@Type`` (``"Multi-N"``, ``"Double-N"``, ``"Triple-N"``,
        ``"CIRS"``...), ``@Version``, ``@WiringVersion``, ``@Institution``.
    model_file : str or None
        ``Model/@File`` (PLUS 1.x definitions; newer configs put the model in ``<Rendering>``).
    model_to_phantom : (4, 4) float64 or None
        ``Model/@ModelToPhantomTransform``.
    nwires : list of NWire
        The patterns of type ``NWire``, in file order (three wires each).
    other_patterns : list of NWire
        Patterns of other types (``CoplanarParallelWires`` of the CIRS 045 phantom).
    landmarks : dict name -> (3,) float64, mm, Phantom frame
        ``Geometry/Landmarks/Landmark`` (``@Name``, ``@Position``), in file order.
    planes : dict name -> (3, 3) float64, mm, Phantom frame
        ``Geometry/Planes/Plane``: rows ``@BasePoint``, ``@EndPoint1``, ``@EndPoint2``.
    geometry_layout : str
        ``"Pattern"`` (PLUS 1.4 and later) or ``"NWire"`` (PLUS 1.x ``<NWire>`` elements).
    """

    nwires: list[NWire]
    name: str | None = None
    type: str | None = None
    version: str | None = None
    wiring_version: str | None = None
    institution: str | None = None
    model_file: str | None = None
    model_to_phantom: np.ndarray | None = None
    other_patterns: list[NWire] = field(default_factory=list)
    landmarks: dict[str, np.ndarray] = field(default_factory=dict)
    planes: dict[str, np.ndarray] = field(default_factory=dict)
    geometry_layout: str = "Pattern"

    @property
    def wires(self) -> list[Wire]:
        """All wires of all N-wires, in order (``n_nwires * 3``)."""
        return [w for nw in self.nwires for w in nw.wires]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "type": self.type,
            "version": self.version,
            "wiring_version": self.wiring_version,
            "institution": self.institution,
            "model_file": self.model_file,
            "model_to_phantom": _jsonable(self.model_to_phantom),
            "geometry_layout": self.geometry_layout,
            "nwires": [nw.to_dict() for nw in self.nwires],
            "other_patterns": [p.to_dict() for p in self.other_patterns],
            "landmarks": _jsonable(self.landmarks),
            "planes": _jsonable(self.planes),
        }

    def __str__(self) -> str:
        title = " ".join(p for p in (self.name, self.version) if p) or "unnamed phantom"
        if self.type:
            title += f" ({self.type})"
        lines = [f"phantom {title}: {len(self.nwires)} N-wire(s), {len(self.landmarks)} landmark(s)"]
        for i, nw in enumerate(self.nwires):
            lines.append(
                f"  N-wire {i + 1}: "
                + "; ".join(
                    f"{w.name or '?'} {_fmt_vec(w.end_point_front_mm)} -> {_fmt_vec(w.end_point_back_mm)}"
                    for w in nw.wires
                )
            )
        for p in self.other_patterns:
            lines.append(f"  {p}")
        return "\n".join(lines)


NWirePhantom = PhantomDefinition
"""Alias: the N-wire calibration phantom is a :class:`PhantomDefinition`."""


# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class SegmentationParameters:
    """Parameters of PLUS's N-wire dot segmentation (``<Segmentation>``).

    ``SegmentationParameters()`` holds PLUS's defaults (``PlusFidSegmentation::DEFAULT_*``);
    an attribute absent from the file takes its default.

    Attributes
    ----------
    approximate_spacing_mm_per_px : float
        ``ApproximateSpacingMmPerPixel`` (0.078).
    morphological_opening_circle_radius_mm : float
        ``MorphologicalOpeningCircleRadiusMm`` (0.27).
    morphological_opening_bar_size_mm : float
        ``MorphologicalOpeningBarSizeMm`` (2.0).
    clip_rectangle_origin_px, clip_rectangle_size_px : (x, y) int or None
        ``ClipRectangleOrigin`` / ``ClipRectangleSize`` in pixels of the MF image. None: the
        whole image (PLUS: "largest ROI possible"). PLUS 1.x ``RegionOfInterest="x0 y0 x1 y1"``
        is converted.
    max_line_pair_distance_error_percent : float
        ``MaxLinePairDistanceErrorPercent`` (10).
    angle_tolerance_deg : float
        ``AngleToleranceDegrees`` (10).
    max_angle_difference_deg : float
        ``MaxAngleDifferenceDegrees`` (10).
    min_theta_deg, max_theta_deg : float
        ``MinThetaDegrees`` (-70), ``MaxThetaDegrees`` (70).
    max_line_shift_mm : float
        ``MaxLineShiftMm`` (10).
    threshold_image_percent : float
        ``ThresholdImagePercent`` (10).
    collinear_points_max_distance_from_line_mm : float
        ``CollinearPointsMaxDistanceFromLineMm`` (0.6).
    use_original_image_intensity_for_dot_intensity_score : bool
        ``UseOriginalImageIntensityForDotIntensityScore`` (FALSE).
    number_of_maximum_fiducial_point_candidates : int
        ``NumberOfMaximumFiducialPointCandidates`` (20).
    extra : dict str -> str
        Other attributes, as written (e.g. ``ComputeSegmentationParametersFromPhantomDefinition``).
    """

    approximate_spacing_mm_per_px: float = 0.078
    morphological_opening_circle_radius_mm: float = 0.27
    morphological_opening_bar_size_mm: float = 2.0
    clip_rectangle_origin_px: tuple[int, int] | None = None
    clip_rectangle_size_px: tuple[int, int] | None = None
    max_line_pair_distance_error_percent: float = 10.0
    angle_tolerance_deg: float = 10.0
    max_angle_difference_deg: float = 10.0
    min_theta_deg: float = -70.0
    max_theta_deg: float = 70.0
    max_line_shift_mm: float = 10.0
    threshold_image_percent: float = 10.0
    collinear_points_max_distance_from_line_mm: float = 0.6
    use_original_image_intensity_for_dot_intensity_score: bool = False
    number_of_maximum_fiducial_point_candidates: int = 20
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}

    def __str__(self) -> str:
        clip = "whole image"
        if self.clip_rectangle_origin_px is not None and self.clip_rectangle_size_px is not None:
            (x, y), (w, h) = self.clip_rectangle_origin_px, self.clip_rectangle_size_px
            clip = f"clip ({x}, {y}) {w}x{h} px"
        return (
            f"segmentation: {self.approximate_spacing_mm_per_px:g} mm/px, {clip}, "
            f"opening circle {self.morphological_opening_circle_radius_mm:g} mm / bar "
            f"{self.morphological_opening_bar_size_mm:g} mm, threshold {self.threshold_image_percent:g} %, "
            f"theta [{self.min_theta_deg:g}, {self.max_theta_deg:g}] deg, "
            f"collinear {self.collinear_points_max_distance_from_line_mm:g} mm, "
            f"max {self.number_of_maximum_fiducial_point_candidates} candidates"
        )



# --------------------------------------------------------------------------------------------
# VolumeReconstruction
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HoleFillingElement:
    """One ``<HoleFilling>/<HoleFillingElement>`` (a hole-filling pass of IGSIO).

    Attributes
    ----------
    type : str
        ``Type``: GAUSSIAN, GAUSSIAN_ACCUMULATION, DISTANCE_WEIGHT_INVERSE, NEAREST_NEIGHBOR, STICK.
    size : int or None
        ``Size``, kernel width in voxels (required for all types but STICK).
    stdev : float or None
        ``Stdev``, Gaussian sigma in voxels (required for GAUSSIAN*).
    minimum_known_voxels_ratio : float or None
        ``MinimumKnownVoxelsRatio`` in [0, 1] (required for all types but STICK).
    stick_length_limit : int or None
        ``StickLengthLimit`` in voxels (required for STICK).
    number_of_sticks_to_use : int or None
        ``NumberOfSticksToUse`` (required for STICK).
    extra : dict str -> str
        Other attributes, as written.
    """

    type: str
    size: int | None = None
    stdev: float | None = None
    minimum_known_voxels_ratio: float | None = None
    stick_length_limit: int | None = None
    number_of_sticks_to_use: int | None = None
    extra: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}

    def __str__(self) -> str:
        if self.type == "STICK":
            return f"STICK (length limit {self.stick_length_limit}, {self.number_of_sticks_to_use} sticks)"
        text = f"{self.type} (size {self.size}"
        if self.stdev is not None:
            text += f", stdev {self.stdev:g}"
        return text + f", min known ratio {self.minimum_known_voxels_ratio:g})"



@dataclass(frozen=True, eq=False)
class VolumeReconstructionParameters:
    """Parameters of PLUS/IGSIO volume reconstruction (``<VolumeReconstruction>``).

    Defaults of absent attributes are IGSIO's. Pixel quantities refer to the MF image.

    Attributes
    ----------
    output_spacing_mm : (3,) float64
        ``OutputSpacing`` (required): voxel size along x, y, z of the Reference frame, mm.
    output_origin_mm : (3,) float64 or None
        ``OutputOrigin``: position of voxel (0, 0, 0) in the Reference frame, mm. None: from the
        frames' extent.
    output_extent : (6,) int or None
        ``OutputExtent``: ``i_min i_max j_min j_max k_min k_max`` voxel indices. None: from the
        frames' extent.
    clip_rectangle_origin_px, clip_rectangle_size_px : (2,) int or None
        ``ClipRectangleOrigin`` / ``ClipRectangleSize`` (x, y) pixels. None (or a zero size):
        the whole frame is used.
    fan_angles_deg : (2,) float64 or None
        ``FanAnglesDeg`` (deprecated ``FanAngles``): fan clipping angles, degrees; None or
        ``0 0``: no fan clipping.
    fan_origin_px : (2,) float64 or None
        ``FanOriginPixel`` (deprecated ``FanOrigin``): fan apex (x, y), pixels.
    fan_radius_start_px : float
        ``FanRadiusStartPixel`` (0).
    fan_radius_stop_px : float
        ``FanRadiusStopPixel`` (deprecated ``FanDepth``; 500).
    enable_fan_angles_auto_detect : bool
        ``EnableFanAnglesAutoDetect`` (FALSE).
    fan_angles_auto_detect_brightness_threshold : float or None
        ``FanAnglesAutoDetectBrightnessThreshold``.
    fan_angles_auto_detect_filter_radius_px : int or None
        ``FanAnglesAutoDetectFilterRadiusPixel``.
    interpolation : str
        ``Interpolation``: ``LINEAR`` or ``NEAREST_NEIGHBOR`` (IGSIO default NEAREST_NEIGHBOR).
    compounding_mode : str
        ``CompoundingMode``: MEAN, MAXIMUM, LATEST, IMPORTANCE_MASK. When absent, derived as
        IGSIO does: ``Calculation="MAXIMUM"`` -> MAXIMUM, ``Compounding="Off"`` -> LATEST,
        otherwise MEAN.
    optimization : str
        ``Optimization`` as written, upper case (FULL, PARTIAL, NONE, GPU_ACCELERATION_OPENCL;
        default FULL). Informational: FreehandUS has its own implementation.
    calculation : str or None
        Deprecated ``Calculation`` (WEIGHTED_AVERAGE, MAXIMUM), upper case.
    compounding : bool or None
        Deprecated ``Compounding`` (On/Off).
    fill_holes : bool
        ``FillHoles`` (ON/OFF; default OFF).
    hole_filling : list of HoleFillingElement
        ``HoleFilling/HoleFillingElement``, applied in order (required when ``fill_holes``).
    number_of_threads : int
        ``NumberOfThreads``; 0 (default) lets the implementation choose.
    pixel_rejection_threshold : float or None
        ``PixelRejectionThreshold``: pixels darker than this are not pasted; None: disabled.
    skip_interval : int
        ``SkipInterval`` (1): use every n-th frame.
    recompute_output_spacing : bool
        ``RecomputeOutputSpacing`` (FALSE).
    importance_mask_filename : str or None
        ``ImportanceMaskFilename`` (required for IMPORTANCE_MASK compounding).
    reference_coordinate_frame, image_coordinate_frame : str
        ``ReferenceCoordinateFrame`` / ``ImageCoordinateFrame`` (default Reference / Image; PLUS's
        VolumeReconstructor tool takes ``--image-to-reference-transform`` instead when they
        are absent).
    extra : dict str -> str
        Other attributes, as written.
    """

    output_spacing_mm: np.ndarray
    output_origin_mm: np.ndarray | None = None
    output_extent: tuple[int, ...] | None = None
    clip_rectangle_origin_px: tuple[int, int] | None = None
    clip_rectangle_size_px: tuple[int, int] | None = None
    fan_angles_deg: np.ndarray | None = None
    fan_origin_px: np.ndarray | None = None
    fan_radius_start_px: float = 0.0
    fan_radius_stop_px: float = 500.0
    enable_fan_angles_auto_detect: bool = False
    fan_angles_auto_detect_brightness_threshold: float | None = None
    fan_angles_auto_detect_filter_radius_px: int | None = None
    interpolation: str = "NEAREST_NEIGHBOR"
    compounding_mode: str = "MEAN"
    optimization: str = "FULL"
    calculation: str | None = None
    compounding: bool | None = None
    fill_holes: bool = False
    hole_filling: list[HoleFillingElement] = field(default_factory=list)
    number_of_threads: int = 0
    pixel_rejection_threshold: float | None = None
    skip_interval: int = 1
    recompute_output_spacing: bool = False
    importance_mask_filename: str | None = None
    reference_coordinate_frame: str = "Reference"
    image_coordinate_frame: str = "Image"
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def image_to_reference_name(self) -> str:
        """``"<ImageCoordinateFrame>To<ReferenceCoordinateFrame>"``, e.g. ``"ImageToReference"``."""
        return transform_name(self.image_coordinate_frame, self.reference_coordinate_frame)

    @property
    def fan_clipping(self) -> bool:
        """Whether fan clipping applies (non-zero fan angles, as IGSIO decides)."""
        return self.fan_angles_deg is not None and bool(np.any(self.fan_angles_deg != 0))

    def to_dict(self) -> dict:
        return {k: _jsonable(getattr(self, k)) for k in self.__dataclass_fields__}

    def __str__(self) -> str:
        parts = [
            f"volume reconstruction: spacing {_fmt_vec(self.output_spacing_mm)} mm",
            f"{self.interpolation}",
            f"{self.compounding_mode}",
            f"fill holes {'on' if self.fill_holes else 'off'}",
        ]
        if self.hole_filling:
            parts[-1] += " (" + ", ".join(str(h) for h in self.hole_filling) + ")"
        if self.output_origin_mm is not None:
            parts.append(f"origin {_fmt_vec(self.output_origin_mm)} mm")
        if self.output_extent is not None:
            parts.append(f"extent {' '.join(str(v) for v in self.output_extent)}")
        if self.clip_rectangle_origin_px is not None and self.clip_rectangle_size_px is not None:
            (x, y), (w, h) = self.clip_rectangle_origin_px, self.clip_rectangle_size_px
            parts.append(f"clip ({x}, {y}) {w}x{h} px")
        if self.fan_clipping:
            parts.append(
                f"fan {_fmt_vec(self.fan_angles_deg)} deg at "
                f"{_fmt_vec(self.fan_origin_px if self.fan_origin_px is not None else (0, 0))} px, "
                f"radius {self.fan_radius_start_px:g}-{self.fan_radius_stop_px:g} px"
            )
        parts.append(self.image_to_reference_name)
        return ", ".join(parts)



# --------------------------------------------------------------------------------------------
# The whole configuration
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PlusConfig:
    """A parsed PLUS configuration file.

    Attributes
    ----------
    path : Path
        The file read.
    coordinate_definitions : CoordinateDefinitions
        Fixed transforms (empty when the file has none).
    phantom : PhantomDefinition or None
    segmentation : SegmentationParameters or None
    volume_reconstruction : VolumeReconstructionParameters or None
    devices : list of (Id, Type)
        ``DataCollection/Device`` elements, for information.
    version : str or None
        ``PlusConfiguration/@version``.
    device_set_name : str or None
        ``DataCollection/DeviceSet/@Name``.
    other_elements : list of str
        Names of the other top-level elements (``Rendering``, ``fCal``...), ignored here.
    """

    path: Path
    coordinate_definitions: CoordinateDefinitions
    phantom: PhantomDefinition | None = None
    segmentation: SegmentationParameters | None = None
    volume_reconstruction: VolumeReconstructionParameters | None = None
    devices: list[tuple[str, str]] = field(default_factory=list)
    version: str | None = None
    device_set_name: str | None = None
    other_elements: list[str] = field(default_factory=list)

    def require_phantom(self) -> PhantomDefinition:
        """The phantom definition; ConfigError when the file has none or it has no N-wire."""
        if self.phantom is None:
            raise ConfigError(f"{self.path}: no <PhantomDefinition> element; add one or pass --phantom")
        if not self.phantom.nwires:
            raise ConfigError(
                f'{self.path}: <PhantomDefinition> has no N-wire (<Pattern Type="NWire"> in <Geometry>); '
                "add the phantom's N-wires or pass --phantom"
            )
        return self.phantom

    def require_segmentation(self) -> SegmentationParameters:
        """The segmentation parameters; ConfigError when the file has no ``<Segmentation>``."""
        if self.segmentation is None:
            raise ConfigError(
                f"{self.path}: no <Segmentation> element; add one (PLUS defaults: SegmentationParameters())"
            )
        return self.segmentation

    def require_volume_reconstruction(self) -> VolumeReconstructionParameters:
        """The reconstruction parameters; ConfigError when the file has no ``<VolumeReconstruction>``."""
        if self.volume_reconstruction is None:
            raise ConfigError(f"{self.path}: no <VolumeReconstruction> element; add one or pass --spacing")
        return self.volume_reconstruction

    def require_transform(self, name: str) -> np.ndarray:
        """The fixed 4x4 ``name`` (``"ImageToProbe"``), or the inverse of its stored inverse.

        Raises
        ------
        ConfigError
            Naming the file and the missing ``<Transform From=... To=...>`` element.
        """
        try:
            src, dst = split_transform_name(name)
        except TransformError as exc:
            raise ConfigError(f"{self.path}: {exc}") from exc
        matrix = self.coordinate_definitions.get(name)
        if matrix is None:
            known = ", ".join(self.coordinate_definitions.transforms) or "none"
            raise ConfigError(
                f'{self.path}: no <Transform From="{src}" To="{dst}"> in <CoordinateDefinitions> '
                f"(nor its inverse); add one. Transforms in the file: {known}"
            )
        return matrix

    def to_dict(self) -> dict:
        return {
            "path": str(self.path),
            "version": self.version,
            "device_set_name": self.device_set_name,
            "devices": [list(d) for d in self.devices],
            "coordinate_definitions": self.coordinate_definitions.to_dict(),
            "phantom": None if self.phantom is None else self.phantom.to_dict(),
            "segmentation": None if self.segmentation is None else self.segmentation.to_dict(),
            "volume_reconstruction": (
                None if self.volume_reconstruction is None else self.volume_reconstruction.to_dict()
            ),
            "other_elements": list(self.other_elements),
        }

    def __str__(self) -> str:
        lines = [f"PLUS config {self.path.name}" + (f" (version {self.version})" if self.version else "")]
        if self.device_set_name:
            lines.append(f"  device set: {self.device_set_name}")
        if self.devices:
            lines.append("  devices: " + ", ".join(f"{i} ({t})" for i, t in self.devices))
        lines.append(f"  {self.coordinate_definitions}")
        if self.phantom is not None:
            lines.extend("  " + line for line in str(self.phantom).splitlines())
        if self.segmentation is not None:
            lines.append(f"  {self.segmentation}")
        if self.volume_reconstruction is not None:
            lines.append(f"  {self.volume_reconstruction}")
        return "\n".join(lines)

