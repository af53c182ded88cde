"""The N-Wire Calibration panel's report of the frames that did not count (issue 23, item 2), on slicer-core.

:func:`NWireCalibrationLib.mrml_calibration.calibrate_browsers` writes one rejections-table row
per rejected calibration frame, dropped validation frame and labelling refused by the sequence
stage, with its reason code and text, and the per-stage counts as report text on the table and the
ImageToProbe node (what the panel shows).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

import vtk  # noqa: E402  (slicer-core pins it)
from vtk.util import numpy_support  # noqa: E402

from FreehandUSLib import mrml  # noqa: E402
from NWireCalibrationLib import mrml_calibration as mc  # noqa: E402
from NWireCalibrationLib.errors import CalibrationError, DetectionError  # noqa: E402
from NWireCalibrationLib.labeling import REJECTION_REASONS  # noqa: E402
from NWireCalibrationLib.pipeline import detect_sequence  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from nwire_synthetic import setup_for, small_simulation  # noqa: E402

pytestmark = pytest.mark.mrml

RANSAC = {"ransac_iterations": 200, "time_offset": 0.0}


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


def _column(table_node, name) -> list:
    array = table_node.GetTable().GetColumnByName(name)
    assert array is not None, f"column {name!r} missing"
    if isinstance(array, vtk.vtkStringArray):
        return [array.GetValue(i) for i in range(array.GetNumberOfValues())]
    return numpy_support.vtk_to_numpy(array).tolist()


def _with_blanked(sim, blank_frames=(), blank_dot=None):
    """The simulated recording with some frames black and one wire's dot painted out of one frame.

    ``blank_dot``: (frame, wire) whose echo is covered by a black square of 2 mm.
    """
    frames = np.array(sim.sequence.frames, copy=True)
    for i in blank_frames:
        frames[i] = 0
    if blank_dot is not None:
        i, w = blank_dot
        x, y = np.round(sim.true_points_px[i, w]).astype(int)
        half = int(round(1.0 / float(np.mean(sim.pixel_spacing_mm))))
        frames[i, max(0, y - half): y + half + 1, max(0, x - half): x + half + 1] = 0
    return replace(sim.sequence, frames=frames)


def test_rejected_and_dropped_frames_are_reported_with_reasons_and_stage_counts(scene):
    cal_sim = small_simulation("linear", 50.0, n_frames=30)
    val_sim = small_simulation("linear", 50.0, n_frames=12, seed=9)
    cal = _with_blanked(cal_sim, blank_frames=(4, 17), blank_dot=(9, 1))
    val = _with_blanked(val_sim, blank_frames=(5,))
    setup = setup_for(cal_sim)
    cal_browser = mrml.sequence_to_browser(scene, cal, browser_name="Calibration")
    val_browser = mrml.sequence_to_browser(scene, val, browser_name="Validation")
    out = mc.calibrate_browsers(cal_browser, val_browser, setup, **RANSAC)
    det_c, det_v = out.calibration_detection, out.validation_detection
    assert not det_c.ok[[4, 17, 9]].any() and not det_v.ok[5]

    table = out.rejections_table_node
    assert out.image_to_probe_node.GetNodeReference(mc.REF_REJECTIONS_TABLE) is table
    sets, frames = _column(table, mc.COL_DATA_SET), _column(table, mc.COL_FRAME)
    rows = {(d, f): k for k, (d, f) in enumerate(zip(sets, frames))}
    assert set(rows) == {("calibration", 4), ("calibration", 9), ("calibration", 17), ("validation", 5)}
    status, codes, reasons = (_column(table, c) for c in (mc.COL_STATUS, mc.COL_REASON_CODE, mc.COL_REASON))
    for key in rows:
        k = rows[key]
        assert status[k] == (mc.STATUS_REJECTED if key[0] == "calibration" else mc.STATUS_DROPPED)
        assert codes[k] in REJECTION_REASONS and reasons[k]
    # A black frame has no dot candidates; the painted-out echo names its wire and the sequence's try.
    assert codes[rows["calibration", 4]] in ("too-few-dots", "no-n-triple")
    wire = setup.phantom.wire_names[1]
    assert wire in reasons[rows["calibration", 9]] and "sequence:" in reasons[rows["calibration", 9]]

    report = out.detection_report
    assert table.GetAttribute(mc.ATTR_DETECTION_REPORT) == report
    assert out.image_to_probe_node.GetAttribute(mc.ATTR_DETECTION_REPORT) == report
    counts = det_c.stage_counts()
    assert f"Calibration recording: 27 of 30 frames detected ({counts['single-frame']} alone" in report
    assert "Validation recording: 11 of 12 frames detected" in report
    assert "1 frame dropped: 1 " + codes[rows["validation", 5]] in report
    assert "The validation errors are over the other frames." in report
    assert "3 frames rejected: " in report
    for code in set(codes):
        assert f"{code}: {REJECTION_REASONS[code]}" in report
    # The result's text (the CLI's and the panel's result label) says the same.
    text = str(out.result)
    assert "    rejected 3 frames: " in text and "    dropped 1 frame: 1 " + codes[rows["validation", 5]] in text
    assert "frame 5: " + codes[rows["validation", 5]] in text.split("validation recording:")[1]


def test_refused_and_recovered_frames_are_counted_per_stage(scene):
    """A detection whose sequence stage recovered and refused frames: rows and counts say so."""
    sim = small_simulation("linear", 50.0, n_frames=30)
    setup = setup_for(sim)
    det = detect_sequence(sim.sequence, setup)
    assert det.ok.all()
    stages = list(det.stages)
    stages[3], stages[8], stages[20] = "tracked", "tracked", "neighbours"
    ok = det.ok.copy()
    ok[12] = False
    pts = det.points_px.copy()
    pts[12] = np.nan
    codes, reasons = list(det.reason_codes), list(det.reasons)
    codes[12], reasons[12] = "motion-inconsistent", "wire w4's dot lies 30.0 px from where the tracked motion puts it"
    stages[12] = ""
    summary = dict(det.sequence, refused=[8, 12])
    det = replace(det, ok=ok, points_px=pts, stages=stages, reason_codes=codes, reasons=reasons, sequence=summary)
    browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
    out = mc.calibrate_browsers(browser, None, setup, calibration_detection=det, **RANSAC)

    table = out.rejections_table_node
    assert _column(table, mc.COL_FRAME) == [8, 12]
    assert _column(table, mc.COL_STATUS) == [mc.STATUS_RELABELLED, mc.STATUS_REJECTED]
    assert _column(table, mc.COL_REASON_CODE) == ["motion-inconsistent", "motion-inconsistent"]
    assert "labelled from the tracked motion instead" in _column(table, mc.COL_REASON)[0]
    assert _column(table, mc.COL_REASON)[1] == reasons[12]
    report = out.detection_report
    assert ("Calibration recording: 29 of 30 frames detected (26 alone, 2 from the tracked motion, "
            "1 from the neighbouring frames).") in report
    assert "The sequence stage refused 2 single-frame labellings as motion-inconsistent (frames 8, 12)." in report
    assert "1 frame rejected: 1 motion-inconsistent." in report and "Validation" not in report


def test_nothing_rejected_gives_an_empty_table_and_says_so(scene):
    sim = small_simulation("linear", 50.0, n_frames=30)
    setup = setup_for(sim)
    det = detect_sequence(sim.sequence, setup, sequence_stage=False)
    table = scene.AddNewNodeByClass("vtkMRMLTableNode", "Rejections")
    text = mc.write_detection_report(table, det)
    assert table.GetNumberOfRows() == 0 and table.GetNumberOfColumns() == 5
    assert isinstance(table.GetTable().GetColumnByName(mc.COL_REASON), vtk.vtkStringArray)
    assert text == ("Calibration recording: 30 of 30 frames detected (30 alone). The sequence stage did not run "
                    "(every frame labelled alone). No frame rejected.")
    with pytest.raises(DetectionError, match="validation detection: expected a DetectionResult"):
        mc.detection_report_text(det, "not a detection")
    node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "NotATable")
    with pytest.raises(CalibrationError, match="rejections table: expected a vtkMRMLTableNode"):
        mc.calibrate_browsers(mrml.sequence_to_browser(scene, sim.sequence, browser_name="C"), None, setup,
                              rejections_table_node=node, **RANSAC)
