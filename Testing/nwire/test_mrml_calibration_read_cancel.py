"""Cancel while N-wire calibration reads its recordings (issue 22, item 5) on slicer-core.

Reading a long calibration or validation recording out of its sequence browser takes seconds
before the first frame is detected. :func:`NWireCalibrationLib.mrml_calibration.calibrate_browsers`
and :func:`~NWireCalibrationLib.mrml_calibration.detect_browser` report ``(0, 1)`` every few
frames read and check the cancel there, so a Cancel during the read stops within a second,
before detection starts, and leaves the scene as it was: no new node (ImageToProbe, tables,
plot, the dots overlay's sequence), given output nodes unmodified. The cancel comes from another
thread at a chosen report (``cancel_helpers``), as a Cancel button's click would.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

from FreehandUSLib import mrml  # noqa: E402
from FreehandUSLib.jobs import Cancelled, CancelToken  # noqa: E402
from NWireCalibrationLib import mrml_calibration as mc  # noqa: E402
from cancel_helpers import CancelOnFirstReport, assert_cancelled_fast, node_ids  # noqa: E402
from mrml_scene import load_plus_like_slicer, make_scene, release_scene  # noqa: E402
from nwire_synthetic import FCAL2_CONFIG, setup_for, small_simulation  # noqa: E402
from testdata import plus_file  # noqa: E402

pytestmark = pytest.mark.mrml


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


@pytest.fixture
def detections(monkeypatch):
    """The recordings handed to detection (detection must not start after a cancel)."""
    started = []
    detect = mc.detect_sequence

    def recording_detect(sequence, *args, **kwargs):
        started.append(sequence.n_frames)
        return detect(sequence, *args, **kwargs)

    monkeypatch.setattr(mc, "detect_sequence", recording_detect)
    return started


def _read_reports(browser) -> int:
    """How many times reading ``browser`` reports progress."""
    reports = []
    mc.sequence_from_browser(browser, progress=lambda d, t: reports.append((d, t)))
    return len(reports)


def _given_outputs(scene) -> dict:
    """Output nodes the user selected before calibrating: an earlier ImageToProbe and filled tables."""
    earlier = mrml.transform_to_node(scene, np.diag([0.1, 0.1, 1.0, 1.0]), name="ImageToProbe")
    nodes = {
        "image_to_probe_node": earlier,
        "accuracy_table_node": scene.AddNewNodeByClass("vtkMRMLTableNode", "Accuracy"),
        "residuals_table_node": scene.AddNewNodeByClass("vtkMRMLTableNode", "Residuals"),
        "rejections_table_node": scene.AddNewNodeByClass("vtkMRMLTableNode", "Rejections"),
        "plot_chart_node": scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "Plot"),
    }
    return nodes


def _mtimes(nodes: dict) -> dict:
    return {key: node.GetMTime() for key, node in nodes.items()}


@pytest.mark.parametrize("recording", ["calibration", "validation"])
def test_cancel_while_a_recording_is_read_stops_before_detection(scene, detections, recording):
    sim = small_simulation("linear", 50.0, n_frames=30)
    val = small_simulation("linear", 50.0, n_frames=12, seed=9)
    cal_browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
    val_browser = mrml.sequence_to_browser(scene, val.sequence, browser_name="Validation")
    cal_reads, val_reads = _read_reports(cal_browser), _read_reports(val_browser)
    assert cal_reads >= 3 and val_reads >= 2
    # the second report of the recording: it has been partly read
    after = 2 if recording == "calibration" else cal_reads + 2
    outputs = _given_outputs(scene)
    before, mtimes = node_ids(scene), _mtimes(outputs)
    token = CancelToken("calibration")
    reports = []
    reporter = CancelOnFirstReport(token, after=after)

    def progress(done, total):
        reports.append((done, total))
        reporter(done, total)

    assert_cancelled_fast(
        lambda: mc.calibrate_browsers(cal_browser, val_browser, setup_for(sim), solver="lsq", progress=progress,
                                      cancel=token, **outputs),
        reporter,
    )
    assert reporter.calls == after  # stopped at the report where the cancel came
    assert set(reports) == {(0, 1)}  # every report came from the reads (the bar at its start)
    assert detections == []  # detection never started
    assert node_ids(scene) == before  # no ImageToProbe, tables, plot or rejections table added
    assert _mtimes(outputs) == mtimes  # the given outputs (an earlier calibration) are untouched
    assert not outputs["image_to_probe_node"].GetAttribute(mc.ATTR_SOLVER)

    # without a cancel the same call reads, detects both recordings and writes the outputs
    out = mc.calibrate_browsers(cal_browser, val_browser, setup_for(sim), solver="lsq", cancel=CancelToken(),
                                **outputs)
    assert detections == [30, 12] and out.image_to_probe_node is outputs["image_to_probe_node"]
    assert out.image_to_probe_node.GetAttribute(mc.ATTR_SOLVER) == "lsq"


def test_a_cancel_after_the_last_read_report_still_stops_before_detection(scene, detections, monkeypatch):
    """The reads report every few frames: a cancel after the last report is checked once the read ends."""
    sim = small_simulation("linear", 50.0, n_frames=30)
    browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
    before = node_ids(scene)
    token = CancelToken("calibration")
    finish_read = mc._add_static_tree

    def cancelled_at_the_end_of_the_read(sequence, browser_node):
        token.cancel()  # the user clicks Cancel after the read's last report
        finish_read(sequence, browser_node)

    monkeypatch.setattr(mc, "_add_static_tree", cancelled_at_the_end_of_the_read)
    with pytest.raises(Cancelled, match="calibration was cancelled"):
        mc.calibrate_browsers(browser, None, setup_for(sim), solver="lsq", cancel=token)
    assert detections == [] and node_ids(scene) == before


def test_cancel_while_detect_reads_leaves_the_overlay_empty(scene, detections):
    sim = small_simulation("linear", 50.0, n_frames=30)
    browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
    dots = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Dots")
    before = node_ids(scene)
    token = CancelToken("detection")
    reporter = CancelOnFirstReport(token, after=2)
    assert_cancelled_fast(
        lambda: mc.detect_browser(browser, setup_for(sim), markups_node=dots, progress=reporter, cancel=token),
        reporter,
    )
    assert reporter.calls == 2 and detections == []
    assert node_ids(scene) == before and dots.GetNumberOfControlPoints() == 0  # no <browser>_DetectedDots sequence


def test_cancel_while_the_fcal2_recordings_loaded_by_slicers_readers_are_read(scene, detections):
    """PLUS fCal 2.0 recordings laid out as File > Add Data makes them; cancelled in the middle of each read."""
    setup = mc.make_setup(plus_file(FCAL2_CONFIG))
    cal_browser = load_plus_like_slicer(scene, plus_file("TestImages/fCal_Test_Calibration_3NWires_fCal2.0.igs.mha"))
    val_browser = load_plus_like_slicer(scene, plus_file("TestImages/fCal_Test_Validation_3NWires_fCal2.0.igs.mha"))
    cal_reads, val_reads = _read_reports(cal_browser), _read_reports(val_browser)
    assert cal_reads >= 10 and val_reads >= 6  # 190 and 103 frames, reports every few frames and items
    outputs = _given_outputs(scene)
    before, mtimes = node_ids(scene), _mtimes(outputs)
    for after in (cal_reads // 2, cal_reads + val_reads // 2):
        token = CancelToken("calibration")
        reporter = CancelOnFirstReport(token, after=after)
        assert_cancelled_fast(
            lambda: mc.calibrate_browsers(cal_browser, val_browser, setup, solver="lsq", progress=reporter,
                                          cancel=token, **outputs),
            reporter,
        )
        assert reporter.calls == after
    assert detections == [] and node_ids(scene) == before and _mtimes(outputs) == mtimes
