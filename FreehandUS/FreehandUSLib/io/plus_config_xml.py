"""Reading PLUS device-set configuration files into the model of :mod:`.plus_config_model`.

Typed attribute access whose errors name the file, the element and the attribute (``_Attrs``),
one reader per part of the file (coordinate definitions, phantom, segmentation, volume
reconstruction), :func:`read_plus_config`, and :func:`transform_element`, the PLUS
``<Transform>`` element FreehandUS writes for pasting into a configuration. The file's layout,
the defaults and the errors are described in :mod:`.plus_config`.
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from datetime import datetime
from pathlib import Path

import numpy as np

from ..errors import ConfigError, FileFormatError, TransformError
from ..transforms import check_matrix, split_transform_name, transform_name
from .plus_config_model import (
    COMPOUNDING_MODES,
    HOLE_FILLING_TYPES,
    INTERPOLATION_MODES,
    CoordinateDefinitions,
    HoleFillingElement,
    NWire,
    PhantomDefinition,
    PlusConfig,
    SegmentationParameters,
    VolumeReconstructionParameters,
    Wire,
    _fmt_number,
)

__all__ = [
    "read_plus_config",
    "transform_element",
]

# The configuration reader's logger, named as before the model and the parser were split.
logger = logging.getLogger(f"{__package__}.plus_config")

_TRUE = {"true", "on", "1", "yes"}
_FALSE = {"false", "off", "0", "no"}
_FRAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


def _readonly(array: np.ndarray) -> np.ndarray:
    array = np.array(array, copy=True)
    array.setflags(write=False)
    return array


# --------------------------------------------------------------------------------------------
# Attribute reading with error messages that name file, element and attribute
# --------------------------------------------------------------------------------------------


class _Attrs:
    """Typed access to one element's attributes; remembers which ones were read (for ``extra``)."""

    def __init__(self, elem: ET.Element, path: Path, label: str):
        self.elem = elem
        self.path = path
        self.label = label
        self.used: set[str] = set()

    # -- errors --------------------------------------------------------------------------
    def error(self, key: str | None, message: str) -> ConfigError:
        where = f"<{self.label}>" if key is None else f"<{self.label}> attribute {key}"
        if key is not None and key in self.elem.attrib:
            where += f"={_short(self.elem.attrib[key])!r}"
        return ConfigError(f"{self.path}: {where}: {message}")

    # -- raw ----------------------------------------------------------------------------
    def has(self, key: str) -> bool:
        return key in self.elem.attrib

    def string(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        self.used.add(key)
        value = self.elem.attrib.get(key)
        if value is None:
            if required:
                raise self.error(key, "required attribute is missing")
            return default
        return value.strip()

    def extra(self) -> dict[str, str]:
        return {k: v for k, v in self.elem.attrib.items() if k not in self.used}

    # -- numbers ------------------------------------------------------------------------
    def _tokens(self, key: str) -> list[str]:
        return self.elem.attrib[key].split()

    def floats(self, key: str, count: int, what: str, *, required: bool = False, finite: bool = True):
        """``count`` float64 numbers as a read-only array, or None when absent (and not required)."""
        self.used.add(key)
        if key not in self.elem.attrib:
            if required:
                raise self.error(key, f"required attribute is missing; expected {count} numbers ({what})")
            return None
        tokens = self._tokens(key)
        expected = "a number" if count == 1 else f"{count} numbers"
        if len(tokens) != count:
            raise self.error(key, f"expected {expected} ({what}), got {len(tokens)}")
        values = []
        for tok in tokens:
            try:
                values.append(float(tok))
            except ValueError:
                raise self.error(key, f"expected {expected} ({what}), {_short(tok, 40)!r} is not a number") from None
        arr = np.asarray(values, dtype=np.float64)
        if finite and not np.all(np.isfinite(arr)):
            raise self.error(key, f"expected {expected} ({what}), got NaN or infinity")
        return _readonly(arr)

    def ints(self, key: str, count: int, what: str, *, required: bool = False):
        """``count`` integers as a tuple (``"820.0"`` is accepted as 820), or None when absent."""
        arr = self.floats(key, count, what, required=required)
        if arr is None:
            return None
        if not np.all(arr == np.round(arr)):
            expected = "an integer" if count == 1 else f"{count} integers"
            raise self.error(key, f"expected {expected} ({what}), got a non-integer value")
        return tuple(int(v) for v in arr)

    def float(
        self,
        key: str,
        default: float | None,
        what: str,
        *,
        minimum: float | None = None,
        strictly_positive: bool = False,
    ) -> float | None:
        arr = self.floats(key, 1, what)
        if arr is None:
            return default
        value = float(arr[0])
        if strictly_positive and value <= 0:
            raise self.error(key, f"expected a positive number ({what}), got {value:g}")
        if minimum is not None and value < minimum:
            raise self.error(key, f"expected a number >= {minimum:g} ({what}), got {value:g}")
        return value

    def int(self, key: str, default: int | None, what: str, *, minimum: int | None = None) -> int | None:
        values = self.ints(key, 1, what)
        if values is None:
            return default
        value = values[0]
        if minimum is not None and value < minimum:
            raise self.error(key, f"expected an integer >= {minimum} ({what}), got {value}")
        return value

    def bool(self, key: str, default: bool | None) -> bool | None:
        value = self.string(key)
        if value is None:
            return default
        low = value.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise self.error(key, "expected TRUE/FALSE (or ON/OFF)")

    def choice(self, key: str, choices: tuple[str, ...], default: str | None) -> str | None:
        value = self.string(key)
        if value is None:
            return default
        upper = value.upper()
        if upper not in choices:
            raise self.error(key, f"expected one of {', '.join(choices)}")
        return upper


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _find(root: ET.Element, tag: str) -> ET.Element | None:
    """``root`` itself, a direct child, or (older layouts) the first descendant named ``tag``."""
    if root.tag == tag:
        return root
    elem = root.find(tag)
    if elem is None:
        elem = next(root.iter(tag), None)
        if elem is not None:
            logger.info("using the nested <%s> element (not a direct child of <%s>)", tag, root.tag)
    return elem



# --------------------------------------------------------------------------------------------
# CoordinateDefinitions
# --------------------------------------------------------------------------------------------


def _read_coordinate_definitions(root: ET.Element, path: Path) -> CoordinateDefinitions:
    elem = _find(root, "CoordinateDefinitions")
    transforms: dict[str, np.ndarray] = {}
    errors: dict[str, float] = {}
    dates: dict[str, str] = {}
    if elem is None:
        return CoordinateDefinitions()
    for index, t in enumerate(elem.findall("Transform")):
        label = "CoordinateDefinitions/Transform"
        if "From" in t.attrib or "To" in t.attrib:
            label += f' From="{_short(t.attrib.get("From", ""), 40)}" To="{_short(t.attrib.get("To", ""), 40)}"'
        else:
            label += f" #{index + 1}"
        a = _Attrs(t, path, label)
        src = a.string("From", required=True)
        dst = a.string("To", required=True)
        for key, frame in (("From", src), ("To", dst)):
            if not _FRAME_RE.match(frame):
                raise a.error(key, "expected a coordinate frame name of letters, digits and '_'")
        if src == dst:
            raise a.error(None, f"From and To are the same frame ({_short(src, 40)!r})")
        name = transform_name(src, dst)
        inverse = transform_name(dst, src)
        if name in transforms:
            raise a.error(None, f"transform {_short(name)} is defined twice")
        if inverse in transforms:
            raise a.error(
                None, f"{_short(name)} is defined although its inverse {_short(inverse)} is already defined"
            )
        matrix = a.floats("Matrix", 16, "a 4x4 matrix, row major", required=True, finite=False)
        try:
            matrix = check_matrix(matrix.reshape(4, 4), name=name)
        except TransformError as exc:
            raise ConfigError(f"{path}: <{label}> attribute Matrix: {_short(str(exc), 200)}") from exc
        transforms[name] = _readonly(matrix)
        err = a.float("Error", None, "mm")
        if err is not None:
            errors[name] = err
        date = a.string("Date")
        if date:
            dates[name] = date
        unknown = set(a.extra()) - {"Persistent"}
        if unknown:
            logger.debug("%s: <%s>: ignoring attributes %s", path, label, sorted(unknown))
    return CoordinateDefinitions(transforms=transforms, errors=errors, dates=dates)


# --------------------------------------------------------------------------------------------
# PhantomDefinition
# --------------------------------------------------------------------------------------------


def _read_wire(elem: ET.Element, path: Path, label: str) -> Wire:
    a = _Attrs(elem, path, label)
    name = a.string("Name", "") or ""
    front = a.floats("EndPointFront", 3, "x y z in mm, Phantom frame", required=True)
    back = a.floats("EndPointBack", 3, "x y z in mm, Phantom frame", required=True)
    wire_id = a.int("Id", None, "wire id")
    if np.linalg.norm(back - front) < 1e-9:
        raise a.error(None, "EndPointFront and EndPointBack are the same point; a wire needs two ends")
    return Wire(name=name, end_point_front_mm=front, end_point_back_mm=back, id=wire_id)


def _read_phantom(root: ET.Element, path: Path) -> PhantomDefinition | None:
    elem = _find(root, "PhantomDefinition")
    if elem is None:
        return None
    desc = elem.find("Description")
    description = {}
    if desc is not None:
        d = _Attrs(desc, path, "PhantomDefinition/Description")
        for key in ("Name", "Type", "Version", "WiringVersion", "Institution"):
            description[key] = d.string(key)

    model_file = None
    model_to_phantom = None
    model = elem.find("Model")
    if model is not None:
        m = _Attrs(model, path, "PhantomDefinition/Model")
        model_file = m.string("File")
        values = m.floats("ModelToPhantomTransform", 16, "a 4x4 matrix, row major", finite=False)
        if values is not None:
            try:
                model_to_phantom = _readonly(
                    check_matrix(values.reshape(4, 4), name="ModelToPhantomTransform")
                )
            except TransformError as exc:
                raise ConfigError(
                    f"{path}: <PhantomDefinition/Model> attribute ModelToPhantomTransform: {exc}"
                ) from exc

    geometry = elem.find("Geometry")
    if geometry is None:
        raise ConfigError(f"{path}: <PhantomDefinition> has no <Geometry> element (the wire patterns)")

    nwires: list[NWire] = []
    others: list[NWire] = []
    layout = "Pattern"
    n_pattern = 0
    for child in geometry:
        if child.tag not in ("Pattern", "NWire"):
            continue
        n_pattern += 1
        if child.tag == "NWire":
            layout = "NWire"
            ptype = "NWire"
            label = f"PhantomDefinition/Geometry/NWire #{n_pattern}"
            pid = None
        else:
            pa = _Attrs(child, path, f"PhantomDefinition/Geometry/Pattern #{n_pattern}")
            ptype = pa.string("Type", required=True)
            pid = pa.string("Id")
            label = f'PhantomDefinition/Geometry/Pattern #{n_pattern} Type="{_short(ptype, 40)}"'
        wires = [
            _read_wire(
                w,
                path,
                f"{label}/Wire #{j + 1}"
                + (f' Name="{_short(w.attrib["Name"], 40)}"' if "Name" in w.attrib else ""),
            )
            for j, w in enumerate(child.findall("Wire"))
        ]
        if ptype.lower() == "nwire":
            if len(wires) != 3:
                raise ConfigError(
                    f"{path}: <{label}>: an N-wire needs exactly 3 <Wire> elements, got {len(wires)}"
                )
            nwires.append(NWire(wires=wires, type="NWire", id=pid))
        else:
            if ptype not in ("CoplanarParallelWires",):
                logger.warning("%s: <%s>: unknown pattern type %r kept as is", path, label, ptype)
            if not wires:
                raise ConfigError(f"{path}: <{label}>: the pattern has no <Wire> elements")
            others.append(NWire(wires=wires, type=ptype, id=pid))

    landmarks: dict[str, np.ndarray] = {}
    lm_parent = geometry.find("Landmarks")
    if lm_parent is None:
        lm_parent = elem.find("Landmarks")
    if lm_parent is not None:
        for j, lm in enumerate(lm_parent.findall("Landmark")):
            la = _Attrs(lm, path, f"PhantomDefinition/Geometry/Landmarks/Landmark #{j + 1}")
            name = la.string("Name") or f"#{j + 1}"
            if name in landmarks:
                raise la.error("Name", "landmark names must be unique")
            landmarks[name] = la.floats("Position", 3, "x y z in mm, Phantom frame", required=True)

    planes: dict[str, np.ndarray] = {}
    planes_parent = geometry.find("Planes")
    if planes_parent is not None:
        for j, pl in enumerate(planes_parent.findall("Plane")):
            pa = _Attrs(pl, path, f"PhantomDefinition/Geometry/Planes/Plane #{j + 1}")
            name = pa.string("Name") or f"#{j + 1}"
            pts = [
                pa.floats(k, 3, "x y z in mm", required=True) for k in ("BasePoint", "EndPoint1", "EndPoint2")
            ]
            planes[name] = _readonly(np.stack(pts))

    return PhantomDefinition(
        nwires=nwires,
        name=description.get("Name"),
        type=description.get("Type"),
        version=description.get("Version"),
        wiring_version=description.get("WiringVersion"),
        institution=description.get("Institution"),
        model_file=model_file,
        model_to_phantom=model_to_phantom,
        other_patterns=others,
        landmarks=landmarks,
        planes=planes,
        geometry_layout=layout,
    )



# --------------------------------------------------------------------------------------------
# Segmentation
# --------------------------------------------------------------------------------------------


def _read_segmentation(root: ET.Element, path: Path) -> SegmentationParameters | None:
    elem = _find(root, "Segmentation")
    if elem is None:
        return None
    a = _Attrs(elem, path, "Segmentation")
    d = SegmentationParameters()
    kw = {}
    kw["approximate_spacing_mm_per_px"] = a.float(
        "ApproximateSpacingMmPerPixel",
        d.approximate_spacing_mm_per_px,
        "mm per pixel",
        strictly_positive=True,
    )
    kw["morphological_opening_circle_radius_mm"] = a.float(
        "MorphologicalOpeningCircleRadiusMm", d.morphological_opening_circle_radius_mm, "mm", minimum=0.0
    )
    kw["morphological_opening_bar_size_mm"] = a.float(
        "MorphologicalOpeningBarSizeMm", d.morphological_opening_bar_size_mm, "mm", minimum=0.0
    )
    origin = a.ints("ClipRectangleOrigin", 2, "x y in pixels")
    size = a.ints("ClipRectangleSize", 2, "width height in pixels")
    if (origin is None) != (size is None):
        missing = "ClipRectangleSize" if size is None else "ClipRectangleOrigin"
        raise a.error(None, f"ClipRectangleOrigin and ClipRectangleSize go together; {missing} is missing")
    if origin is None and a.has("RegionOfInterest"):
        roi = a.ints("RegionOfInterest", 4, "x_min y_min x_max y_max in pixels")
        logger.warning(
            "%s: <Segmentation> RegionOfInterest is deprecated; use ClipRectangleOrigin/Size", path
        )
        origin, size = (roi[0], roi[1]), (roi[2] - roi[0], roi[3] - roi[1])
    if size is not None and min(size) <= 0:
        raise a.error(
            "ClipRectangleSize" if a.has("ClipRectangleSize") else "RegionOfInterest",
            "the clip rectangle must have a positive width and height",
        )
    if origin is not None and min(origin) < 0:
        raise a.error("ClipRectangleOrigin", "the clip rectangle origin must not be negative")
    kw["clip_rectangle_origin_px"] = origin
    kw["clip_rectangle_size_px"] = size
    kw["max_line_pair_distance_error_percent"] = a.float(
        "MaxLinePairDistanceErrorPercent", d.max_line_pair_distance_error_percent, "percent", minimum=0.0
    )
    kw["angle_tolerance_deg"] = a.float(
        "AngleToleranceDegrees", d.angle_tolerance_deg, "degrees", minimum=0.0
    )
    kw["max_angle_difference_deg"] = a.float(
        "MaxAngleDifferenceDegrees", d.max_angle_difference_deg, "degrees", minimum=0.0
    )
    kw["min_theta_deg"] = a.float("MinThetaDegrees", d.min_theta_deg, "degrees")
    kw["max_theta_deg"] = a.float("MaxThetaDegrees", d.max_theta_deg, "degrees")
    if kw["min_theta_deg"] >= kw["max_theta_deg"]:
        raise a.error("MinThetaDegrees", f"must be smaller than MaxThetaDegrees ({kw['max_theta_deg']:g})")
    kw["max_line_shift_mm"] = a.float("MaxLineShiftMm", d.max_line_shift_mm, "mm", minimum=0.0)
    threshold = a.float("ThresholdImagePercent", d.threshold_image_percent, "percent", minimum=0.0)
    if threshold > 100.0:
        raise a.error("ThresholdImagePercent", f"expected a percentage in [0, 100], got {threshold:g}")
    kw["threshold_image_percent"] = threshold
    kw["collinear_points_max_distance_from_line_mm"] = a.float(
        "CollinearPointsMaxDistanceFromLineMm",
        d.collinear_points_max_distance_from_line_mm,
        "mm",
        minimum=0.0,
    )
    key = "UseOriginalImageIntensityForDotIntensityScore"
    if elem.attrib.get(key, "").strip() in ("0", "1"):
        logger.warning("%s: <Segmentation> %s: 0/1 values are deprecated; use FALSE/TRUE", path, key)
    kw["use_original_image_intensity_for_dot_intensity_score"] = a.bool(
        key, d.use_original_image_intensity_for_dot_intensity_score
    )
    kw["number_of_maximum_fiducial_point_candidates"] = a.int(
        "NumberOfMaximumFiducialPointCandidates",
        d.number_of_maximum_fiducial_point_candidates,
        "maximum number of dot candidates",
        minimum=1,
    )
    return SegmentationParameters(**kw, extra=a.extra())



# --------------------------------------------------------------------------------------------
# VolumeReconstruction
# --------------------------------------------------------------------------------------------


_HOLE_REQUIRED = {
    "GAUSSIAN": ("Size", "Stdev", "MinimumKnownVoxelsRatio"),
    "GAUSSIAN_ACCUMULATION": ("Size", "Stdev", "MinimumKnownVoxelsRatio"),
    "DISTANCE_WEIGHT_INVERSE": ("Size", "MinimumKnownVoxelsRatio"),
    "NEAREST_NEIGHBOR": ("Size", "MinimumKnownVoxelsRatio"),
    "STICK": ("StickLengthLimit", "NumberOfSticksToUse"),
}


def _read_hole_filling(elem: ET.Element, path: Path, index: int) -> HoleFillingElement:
    a = _Attrs(elem, path, f"VolumeReconstruction/HoleFilling/HoleFillingElement #{index}")
    htype = a.choice("Type", HOLE_FILLING_TYPES, None)
    if htype is None:
        raise a.error(
            "Type", f"required attribute is missing; expected one of {', '.join(HOLE_FILLING_TYPES)}"
        )
    for key in _HOLE_REQUIRED[htype]:
        if not a.has(key):
            raise a.error(
                key,
                f"required attribute is missing for Type={htype} "
                f"(needs {', '.join(_HOLE_REQUIRED[htype])})",
            )
    size = a.int("Size", None, "kernel size in voxels", minimum=1)
    stdev = a.float("Stdev", None, "standard deviation in voxels", strictly_positive=True)
    ratio = a.float("MinimumKnownVoxelsRatio", None, "ratio in [0, 1]", minimum=0.0)
    if ratio is not None and ratio > 1.0:
        raise a.error("MinimumKnownVoxelsRatio", f"expected a ratio in [0, 1], got {ratio:g}")
    return HoleFillingElement(
        type=htype,
        size=size,
        stdev=stdev,
        minimum_known_voxels_ratio=ratio,
        stick_length_limit=a.int("StickLengthLimit", None, "stick length in voxels", minimum=1),
        number_of_sticks_to_use=a.int("NumberOfSticksToUse", None, "number of sticks", minimum=1),
        extra=a.extra(),
    )



def _read_volume_reconstruction(root: ET.Element, path: Path) -> VolumeReconstructionParameters | None:
    elem = _find(root, "VolumeReconstruction")
    if elem is None:
        return None
    a = _Attrs(elem, path, "VolumeReconstruction")
    kw: dict = {}
    spacing = a.floats("OutputSpacing", 3, "x y z voxel size in mm", required=True)
    if np.any(spacing <= 0):
        raise a.error("OutputSpacing", "expected 3 positive numbers (voxel size in mm)")
    kw["output_spacing_mm"] = spacing
    kw["output_origin_mm"] = a.floats("OutputOrigin", 3, "x y z in mm, Reference frame")
    extent = a.ints("OutputExtent", 6, "i_min i_max j_min j_max k_min k_max")
    if extent is not None and any(extent[2 * d + 1] < extent[2 * d] for d in range(3)):
        raise a.error(
            "OutputExtent", "each maximum index must be >= its minimum (i_min i_max j_min j_max k_min k_max)"
        )
    kw["output_extent"] = extent
    kw["clip_rectangle_origin_px"] = a.ints("ClipRectangleOrigin", 2, "x y in pixels")
    size = a.ints("ClipRectangleSize", 2, "width height in pixels")
    if size is not None and min(size) < 0:
        raise a.error("ClipRectangleSize", "width and height must not be negative")
    kw["clip_rectangle_size_px"] = size

    def deprecated(new: str, old: str, count: int, what: str):
        value = a.floats(new, count, what) if count > 1 else a.float(new, None, what)
        old_value = a.floats(old, count, what) if count > 1 else a.float(old, None, what)
        if old_value is not None:
            logger.warning("%s: <VolumeReconstruction> %s is deprecated; use %s", path, old, new)
            if value is None:
                value = old_value
        return value

    kw["fan_angles_deg"] = deprecated("FanAnglesDeg", "FanAngles", 2, "left right angles in degrees")
    kw["fan_origin_px"] = deprecated("FanOriginPixel", "FanOrigin", 2, "x y of the fan apex in pixels")
    kw["fan_radius_start_px"] = a.float("FanRadiusStartPixel", 0.0, "pixels", minimum=0.0)
    stop = deprecated("FanRadiusStopPixel", "FanDepth", 1, "pixels")
    kw["fan_radius_stop_px"] = 500.0 if stop is None else stop
    if kw["fan_radius_stop_px"] <= kw["fan_radius_start_px"]:
        raise a.error(
            "FanRadiusStopPixel", f"must be larger than FanRadiusStartPixel ({kw['fan_radius_start_px']:g})"
        )
    kw["enable_fan_angles_auto_detect"] = a.bool("EnableFanAnglesAutoDetect", False)
    kw["fan_angles_auto_detect_brightness_threshold"] = a.float(
        "FanAnglesAutoDetectBrightnessThreshold", None, "intensity"
    )
    kw["fan_angles_auto_detect_filter_radius_px"] = a.int(
        "FanAnglesAutoDetectFilterRadiusPixel", None, "pixels", minimum=0
    )

    kw["interpolation"] = a.choice("Interpolation", INTERPOLATION_MODES, "NEAREST_NEIGHBOR")
    optimization = a.string("Optimization")
    kw["optimization"] = optimization.upper() if optimization else "FULL"
    calculation = a.string("Calculation")
    kw["calculation"] = calculation.upper() if calculation else None
    kw["compounding"] = a.bool("Compounding", None)
    mode = a.choice("CompoundingMode", COMPOUNDING_MODES, None)
    if mode is None:
        if kw["calculation"] == "MAXIMUM":
            mode = "MAXIMUM"
        elif kw["compounding"] is False:
            mode = "LATEST"
        else:
            mode = "MEAN"
        if kw["calculation"] is not None or kw["compounding"] is not None:
            logger.warning(
                "%s: <VolumeReconstruction> Compounding/Calculation are deprecated; "
                "assuming CompoundingMode=%s",
                path,
                mode,
            )
        else:
            logger.info("%s: <VolumeReconstruction> has no CompoundingMode; assuming %s", path, mode)
    kw["compounding_mode"] = mode

    kw["fill_holes"] = a.bool("FillHoles", False)
    kw["number_of_threads"] = a.int("NumberOfThreads", 0, "number of threads (0: default)", minimum=0)
    kw["pixel_rejection_threshold"] = a.float("PixelRejectionThreshold", None, "intensity")
    kw["skip_interval"] = a.int("SkipInterval", 1, "use every n-th frame", minimum=1)
    kw["recompute_output_spacing"] = a.bool("RecomputeOutputSpacing", False)
    kw["importance_mask_filename"] = a.string("ImportanceMaskFilename")
    if kw["importance_mask_filename"]:
        # a data file named by the configuration: beside it (same folder or below), as data files
        # named by sequence headers must be
        folder = path.resolve().parent
        try:
            inside = (folder / kw["importance_mask_filename"]).resolve().is_relative_to(folder)
        except (OSError, RuntimeError, ValueError):
            inside = False
        if not inside:
            raise a.error(
                "ImportanceMaskFilename",
                "the importance mask must be in the configuration's folder or below it",
            )
    if mode == "IMPORTANCE_MASK" and not kw["importance_mask_filename"]:
        raise a.error(
            "CompoundingMode", "IMPORTANCE_MASK compounding needs an ImportanceMaskFilename attribute"
        )
    for key, arg in (
        ("ReferenceCoordinateFrame", "reference_coordinate_frame"),
        ("ImageCoordinateFrame", "image_coordinate_frame"),
    ):
        frame = a.string(key)
        if frame is not None and not _FRAME_RE.match(frame):
            raise a.error(key, "expected a coordinate frame name of letters, digits and '_'")
        if frame:
            kw[arg] = frame

    holes: list[HoleFillingElement] = []
    hole_parent = elem.find("HoleFilling")
    if hole_parent is not None:
        holes = [
            _read_hole_filling(h, path, i + 1)
            for i, h in enumerate(hole_parent.findall("HoleFillingElement"))
        ]
    if kw["fill_holes"] and not holes:
        raise a.error(
            "FillHoles",
            "FillHoles is ON but there is no <HoleFilling> element with "
            '<HoleFillingElement> children; add one or set FillHoles="OFF"',
        )
    kw["hole_filling"] = holes
    return VolumeReconstructionParameters(**kw, extra=a.extra())



# --------------------------------------------------------------------------------------------
# The whole configuration
# --------------------------------------------------------------------------------------------


_KNOWN_TOP = {
    "DataCollection",
    "CoordinateDefinitions",
    "PhantomDefinition",
    "Segmentation",
    "VolumeReconstruction",
}



def read_plus_config(path) -> PlusConfig:
    """Read a PLUS device-set configuration (or a stand-alone phantom definition) file.

    Parameters
    ----------
    path : str or Path
        An XML file whose root element is ``<PlusConfiguration>`` or ``<PhantomDefinition>``.

    Returns
    -------
    PlusConfig

    Raises
    ------
    FileFormatError
        The file is missing, unreadable, or not well-formed XML (the message gives line and
        column).
    ConfigError
        The root element is something else, or an element of interest holds an invalid value
        (wrong number of numbers, a non-number, a NaN or singular matrix, an unknown enum value,
        a missing required attribute); the message names file, element and attribute.
    """
    path = Path(path)
    if not path.exists():
        raise FileFormatError(f"{path}: file not found")
    if not path.is_file():
        raise FileFormatError(f"{path}: not a file")
    try:
        tree = ET.parse(path)
    except ET.ParseError as exc:
        line, column = exc.position
        reason = re.sub(r":\s*line \d+, column \d+\s*$", "", str(exc))
        raise FileFormatError(
            f"{path}: not well-formed XML at line {line}, column {column + 1}: {reason}"
        ) from exc
    except OSError as exc:
        raise FileFormatError(f"{path}: cannot be read ({exc.strerror or exc})") from exc
    root = tree.getroot()
    if root.tag not in ("PlusConfiguration", "PhantomDefinition"):
        raise ConfigError(
            f"{path}: root element is <{root.tag}>, expected <PlusConfiguration> (a PLUS device-set "
            "configuration) or <PhantomDefinition>"
        )

    devices: list[tuple[str, str]] = []
    device_set_name = None
    data_collection = root.find("DataCollection")
    if data_collection is not None:
        for dev in data_collection.iter("Device"):
            devices.append((dev.attrib.get("Id", "").strip(), dev.attrib.get("Type", "").strip()))
        device_set = data_collection.find("DeviceSet")
        if device_set is not None:
            device_set_name = device_set.attrib.get("Name")

    other = []
    for child in root:
        if isinstance(child.tag, str) and child.tag not in _KNOWN_TOP and child.tag not in other:
            other.append(child.tag)

    config = PlusConfig(
        path=path,
        coordinate_definitions=_read_coordinate_definitions(root, path),
        phantom=_read_phantom(root, path),
        segmentation=_read_segmentation(root, path),
        volume_reconstruction=_read_volume_reconstruction(root, path),
        devices=devices,
        version=root.attrib.get("version"),
        device_set_name=device_set_name,
        other_elements=other if root.tag == "PlusConfiguration" else [],
    )
    logger.debug("read %s", config)
    return config


# --------------------------------------------------------------------------------------------
# Writing a transform for pasting into a config
# --------------------------------------------------------------------------------------------


def transform_element(name: str, matrix, *, error_mm: float | None = None, date=None) -> str:
    """A PLUS ``<Transform .../>`` element to paste into ``<CoordinateDefinitions>``.

    The matrix is written as PLUS writes it: four rows of four tab-separated numbers, each
    number with the shortest text that reads back to the same float64 (so parsing the element
    returns ``matrix`` exactly).

    Parameters
    ----------
    name : str
        ``"<From>To<To>"``, e.g. ``"ImageToProbe"`` (a ``"Transform"`` suffix is accepted).
    matrix : (4, 4) array_like
        Finite, invertible, last row ``0 0 0 1`` (e.g. ImageToProbe: pixels -> mm).
    error_mm : float, optional
        Written as ``Error`` (mm); must be finite and >= 0.
    date : str or datetime, optional
        Written as ``Date``; a datetime is formatted ``YYYY.MM.DD hh:mm:ss``.

    Returns
    -------
    str
        Several lines, no trailing newline, e.g.::

            <Transform From="Image" To="Probe"
              Matrix="
                0.08	0	0	11
                ...
                0	0	0	1"
              Error="0.54" Date="2025.01.02 10:00:00" />

    Raises
    ------
    TransformError
        Bad name or matrix (from :func:`~FreehandUSLib.transforms.check_matrix`).
    ValueError
        ``error_mm`` negative or not finite.
    """
    src, dst = split_transform_name(name)
    m = check_matrix(matrix, name=transform_name(src, dst))
    if m.shape != (4, 4):
        raise TransformError(f"{transform_name(src, dst)}: expected one 4x4 matrix, got shape {m.shape}")
    rows = "\n".join("    " + "\t".join(_fmt_number(v) for v in row) for row in m)
    text = f'<Transform From="{src}" To="{dst}"\n  Matrix="\n{rows}"'
    tail = []
    if error_mm is not None:
        error_mm = float(error_mm)
        if not math.isfinite(error_mm) or error_mm < 0:
            raise ValueError(f"error_mm: expected a finite number >= 0 (mm), got {error_mm!r}")
        tail.append(f'Error="{_fmt_number(error_mm)}"')
    if date is not None:
        if isinstance(date, datetime):
            date = date.strftime("%Y.%m.%d %H:%M:%S")
        from xml.sax.saxutils import escape  # here: it imports urllib, http and ssl (~20 ms of every start)

        tail.append(f'Date="{escape(str(date), {chr(34): "&quot;"})}"')
    if tail:
        text += "\n  " + " ".join(tail)
    return text + " />"
