"""Typed reading of PLUS device-set configuration files (``PlusDeviceSet_*.xml``).

A PLUS configuration is one XML tree whose root is ``<PlusConfiguration version="...">``. The
parts FreehandUS uses, and where PLUS keeps them:

==============================  ===========================================================
``<CoordinateDefinitions>``     fixed transforms: ``<Transform From="Image" To="Probe"
                                Matrix="16 numbers, row major" Error="mm" Date="..."/>``
``<PhantomDefinition>``         the calibration phantom: ``<Description>``, optional
                                ``<Model>``, ``<Geometry>`` with wire patterns, landmarks
                                and planes (coordinates in the Phantom frame, mm)
``<Segmentation>``              parameters of PLUS's N-wire dot segmentation (fCal/iCal)
``<VolumeReconstruction>``      parameters of PLUS/IGSIO's volume reconstructor; at the root
                                or inside a ``<Device Type="VirtualVolumeReconstructor">``
``<DataCollection>``            ``<Device Id=... Type=...>`` elements (kept for information)
==============================  ===========================================================

Everything else (``<Rendering>``, ``<fCal>``, ``<iCal>``, ``<ScanConversion>``,
``<PlusOpenIGTLinkServer>``, ``vtkPlus*Algo`` elements, a device's ``<USImagingParameters>``)
is ignored; unknown elements never make reading fail, and their top-level names are listed in
:attr:`PlusConfig.other_elements`.

Phantom geometry comes in two layouts, both read here:

- PLUS 1.4 and later (fCal 1.x, 2.x, 3.x, iCal, CIRS): ``<Geometry><Pattern Type="NWire">``
  with three ``<Wire Name=... EndPointFront="x y z" EndPointBack="x y z"/>`` children
  (``Type="CoplanarParallelWires"`` for the CIRS 045 phantom);
- PLUS 1.x phantom definition files: ``<Geometry><NWire>`` with ``<Wire Id=... Name=...
  EndPointFront=... EndPointBack=.../>`` children.

A stand-alone phantom definition file (root element ``<PhantomDefinition>``) is read too.

Defaults of absent attributes follow PLUS (``PlusFidSegmentation``) and IGSIO
(``vtkIGSIOVolumeReconstructor``, ``vtkIGSIOPasteSliceIntoVolume``); each field's docstring
names the attribute it comes from. Deprecated PLUS attributes (``FanAngles``, ``FanOrigin``,
``FanDepth``, ``Compounding``, ``Calculation``, ``RegionOfInterest``) are honoured with a
logged warning, as PLUS does.

Errors: a missing or malformed file raises :class:`~FreehandUSLib.errors.FileFormatError`
(XML syntax errors give the line and column); a well-formed file whose content is wrong
(a value with the wrong number of numbers, a non-number, a NaN or singular matrix, an
unknown enum value) raises :class:`~FreehandUSLib.errors.ConfigError`. Every message names
the file, the element, the attribute, what was expected and what was found.

Examples
--------
>>> cfg = read_plus_config("PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml")
>>> phantom = cfg.require_phantom()                 # ConfigError if absent
>>> len(phantom.nwires), phantom.nwires[0].front_mm.shape
(3, (3, 3))
>>> repo = TransformRepository(seq.transform_items(), fixed=cfg.coordinate_definitions.repository_fixed())
>>> print(transform_element("ImageToProbe", image_to_probe, error_mm=0.54))
"""

from __future__ import annotations

import logging
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from xml.sax.saxutils import escape

import numpy as np

from ..errors import ConfigError, FileFormatError, TransformError
from ..transforms import check_matrix, split_transform_name, transform_name

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
    "read_plus_config",
    "transform_element",
    "INTERPOLATION_MODES",
    "COMPOUNDING_MODES",
    "HOLE_FILLING_TYPES",
]

logger = logging.getLogger(__name__)

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

_TRUE = {"true", "on", "1", "yes"}
_FALSE = {"false", "off", "0", "no"}
_FRAME_RE = re.compile(r"^[A-Za-z0-9_]+$")


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
        tail.append(f'Date="{escape(str(date), {chr(34): "&quot;"})}"')
    if tail:
        text += "\n  " + " ".join(tail)
    return text + " />"
