"""Cancel a sensorless estimate from another thread (issue 22, item 5), on slicer-core.

A learned model's run is checked before every batch (a forward pre-hook): Cancel stops it
within a second, and the browser keeps the earlier estimate untouched; the reconstruction
from an estimate removes its new output node.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")
torch = pytest.importorskip("torch")

import vtk  # noqa: E402  (slicer-core pins it)
from cancel_helpers import CancelOnFirstReport, node_ids as _node_ids  # noqa: E402
from cancel_helpers import assert_cancelled_fast as _assert_cancelled_fast  # noqa: E402
from FreehandUSLib import mrml  # noqa: E402
from FreehandUSLib.jobs import Cancelled, CancelToken  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from sensorless_helpers import tiny_model_config, tiny_sweep  # noqa: E402
from sensorless_helpers import one_torch_thread  # noqa: E402, F401  (autouse fixture)
from FreehandUSLib.mrml_reconstruction import reconstruct_browser_to_volume_node as recon  # noqa: E402
from SensorlessTrackingLib import mrml_tracking as mt  # noqa: E402
from SensorlessTrackingLib.models import build_model  # noqa: E402

pytestmark = pytest.mark.mrml


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


class _StepReports(CancelOnFirstReport):
    """Counts the start (0 of 3) once, not the reports that keep the bar there while the browser is read."""

    def __call__(self, done, total):
        if (done, total) != (0, 3) or self.calls == 0:
            super().__call__(done, total)


def _matrices(seq_node) -> np.ndarray:
    out = []
    for i in range(seq_node.GetNumberOfDataNodes()):
        m = vtk.vtkMatrix4x4()
        seq_node.GetNthDataNode(i).GetMatrixTransformToParent(m)
        out.append(mrml.vtk_to_matrix(m))
    return np.array(out)


def test_cancel_stops_a_learned_estimate_and_keeps_the_earlier_one(scene, tmp_path):
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    path = tmp_path / "tiny.pt"
    torch.save({"model_config": model.config.to_dict(), "state_dict": model.state_dict(), "epoch": 0, "version": 1},
               path)
    browser = mrml.sequence_to_browser(scene, tiny_sweep(seed=3, n_frames=24, length_mm=4.0).sequence,
                                       browser_name="Sweep")
    mt.estimate_trajectory_to_browser(browser, model="decorrelation")
    estimate = mt.find_estimate_sequence(browser)
    earlier = _matrices(estimate)
    before = _node_ids(scene)

    token = CancelToken("estimation")
    reporter = _StepReports(token, after=2)  # cancelled after reading, before the model runs
    _assert_cancelled_fast(
        lambda: mt.estimate_trajectory_to_browser(browser, model=path, batch_size=1, progress=reporter, cancel=token),
        reporter,
    )
    assert _node_ids(scene) == before
    assert mt.find_estimate_sequence(browser) is estimate
    np.testing.assert_array_equal(_matrices(estimate), earlier)

    token = CancelToken("reconstruction")
    reporter = CancelOnFirstReport(token)
    _assert_cancelled_fast(
        lambda: mt.reconstruct_estimated(browser, reconstruct=recon, output_spacing_mm=0.2, progress=reporter,
                                         cancel=token),
        reporter,
    )
    assert _node_ids(scene) == before


def test_cancel_inside_the_model_run(scene):
    """The layer hooks stop a learned model within the batch it is running (not only between the steps)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    model.eval()
    browser = mrml.sequence_to_browser(scene, tiny_sweep(seed=3, n_frames=24, length_mm=4.0).sequence,
                                       browser_name="Sweep")
    before = _node_ids(scene)
    token = CancelToken("estimation")
    calls = []

    def count(_module, _inputs):
        calls.append(token.cancelled)
        if len(calls) == 5:
            threading.Thread(target=token.cancel).start()
            assert token.wait(1.0)

    handles = [m.register_forward_pre_hook(count) for m in model.modules()]
    started = time.perf_counter()
    try:
        with pytest.raises(Cancelled):
            mt.estimate_trajectory_to_browser(browser, model=model, batch_size=1, cancel=token)
    finally:
        for handle in handles:
            handle.remove()
    assert time.perf_counter() - started < 5.0
    assert calls[:5] == [False] * 5 and len(calls) <= 6  # at most the layer already started ran after the cancel
    assert _node_ids(scene) == before and mt.find_estimate_sequence(browser) is None
    assert all(not m._forward_pre_hooks for m in model.modules())  # the estimate's hooks were removed


def test_cancel_stops_a_decorrelation_estimate(scene):
    """The baseline has no hook: the call still returns within the poll and writes nothing."""
    browser = mrml.sequence_to_browser(scene, tiny_sweep(seed=4, n_frames=24, length_mm=4.0).sequence,
                                       browser_name="Sweep")
    before = _node_ids(scene)
    token = CancelToken("estimation")
    reporter = _StepReports(token, after=3)  # 0/3, 1/3 after reading, then the first heartbeat
    _assert_cancelled_fast(
        lambda: mt.estimate_trajectory_to_browser(browser, model="decorrelation", progress=reporter, cancel=token),
        reporter,
    )
    assert reporter.calls == 3
    assert _node_ids(scene) == before and mt.find_estimate_sequence(browser) is None
