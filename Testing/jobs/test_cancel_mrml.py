"""Cancel from another thread stops the long MRML work within a second and leaves the scene as it was.

Issue 22, item 5, on the real MRML classes (slicer-core): reconstruction, calibration,
estimation (Testing/sensorless/test_mrml_tracking_cancel.py) take a
``FreehandUSLib.jobs.CancelToken``. The test's progress callback hands the cancel to another
thread on the first report and waits until it is set (no sleeps); the work must then stop
with ``Cancelled`` within 1 s and the scene must hold exactly the nodes it held before
(a re-estimate must leave the earlier estimate untouched).
"""

from __future__ import annotations

import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

from FreehandUSLib import mrml  # noqa: E402
from FreehandUSLib import mrml_reconstruction as mr  # noqa: E402
from FreehandUSLib.jobs import Cancelled, CancelToken, cancellable_progress, scene_rollback  # noqa: E402
from cancel_helpers import CancelOnFirstReport, node_ids as _node_ids  # noqa: E402
from cancel_helpers import assert_cancelled_fast as _assert_cancelled_fast  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from recon_synthetic import linear_sweep  # noqa: E402

pytestmark = pytest.mark.mrml


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


def test_cancel_stops_reconstruction_and_removes_its_new_output(scene):
    browser = mrml.sequence_to_browser(scene, linear_sweep(n_frames=160, n_rows=60, n_cols=60), browser_name="Sweep")
    before = _node_ids(scene)
    token = CancelToken("reconstruction")
    reporter = CancelOnFirstReport(token)
    _assert_cancelled_fast(
        lambda: mr.reconstruct_browser_to_volume_node(
            browser, image_to_reference_transform="ImageToReference", output_spacing_mm=0.3,
            progress=reporter, cancel=token,
        ),
        reporter,
    )
    assert reporter.calls >= 1
    assert _node_ids(scene) == before  # the new <browser>Reconstruction node is gone

    # a given output node keeps its contents
    given = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Mine")
    before = _node_ids(scene)
    mtime = given.GetMTime()
    token = CancelToken("reconstruction")
    reporter = CancelOnFirstReport(token)
    _assert_cancelled_fast(
        lambda: mr.reconstruct_browser_to_volume_node(
            browser, given, image_to_reference_transform="ImageToReference", output_spacing_mm=0.3,
            progress=reporter, cancel=token,
        ),
        reporter,
    )
    assert _node_ids(scene) == before and given.GetImageData() is None and given.GetMTime() == mtime

    # without a cancel the same call completes (the token is only checked)
    result = mr.reconstruct_browser_to_volume_node(
        browser, given, image_to_reference_transform="ImageToReference", output_spacing_mm=0.3,
        cancel=CancelToken(),
    )
    assert result.frames_used == 160 and given.GetImageData() is not None


def test_a_token_cancelled_before_the_call_does_nothing(scene):
    browser = mrml.sequence_to_browser(scene, linear_sweep(n_frames=8), browser_name="Sweep")
    before = _node_ids(scene)
    token = CancelToken("reconstruction")
    token.cancel()
    with pytest.raises(Cancelled):
        mr.reconstruct_browser_to_volume_node(browser, image_to_reference_transform="ImageToReference", cancel=token)
    assert _node_ids(scene) == before


def test_cancel_stops_calibration_and_writes_nothing(scene):
    from NWireCalibrationLib import mrml_calibration as mc
    from nwire_synthetic import setup_for, small_simulation

    sim = small_simulation("linear", 50.0, n_frames=30)
    browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
    before = _node_ids(scene)
    token = CancelToken("calibration")
    reporter = CancelOnFirstReport(token, after=2)
    _assert_cancelled_fast(
        lambda: mc.calibrate_browsers(browser, None, setup_for(sim), solver="lsq", progress=reporter, cancel=token),
        reporter,
    )
    assert reporter.calls == 2  # stopped at the first check after the cancel
    assert _node_ids(scene) == before

    dots = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Dots")
    before = _node_ids(scene)
    token = CancelToken("detection")
    reporter = CancelOnFirstReport(token)
    _assert_cancelled_fast(
        lambda: mc.detect_browser(browser, setup_for(sim), markups_node=dots, progress=reporter, cancel=token),
        reporter,
    )
    assert _node_ids(scene) == before and dots.GetNumberOfControlPoints() == 0


def test_scene_rollback_keeps_nodes_when_the_block_succeeds(scene):
    with scene_rollback(scene):
        kept = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Kept")
    assert scene.GetNodeByID(kept.GetID()) is kept
    with pytest.raises(ValueError):
        with scene_rollback(scene):
            gone = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Gone")
            raise ValueError("boom")
    assert scene.GetNodeByID(gone.GetID()) is None and scene.GetNodeByID(kept.GetID()) is kept


def test_cancellable_progress_forwards_ticks_and_checks():
    seen, ticks = [], []
    token = CancelToken("work")
    report = cancellable_progress(lambda d, t: seen.append((d, t)), token, tick=lambda: ticks.append(1))
    report(1, 3)
    token.cancel()
    with pytest.raises(Cancelled, match="work was cancelled"):
        report(2, 3)
    assert seen == [(1, 3), (2, 3)] and len(ticks) == 2


def test_cancel_while_the_solver_runs(scene):
    """Detection reused, so the only long step is the solver: it is cancelled within the poll."""
    from NWireCalibrationLib import mrml_calibration as mc
    from nwire_synthetic import setup_for, small_simulation

    sim = small_simulation("linear", 50.0, n_frames=30)
    browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
    detection = mc.detect_browser(browser, setup_for(sim))
    reads = []
    mc.sequence_from_browser(browser, progress=lambda d, t: reads.append(d))
    before = _node_ids(scene)
    token = CancelToken("calibration")
    reporter = CancelOnFirstReport(token, after=len(reads) + 1)  # the reads report first, then the solver's heartbeat
    _assert_cancelled_fast(
        lambda: mc.calibrate_browsers(browser, None, setup_for(sim), solver="ransac-lm", ransac_iterations=5000,
                                      calibration_detection=detection, progress=reporter, cancel=token),
        reporter,
    )
    assert reporter.calls == len(reads) + 1 and _node_ids(scene) == before
