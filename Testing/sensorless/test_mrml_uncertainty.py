"""Per-frame uncertainty of an estimate in the scene (issue 25 item 4): summary, attribute, table."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

from FreehandUSLib import SequenceError, mrml  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from sensorless_helpers import tiny_sweep  # noqa: E402
from SensorlessTrackingLib import mrml_tracking as mt  # noqa: E402
from SensorlessTrackingLib.predict import track_sequence  # noqa: E402
from vtk.util import numpy_support  # noqa: E402

pytestmark = pytest.mark.mrml

N_FRAMES = 30


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


@pytest.fixture(scope="module")
def sweep():
    return tiny_sweep(seed=4, n_frames=N_FRAMES, length_mm=8.0).sequence


def test_estimate_stores_the_uncertainty_for_the_panel(scene, sweep):
    browser = mrml.sequence_to_browser(scene, sweep, browser_name="Sweep")
    summary = mt.estimate_trajectory_to_browser(browser, model="decorrelation")
    lib = track_sequence(sweep, "decorrelation")  # the same estimate through the Lib
    u = mt.estimate_uncertainty(browser)
    for key in ("elevational_sigma_mm", "out_of_plane_sigma_deg", "drift_band_mm"):
        assert len(u[key]) == N_FRAMES
    np.testing.assert_allclose(u["drift_band_mm"], lib.uncertainty.drift_band_mm, rtol=1e-3, atol=1e-3)
    assert summary["uncertainty"]["final_drift_band_mm"] == pytest.approx(lib.uncertainty.final_drift_band_mm)
    assert "drift_band_mm" not in summary["uncertainty"]  # the per-frame lists live in the attribute
    assert summary["drift_inside_band"] == (summary["metrics"]["final_drift_mm"]
                                            <= summary["uncertainty"]["final_drift_band_mm"])
    seq_node = mt.find_estimate_sequence(browser)
    assert json.loads(seq_node.GetAttribute(mt.ATTR_ESTIMATE_UNCERTAINTY))["drift_band_mm"] == u["drift_band_mm"]
    text = mt.summary_text(summary)
    assert "uncertainty: last frame within" in text and "95 % band" in text

    table = mt.trajectory_table(browser).GetTable()
    band = numpy_support.vtk_to_numpy(table.GetColumnByName("drift_band_mm"))
    np.testing.assert_allclose(band, u["drift_band_mm"])
    sigma = numpy_support.vtk_to_numpy(table.GetColumnByName("elevational_sigma_mm"))
    assert sigma[0] == 0 and np.all(sigma[1:] > 0)


def test_uncertainty_of_a_browser_without_one_is_a_clear_error(scene, sweep):
    browser = mrml.sequence_to_browser(scene, sweep, browser_name="Plain")
    with pytest.raises(SequenceError, match="'Plain' has no estimated trajectory"):
        mt.estimate_uncertainty(browser)
    mt.estimate_trajectory_to_browser(browser, model="decorrelation")
    seq_node = mt.find_estimate_sequence(browser)
    seq_node.SetAttribute(mt.ATTR_ESTIMATE_UNCERTAINTY, "not json")  # an older or damaged estimate
    with pytest.raises(SequenceError, match="carries no uncertainty .* estimate the trajectory again"):
        mt.estimate_uncertainty(browser)
    table = mt.trajectory_table(browser).GetTable()  # the table still works, without the columns
    assert table.GetColumnByName("drift_band_mm") is None and table.GetColumnByName("drift_mm") is not None
    with pytest.raises(TypeError, match="expected a vtkMRMLSequenceBrowserNode"):
        mt.estimate_uncertainty(scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))
    with pytest.raises(TypeError, match="got None"):
        mt.estimate_uncertainty(None)
