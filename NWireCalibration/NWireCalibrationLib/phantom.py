"""N-wire calibration phantoms: geometry model, PLUS import and a JSON library.

An N-wire phantom is a stack of *patterns* (layers). Each pattern holds three coplanar wires:
two parallel *side* wires and a *diagonal* between them (the letter N seen from above). Wires
are straight segments given by two end points in the **Phantom** frame, in mm. The wire order is
PLUS's: in every pattern the diagonal is the middle wire, and a PLUS-style labeler assigns the
wires of pattern ``k`` to the ``k``-th dot line from the top of the MF image, right to left.

Where the image plane crosses a pattern, the three dots A (wire 1), B (diagonal) and C (wire 3)
are collinear and ``alpha = |B - A| / |C - A|`` locates the plane along the diagonal (similar
triangles): the crossing point of the diagonal is ``W12 + alpha * (W32 - W12)`` with W12 / W32
the intersections of the (extended) diagonal with the side wires (PLUS
``vtkPlusProbeCalibrationAlgo``).

Sources of phantoms
-------------------
- :func:`load_phantom` with a built-in name (:func:`builtin_phantom_names`), a JSON file of the
  format below, or a PLUS configuration / phantom definition XML (``<PhantomDefinition>``).
- :func:`phantom_from_plus` converts a parsed
  :class:`FreehandUSLib.io.plus_config.PhantomDefinition` (or a whole ``PlusConfig``).

JSON format (copy a file from ``NWireCalibrationLib/phantoms/`` to describe your own)::

    {
      "format": "freehandus-nwire-phantom", "version": 1,
      "name": "fCal-2.0",
      "description": "...", "source": "...",
      "units": "mm", "frame": "Phantom",
      "patterns": [
        {"wires": [
          {"name": "7:G1_g1", "front": [30, 0, 20], "back": [30, 40, 20]},
          {"name": "8:L1_h1", "front": [55, 0, 20], "back": [35, 40, 20]},
          {"name": "9:M1_m1", "front": [60, 0, 20], "back": [60, 40, 20]}]},
        ...],
      "landmarks": {"#1": [104.3, 5.0, 20.0], ...}
    }
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import PhantomDefinitionError

__all__ = [
    "Wire",
    "NWirePattern",
    "NWirePhantom",
    "builtin_phantom_names",
    "load_phantom",
    "phantom_from_plus",
    "read_phantom_json",
    "write_phantom_json",
    "PHANTOM_JSON_FORMAT",
]

logger = logging.getLogger(__name__)

PHANTOM_JSON_FORMAT = "freehandus-nwire-phantom"
_JSON_VERSION = 1

#: Geometric tolerances of an N pattern (mm / sine of an angle).
_PARALLEL_SIN_TOL = 3e-3  # PLUS's Lego 3.1 definitions: 0.09 mm over 40.1 mm (2.2e-3)
_COPLANAR_TOL_MM = 0.02
_INTERSECT_TOL_MM = 0.02


def _readonly(a: np.ndarray) -> np.ndarray:
    a = np.array(a, dtype=np.float64)
    a.setflags(write=False)
    return a


def _vec3(value, what: str) -> np.ndarray:
    try:
        arr = np.asarray(value, dtype=np.float64).reshape(-1)
    except (TypeError, ValueError):
        raise PhantomDefinitionError(f"{what}: expected 3 numbers (x y z in mm), got {value!r}") from None
    if arr.shape != (3,) or not np.all(np.isfinite(arr)):
        raise PhantomDefinitionError(f"{what}: expected 3 finite numbers (x y z in mm), got {value!r}")
    arr.setflags(write=False)
    return arr


def _closest_points(p1, d1, p2, d2):
    """Closest points of two infinite lines ``p + t d``; returns (q1, q2, distance)."""
    w0 = p1 - p2
    a, b, c = d1 @ d1, d1 @ d2, d2 @ d2
    d, e = d1 @ w0, d2 @ w0
    den = a * c - b * b
    if den < 1e-12 * a * c:
        return p1, p2, float(np.linalg.norm(np.cross(w0, d1)) / np.sqrt(a))
    s = (b * e - c * d) / den
    t = (a * e - b * d) / den
    q1, q2 = p1 + s * d1, p2 + t * d2
    return q1, q2, float(np.linalg.norm(q1 - q2))


@dataclass(frozen=True, eq=False)
class Wire:
    """One straight wire, Phantom frame.

    Attributes
    ----------
    name : str
        As in the PLUS definition (``"7:G1_g1"``).
    front_mm, back_mm : (3,) float64, mm, Phantom frame
        End points (PLUS ``EndPointFront`` / ``EndPointBack``).
    """

    name: str
    front_mm: np.ndarray
    back_mm: np.ndarray

    def __post_init__(self):
        object.__setattr__(self, "front_mm", _vec3(self.front_mm, f"wire {self.name!r} front"))
        object.__setattr__(self, "back_mm", _vec3(self.back_mm, f"wire {self.name!r} back"))
        if np.linalg.norm(self.back_mm - self.front_mm) < 1e-6:
            raise PhantomDefinitionError(f"wire {self.name!r}: front and back end points are the same point")

    @cached_property
    def direction(self) -> np.ndarray:
        """(3,) unit vector front -> back."""
        d = self.back_mm - self.front_mm
        return _readonly(d / np.linalg.norm(d))

    @property
    def length_mm(self) -> float:
        return float(np.linalg.norm(self.back_mm - self.front_mm))

    def to_dict(self) -> dict:
        return {"name": self.name, "front": self.front_mm.tolist(), "back": self.back_mm.tolist()}


@dataclass(frozen=True, eq=False)
class NWirePattern:
    """Three coplanar wires forming an N: side wire, diagonal, side wire.

    Derived attributes (computed on construction)
    ---------------------------------------------
    intersect_w12_mm, intersect_w32_mm : (3,) float64
        Where the extended diagonal meets the extended first / third wire (PLUS
        ``IntersectPosW12`` / ``IntersectPosW32``).
    normal : (3,) float64
        Unit normal of the pattern plane.
    side_spacing_mm : float
        Distance between the two (parallel) side wires.
    alpha_range : (2,) float64
        ``alpha = |B-A|/|C-A|`` at the two ends of the diagonal (sorted): the values a real
        crossing of the diagonal can take.
    """

    wires: tuple
    intersect_w12_mm: np.ndarray = field(init=False)
    intersect_w32_mm: np.ndarray = field(init=False)
    normal: np.ndarray = field(init=False)
    side_spacing_mm: float = field(init=False)
    alpha_range: np.ndarray = field(init=False)

    def __post_init__(self):
        wires = tuple(self.wires)
        if len(wires) != 3 or not all(isinstance(w, Wire) for w in wires):
            raise PhantomDefinitionError(f"an N-wire pattern needs exactly 3 wires, got {len(wires)}")
        object.__setattr__(self, "wires", wires)
        names = ", ".join(repr(w.name) for w in wires)
        a, b, c = wires
        if np.linalg.norm(np.cross(a.direction, c.direction)) > _PARALLEL_SIN_TOL:
            raise PhantomDefinitionError(
                f"N-wire ({names}): the first and third wires must be parallel (the diagonal is the middle one)"
            )
        if np.linalg.norm(np.cross(a.direction, b.direction)) < 0.02:
            raise PhantomDefinitionError(
                f"N-wire ({names}): the middle wire is parallel to the side wires; it must be the diagonal"
            )
        w12, _, d12 = _closest_points(a.front_mm, a.direction, b.front_mm, b.direction)
        w32, _, d32 = _closest_points(c.front_mm, c.direction, b.front_mm, b.direction)
        if d12 > _INTERSECT_TOL_MM or d32 > _INTERSECT_TOL_MM:
            raise PhantomDefinitionError(
                f"N-wire ({names}): the diagonal does not cross the side wires "
                f"(gaps {d12:.3g} / {d32:.3g} mm); the three wires must be coplanar"
            )
        normal = np.cross(a.direction, b.direction)
        normal /= np.linalg.norm(normal)
        for w in wires:
            for p in (w.front_mm, w.back_mm):
                if abs((p - a.front_mm) @ normal) > _COPLANAR_TOL_MM:
                    raise PhantomDefinitionError(f"N-wire ({names}): wire {w.name!r} is not in the pattern's plane")
        spacing = float(np.linalg.norm(np.cross(c.front_mm - a.front_mm, a.direction)))
        if spacing < 1e-3:
            raise PhantomDefinitionError(f"N-wire ({names}): the side wires coincide")
        span = w32 - w12
        alphas = [float((p - w12) @ span / (span @ span)) for p in (b.front_mm, b.back_mm)]
        for name, value in (("intersect_w12_mm", w12), ("intersect_w32_mm", w32), ("normal", normal),
                            ("alpha_range", np.sort(np.asarray(alphas)))):
            value = np.array(value, dtype=np.float64)
            value.setflags(write=False)
            object.__setattr__(self, name, value)
        object.__setattr__(self, "side_spacing_mm", spacing)

    @property
    def names(self) -> list[str]:
        return [w.name for w in self.wires]

    def middle_point_mm(self, alpha) -> np.ndarray:
        """Crossing point(s) of the diagonal for ``alpha`` (scalar or (n,)): (3,) or (n, 3), mm."""
        alpha = np.asarray(alpha, dtype=np.float64)
        return self.intersect_w12_mm + alpha[..., None] * (self.intersect_w32_mm - self.intersect_w12_mm)

    def to_dict(self) -> dict:
        return {"wires": [w.to_dict() for w in self.wires]}


@dataclass(frozen=True, eq=False)
class NWirePhantom:
    """An N-wire phantom: one or more parallel N patterns, wires in PLUS order.

    Attributes
    ----------
    name : str
    patterns : tuple of NWirePattern
        In PLUS order (the first pattern is the top dot line of the MF image).
    description, source : str
        Free text (what it is, where the numbers come from).
    landmarks : dict name -> (3,) float64, mm, Phantom frame
        Registration landmarks (PLUS ``<Landmarks>``), for information.
    """

    name: str
    patterns: tuple
    description: str = ""
    source: str = ""
    landmarks: dict = field(default_factory=dict)

    def __post_init__(self):
        patterns = tuple(self.patterns)
        if not patterns:
            raise PhantomDefinitionError(f"phantom {self.name!r}: no N-wire patterns")
        object.__setattr__(self, "patterns", patterns)
        n0 = patterns[0].normal
        for k, p in enumerate(patterns[1:], start=2):
            if np.linalg.norm(np.cross(n0, p.normal)) > 0.02:
                raise PhantomDefinitionError(
                    f"phantom {self.name!r}: pattern {k} is not parallel to pattern 1; "
                    "all N-wire planes must be parallel (as PLUS requires)"
                )
        object.__setattr__(self, "landmarks", {str(k): _vec3(v, f"landmark {k!r}") for k, v in self.landmarks.items()})

    # -- shape ---------------------------------------------------------------------------
    @property
    def n_patterns(self) -> int:
        return len(self.patterns)

    @property
    def n_wires(self) -> int:
        return 3 * len(self.patterns)

    @property
    def wires(self) -> list[Wire]:
        return [w for p in self.patterns for w in p.wires]

    @property
    def wire_names(self) -> list[str]:
        return [w.name for w in self.wires]

    @cached_property
    def wire_front_mm(self) -> np.ndarray:
        """(n_wires, 3) float64 front end points, mm, Phantom frame."""
        return _readonly(np.stack([w.front_mm for w in self.wires]))

    @cached_property
    def wire_back_mm(self) -> np.ndarray:
        """(n_wires, 3) float64 back end points, mm, Phantom frame."""
        return _readonly(np.stack([w.back_mm for w in self.wires]))

    @cached_property
    def wire_directions(self) -> np.ndarray:
        """(n_wires, 3) float64 unit directions front -> back."""
        return _readonly(np.stack([w.direction for w in self.wires]))

    @cached_property
    def side_spacings_mm(self) -> np.ndarray:
        """(n_patterns,) distance between the side wires of each pattern, mm."""
        return _readonly(np.array([p.side_spacing_mm for p in self.patterns]))

    @cached_property
    def layer_offsets_mm(self) -> np.ndarray:
        """(n_patterns,) signed distance of each pattern plane from the first one, mm.

        Measured along the common normal, oriented so that the second pattern is at a positive
        offset (PLUS order: the first pattern is the top line of the image).
        """
        n0 = self.patterns[0].normal
        p0 = self.patterns[0].wires[0].front_mm
        off = np.array([(p.wires[0].front_mm - p0) @ n0 for p in self.patterns])
        if len(off) > 1 and off[1] < 0:
            off = -off
        return _readonly(off + 0.0)  # + 0.0: no "-0.0"

    @property
    def side_wires_parallel(self) -> bool:
        """True when the side wires of all patterns are parallel (fCal, iCal, the multi-layer)."""
        d0 = self.patterns[0].wires[0].direction
        return all(np.linalg.norm(np.cross(d0, p.wires[0].direction)) < 0.02 for p in self.patterns)

    def to_dict(self) -> dict:
        return {
            "format": PHANTOM_JSON_FORMAT,
            "version": _JSON_VERSION,
            "name": self.name,
            "description": self.description,
            "source": self.source,
            "units": "mm",
            "frame": "Phantom",
            "patterns": [p.to_dict() for p in self.patterns],
            "landmarks": {k: v.tolist() for k, v in self.landmarks.items()},
        }

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "") -> NWirePhantom:
        """Build from the JSON structure of the module docstring (``source`` names the file)."""
        where = f"{source}: " if source else ""
        if not isinstance(data, dict):
            raise PhantomDefinitionError(f"{where}expected a JSON object with 'name' and 'patterns'")
        fmt = data.get("format", PHANTOM_JSON_FORMAT)
        if fmt != PHANTOM_JSON_FORMAT:
            raise PhantomDefinitionError(f"{where}'format' is {fmt!r}, expected {PHANTOM_JSON_FORMAT!r}")
        if data.get("units", "mm") != "mm":
            raise PhantomDefinitionError(f"{where}'units' is {data.get('units')!r}; only 'mm' is supported")
        patterns_in = data.get("patterns")
        if not isinstance(patterns_in, list) or not patterns_in:
            raise PhantomDefinitionError(f"{where}'patterns' must be a non-empty list of {{'wires': [...]}}")
        patterns = []
        for k, pat in enumerate(patterns_in, start=1):
            wires_in = pat.get("wires") if isinstance(pat, dict) else None
            if not isinstance(wires_in, list) or len(wires_in) != 3:
                raise PhantomDefinitionError(f"{where}pattern {k}: 'wires' must list exactly 3 wires")
            wires = []
            for j, w in enumerate(wires_in, start=1):
                if not isinstance(w, dict) or "front" not in w or "back" not in w:
                    raise PhantomDefinitionError(f"{where}pattern {k} wire {j}: needs 'front' and 'back' (x y z in mm)")
                wires.append(Wire(str(w.get("name", f"{3 * (k - 1) + j}")), w["front"], w["back"]))
            try:
                patterns.append(NWirePattern(tuple(wires)))
            except PhantomDefinitionError as exc:
                raise PhantomDefinitionError(f"{where}pattern {k}: {exc}") from None
        return cls(
            name=str(data.get("name", Path(source).stem if source else "unnamed")),
            patterns=tuple(patterns),
            description=str(data.get("description", "")),
            source=str(data.get("source", "")),
            landmarks=dict(data.get("landmarks", {}) or {}),
        )

    def __str__(self) -> str:
        lines = [f"N-wire phantom {self.name}: {self.n_patterns} patterns, {self.n_wires} wires"]
        offsets = self.layer_offsets_mm
        for k, p in enumerate(self.patterns):
            lines.append(
                f"  pattern {k + 1}: {', '.join(p.names)}; side spacing {p.side_spacing_mm:.1f} mm, "
                f"offset {offsets[k]:.1f} mm, alpha {p.alpha_range[0]:.2f}-{p.alpha_range[1]:.2f}"
            )
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Library and conversions
# --------------------------------------------------------------------------------------------


def _library_dir():
    return resources.files(__package__).joinpath("phantoms")


def builtin_phantom_names() -> list[str]:
    """Names of the phantoms shipped in ``NWireCalibrationLib/phantoms/*.json``."""
    names = []
    for entry in sorted(_library_dir().iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".json"):
            names.append(json.loads(entry.read_text(encoding="utf-8"))["name"])
    return names


def read_phantom_json(path) -> NWirePhantom:
    """Read a phantom JSON file (format in the module docstring)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise PhantomDefinitionError(f"{path}: phantom file not found") from None
    except json.JSONDecodeError as exc:
        raise PhantomDefinitionError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): {exc.msg}") from None
    return NWirePhantom.from_dict(data, source=str(path))


def write_phantom_json(phantom: NWirePhantom, path) -> Path:
    """Write ``phantom`` as JSON (readable by :func:`read_phantom_json`). Returns the path."""
    path = Path(path)
    path.write_text(json.dumps(phantom.to_dict(), indent=2) + "\n", encoding="utf-8")
    return path


def phantom_from_plus(definition, *, name: str | None = None) -> NWirePhantom:
    """Convert a PLUS phantom definition (parsed by ``FreehandUSLib.io.plus_config``).

    Parameters
    ----------
    definition : PhantomDefinition or PlusConfig
        Anything with ``.nwires`` (each with ``.wires`` having ``name``, ``end_point_front_mm``,
        ``end_point_back_mm``), or a config with ``require_phantom()``.
    name : str, optional
        Overrides ``"<Name> <Version>"`` of the definition.

    Raises
    ------
    PhantomDefinitionError
        No N-wire pattern, or a pattern that is not a valid N (message names the wires).
    """
    source = ""
    if hasattr(definition, "require_phantom"):
        source = str(getattr(definition, "path", ""))
        definition = definition.require_phantom()
    nwires = list(getattr(definition, "nwires", []) or [])
    where = f"{source}: " if source else ""
    if not nwires:
        raise PhantomDefinitionError(f"{where}the phantom definition has no N-wire pattern (<Pattern Type=\"NWire\">)")
    patterns = []
    for k, nw in enumerate(nwires, start=1):
        wires = tuple(
            Wire(w.name or f"{3 * (k - 1) + j + 1}", w.end_point_front_mm, w.end_point_back_mm)
            for j, w in enumerate(nw.wires)
        )
        try:
            patterns.append(NWirePattern(wires))
        except PhantomDefinitionError as exc:
            raise PhantomDefinitionError(f"{where}<PhantomDefinition> pattern {k}: {exc}") from None
    label = name or " ".join(str(p) for p in (getattr(definition, "name", None), getattr(definition, "version", None)) if p)
    return NWirePhantom(
        name=label or "PLUS phantom",
        patterns=tuple(patterns),
        description=str(getattr(definition, "type", "") or ""),
        source=f"PLUS PhantomDefinition{(' in ' + source) if source else ''}",
        landmarks=dict(getattr(definition, "landmarks", {}) or {}),
    )


def load_phantom(spec) -> NWirePhantom:
    """A phantom from a built-in name, a JSON file or a PLUS XML file.

    Parameters
    ----------
    spec : str, Path or NWirePhantom
        ``"fCal-2.0"`` (case-insensitive, see :func:`builtin_phantom_names`), a ``.json`` file,
        or a PLUS device-set configuration / phantom definition ``.xml`` file.
    """
    if isinstance(spec, NWirePhantom):
        return spec
    text = str(spec)
    path = Path(text)
    if path.suffix.lower() == ".json":
        return read_phantom_json(path)
    if path.suffix.lower() == ".xml":
        from FreehandUSLib.io.plus_config import read_plus_config

        return phantom_from_plus(read_plus_config(path))
    key = text.strip().lower()
    for entry in _library_dir().iterdir():
        if entry.name.endswith(".json"):
            data = json.loads(entry.read_text(encoding="utf-8"))
            if data.get("name", "").lower() == key or entry.name[:-5].lower() == key:
                return NWirePhantom.from_dict(data, source=f"built-in {entry.name}")
    raise PhantomDefinitionError(
        f"unknown phantom {text!r}: not a built-in name ({', '.join(builtin_phantom_names())}), "
        "a .json phantom file or a PLUS .xml configuration"
    )
