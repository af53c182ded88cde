"""Reading PLUS probe-calibration result files (``*.Calibration.results.xml``).

fCal writes ``<ProbeCalibrationResult version="2.0">`` with the ImageToProbe matrix, error
statistics and, for every validation and calibration frame, the segmented dots (pixels, MF
image, PLUS wire order), the frame's tracker transforms and, for calibration frames, the
middle-wire positions PLUS computed in the Probe frame. We use these files as ground truth
for comparing detectors and solvers with PLUS.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from FreehandUSLib.errors import FileFormatError

__all__ = ["PlusFrameSet", "PlusCalibrationResults", "read_plus_calibration_results"]


@dataclass(frozen=True, eq=False)
class PlusFrameSet:
    """The frames of one data set (validation or calibration) of a PLUS result file.

    Attributes
    ----------
    frame_indices : (n,) int
        ``Frame/@Index`` (the frame number in the sequence file).
    segmented : (n,) bool
        ``SegmentationStatus == "OK"``.
    points_px : (n, n_wires, 2) float64
        Dots (x, y) in pixels, MF image, PLUS wire order; NaN where not segmented.
    transforms : dict name -> (n, 4, 4) float64
        ``ProbeToTracker``, ``ReferenceToTracker``... from ``TrackedFrame`` (NaN where absent).
    middle_wires_image_px, middle_wires_probe_mm : (n, n_patterns, 3) float64
        Calibration frames only (NaN otherwise): PLUS's middle-wire points in the image and in
        the Probe frame.
    timestamps_s : (n,) float64
    """

    frame_indices: np.ndarray
    segmented: np.ndarray
    points_px: np.ndarray
    transforms: dict = field(default_factory=dict)
    middle_wires_image_px: np.ndarray | None = None
    middle_wires_probe_mm: np.ndarray | None = None
    timestamps_s: np.ndarray | None = None

    @property
    def n_frames(self) -> int:
        return int(self.frame_indices.size)

    def points_for(self, n_frames: int) -> np.ndarray:
        """Dots scattered into an array of ``n_frames`` sequence frames (NaN where absent)."""
        out = np.full((n_frames,) + self.points_px.shape[1:], np.nan)
        keep = self.frame_indices < n_frames
        out[self.frame_indices[keep]] = self.points_px[keep]
        return out


@dataclass(frozen=True, eq=False)
class PlusCalibrationResults:
    """A parsed PLUS ``ProbeCalibrationResult`` file.

    Attributes
    ----------
    path : Path
    image_to_probe : (4, 4) float64
    wire_names : list of str
    validation, calibration : PlusFrameSet
    error3d_mm : dict
        ``ValidationMeanMm``, ``ValidationStdDevMm``, ``CalibrationMeanMm``, ``CalibrationStdDevMm``.
    """

    path: Path
    image_to_probe: np.ndarray
    wire_names: list
    validation: PlusFrameSet
    calibration: PlusFrameSet
    error3d_mm: dict = field(default_factory=dict)


def _floats(text: str, count: int, path: Path, what: str) -> np.ndarray:
    try:
        values = np.array(text.split(), dtype=np.float64)
    except (AttributeError, ValueError):
        raise FileFormatError(f"{path}: {what}: expected {count} numbers, got {text!r}") from None
    if values.size != count:
        raise FileFormatError(f"{path}: {what}: expected {count} numbers, got {values.size}")
    return values


def _read_set(elem, path: Path, n_wires: int, n_patterns: int, what: str) -> PlusFrameSet:
    frames = elem.findall("Frame") if elem is not None else []
    n = len(frames)
    idx = np.zeros(n, dtype=int)
    ok = np.zeros(n, dtype=bool)
    pts = np.full((n, n_wires, 2), np.nan)
    mw_img = np.full((n, n_patterns, 3), np.nan)
    mw_probe = np.full((n, n_patterns, 3), np.nan)
    stamps = np.full(n, np.nan)
    transforms: dict[str, np.ndarray] = {}
    for i, fr in enumerate(frames):
        idx[i] = int(fr.get("Index", i))
        ok[i] = fr.get("SegmentationStatus") == "OK"
        if not ok[i]:
            continue
        points = fr.findall("SegmentedPoints/Point")
        if len(points) != n_wires:
            raise FileFormatError(f"{path}: {what} frame {idx[i]}: {len(points)} points, expected {n_wires}")
        for j, p in enumerate(points):
            pts[i, j] = _floats(p.get("Position", ""), 3, path, f"{what} frame {idx[i]} point {j}")[:2]
        for k, mw in enumerate(fr.findall("MiddleWires/MiddleWire")[:n_patterns]):
            mw_img[i, k] = _floats(mw.get("PositionInImageFrame", ""), 4, path, "MiddleWire")[:3]
            mw_probe[i, k] = _floats(mw.get("PositionInProbeFrame", ""), 4, path, "MiddleWire")[:3]
        tracked = fr.find("TrackedFrame")
        if tracked is None:
            continue
        for cf in tracked.findall("CustomFrameField"):
            name, value = cf.get("Name", ""), cf.get("Value", "")
            if name == "Timestamp":
                stamps[i] = float(value)
            elif name.endswith("Transform"):
                key = name[: -len("Transform")]
                if key not in transforms:
                    transforms[key] = np.full((n, 4, 4), np.nan)
                transforms[key][i] = _floats(value, 16, path, f"{what} frame {idx[i]} {name}").reshape(4, 4)
    return PlusFrameSet(idx, ok, pts, transforms, mw_img, mw_probe, stamps)


def read_plus_calibration_results(path) -> PlusCalibrationResults:
    """Read a PLUS ``*.Calibration.results.xml`` file.

    Raises
    ------
    FileFormatError
        Missing file, bad XML, or not a ``<ProbeCalibrationResult>``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"{path}: file not found")
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as exc:
        raise FileFormatError(f"{path}: not well-formed XML: {exc}") from None
    if root.tag != "ProbeCalibrationResult":
        raise FileFormatError(f"{path}: root element is <{root.tag}>, expected <ProbeCalibrationResult>")
    t = root.find("CalibrationResults/Transform")
    if t is None:
        raise FileFormatError(f"{path}: no <CalibrationResults><Transform> (ImageToProbe)")
    image_to_probe = _floats(t.get("Matrix", ""), 16, path, "ImageToProbe Matrix").reshape(4, 4)
    names = [w.get("Name", "") for w in root.findall("ErrorReport/ReprojectionError2DStatistics/Wire")]
    if not names:
        first = root.find("ErrorReport/CalibrationData/Frame/SegmentedPoints")
        names = [p.get("WireName", "") for p in first.findall("Point")] if first is not None else []
    if not names or len(names) % 3:
        raise FileFormatError(f"{path}: cannot tell the wire names (found {len(names)})")
    stats = root.find("ErrorReport/ReprojectionError3DStatistics")
    errors = {k: float(v) for k, v in (stats.attrib.items() if stats is not None else [])}
    n_wires = len(names)
    validation = _read_set(root.find("ErrorReport/ValidationData"), path, n_wires, n_wires // 3, "validation")
    calibration = _read_set(root.find("ErrorReport/CalibrationData"), path, n_wires, n_wires // 3, "calibration")
    return PlusCalibrationResults(path, image_to_probe, names, validation, calibration, errors)
