"""Reading the recording of a sensorless estimate reports progress and can be cancelled (issue 22, item 5).

On slicer-core: reading a long browser into arrays takes seconds, so the estimate's read reports
(0 of 3: the bar stays at its start, as the reconstruction's read does) and checks the cancel every
few frames. A cancel at a chosen report during
the read stops within a second, before the model runs, and leaves the scene as it was: no new
node, the browser's synchronized sequences (and an earlier estimate) untouched.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")
torch = pytest.importorskip("torch")

import vtk  # noqa: E402  (slicer-core pins it)
from cancel_helpers import CancelOnFirstReport, assert_cancelled_fast, node_ids  # noqa: E402
from FreehandUSLib import mrml  # noqa: E402
from FreehandUSLib.jobs import CancelToken  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from sensorless_helpers import tiny_model_config, tiny_sweep  # noqa: E402
from sensorless_helpers import one_torch_thread  # noqa: E402, F401  (autouse fixture)
from SensorlessTrackingLib import mrml_tracking as mt  # noqa: E402
from SensorlessTrackingLib.models import build_model  # noqa: E402

pytestmark = pytest.mark.mrml

N_FRAMES = 64  # frames and tracking items: several read reports (every 16)


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


class _Recorder(CancelOnFirstReport):
    """CancelOnFirstReport that also keeps every (done, total) it was given."""

    def __init__(self, token, *, after: int):
        super().__init__(token, after=after)
        self.reports = []

    def __call__(self, done, total):
        self.reports.append((done, total))
        super().__call__(done, total)


def _counting_model():
    """A tiny learned model and the list its forward pre-hook appends to (one entry per layer call)."""
    torch.manual_seed(0)
    model = build_model(tiny_model_config())
    model.eval()
    calls = []
    handles = [m.register_forward_pre_hook(lambda _m, _i: calls.append(1)) for m in model.modules()]
    return model, calls, handles


def _matrices(seq_node) -> np.ndarray:
    out = []
    for i in range(seq_node.GetNumberOfDataNodes()):
        m = vtk.vtkMatrix4x4()
        seq_node.GetNthDataNode(i).GetMatrixTransformToParent(m)
        out.append(mrml.vtk_to_matrix(m))
    return np.array(out)


def _browser_state(browser) -> dict:
    """What a cancelled estimate must leave as it was: the synchronized sequences, their items, their times."""
    coll = vtk.vtkCollection()
    browser.GetSynchronizedSequenceNodes(coll, True)  # the master sequence too
    sequences = [coll.GetItemAsObject(i) for i in range(coll.GetNumberOfItems())]
    return {
        "browser_mtime": browser.GetMTime(),
        "sequences": [
            (s.GetID(), s.GetNumberOfDataNodes(), s.GetMTime(), tuple(s.GetAttributeNames())) for s in sequences
        ],
    }


def test_cancel_while_the_browser_is_read_stops_before_the_model_runs(scene):
    browser = mrml.sequence_to_browser(scene, tiny_sweep(seed=3, n_frames=N_FRAMES, length_mm=6.0).sequence,
                                       browser_name="Sweep")
    mt.estimate_trajectory_to_browser(browser, model="decorrelation")  # an earlier estimate to keep
    estimate = mt.find_estimate_sequence(browser)
    earlier = _matrices(estimate)
    before_nodes = node_ids(scene)
    before = _browser_state(browser)

    model, layer_calls, handles = _counting_model()
    token = CancelToken("estimation")
    reporter = _Recorder(token, after=4)  # (0, 3) at the start, then the read's third report (0, 3)
    try:
        assert_cancelled_fast(
            lambda: mt.estimate_trajectory_to_browser(browser, model=model, batch_size=1, progress=reporter,
                                                      cancel=token),
            reporter,
        )
    finally:
        for handle in handles:
            handle.remove()
    assert reporter.calls == 4  # stopped at the report where it was cancelled
    assert reporter.reports == [(0, 3)] * 4  # all but the first came from the read (not 1 of 3: read)
    assert layer_calls == []  # the model never ran
    assert node_ids(scene) == before_nodes
    assert _browser_state(browser) == before
    assert mt.find_estimate_sequence(browser) is estimate
    np.testing.assert_array_equal(_matrices(estimate), earlier)
    assert all(not m._forward_pre_hooks for m in model.modules())  # the estimate added no hook that stayed


def test_the_read_reports_before_read_is_reported(scene):
    """Without a cancel: the read reports every few frames (0 of 3), then 1, 2, 3 of 3; one total, never back."""
    browser = mrml.sequence_to_browser(scene, tiny_sweep(seed=5, n_frames=N_FRAMES, length_mm=6.0).sequence,
                                       browser_name="Sweep")
    reports = []
    mt.estimate_trajectory_to_browser(browser, model="decorrelation", progress=lambda d, t: reports.append((d, t)),
                                      cancel=CancelToken("estimation"))
    reading = reports.index((1, 3)) - 1  # the reports between the start and "read"
    assert reading >= N_FRAMES // 16  # a report every 16 frames at least
    assert reports[: reading + 1] == [(0, 3)] * (reading + 1)
    assert {t for _d, t in reports} == {3} and [d for d, _t in reports] == sorted(d for d, _t in reports)
    assert reports[-1] == (3, 3)


# -- the panel: Estimate and Info, with the Qt stand-ins of Testing/jobs/test_module_widgets.py --------------

_PANEL = r"""
import contextlib, json, sys, types
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import fresh_slicer_harness as harness
harness.setup_slicer(False, Path(sys.argv[2]))
sys.path.insert(0, str(harness.REPO_ROOT / "Testing" / "sensorless"))
import slicer
import SensorlessTracking
from FreehandUSLib import mrml
from SensorlessTrackingLib import mrml_tracking as mt
from sensorless_helpers import tiny_sweep

CANCEL_AT = int(sys.argv[3])  # the bar update (of those showing the read) at which the user presses Cancel

from fresh_slicer_harness import Signal, Widget  # Qt stand-ins for a panel's buttons and bars

class Bar(Widget):
    # Records what it shows; the user presses Cancel at the CANCEL_AT-th update showing a read:
    # after the first, 0 of 3 (the estimate's read) or not k of 3 (Info's read).
    def __init__(self, button):
        super().__init__()
        self.button, self.shown, self.reads = button, [], 0
    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        if name == "value" and getattr(self, "button", None) is not None and self.visible:
            self.shown.append([value, self.maximum])
            if len(self.shown) > 1 and (value == 0 or self.maximum != 3):
                self.reads += 1
                if self.reads == CANCEL_AT:
                    self.button.clicked.emit()

messages = []

@contextlib.contextmanager
def tryWithErrorDisplay(message=None, show=True, waitCursor=False):
    # Slicer's: an error ends here, shown in a box (no wait cursor: qt is a stand-in)
    try:
        yield
    except Exception as exc:
        messages.append(f"ERROR {message} {exc}")

slicer.util.tryWithErrorDisplay = tryWithErrorDisplay
slicer.util.showStatusMessage = lambda text, msec=0: messages.append(text)
slicer.util.errorDisplay = lambda text, **kw: messages.append("ERROR " + text)
ran, plotted = [], []
original = mt.track_sequence
mt.track_sequence = lambda *a, **k: (ran.append(1), original(*a, **k))[1]

scene = slicer.mrmlScene
browser = mrml.sequence_to_browser(scene, tiny_sweep(seed=3, n_frames=64, length_mm=6.0).sequence, browser_name="Sweep")

def ids():
    return sorted(scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes()))

def panel():
    w = SensorlessTracking.SensorlessTrackingWidget.__new__(SensorlessTracking.SensorlessTrackingWidget)
    button = Widget()
    w.ui = types.SimpleNamespace(estimateProgressBar=Bar(button), cancelEstimateButton=button, resultsLabel=Widget(),
                                 inputInfoLabel=Widget())
    w._parameterNode = types.SimpleNamespace(
        inputBrowser=browser, modelChoice=SensorlessTracking.ModelChoice.DECORRELATION, modelPath=None, spacingMm=0.0,
        imageToProbe=None, device=types.SimpleNamespace(value="cpu"), batchSize=8, mirrorAverage=False,
        sweepDirection=types.SimpleNamespace(value="toward"))
    w.logic = SensorlessTracking.SensorlessTrackingLogic()
    w.logic.trajectoryPlot = lambda node, **kw: plotted.append(node.GetName())  # the plot needs slicer.modules
    return w

out = {}
before = ids()
w = panel()
w.onEstimateButton()
out["estimate"] = {"shown": w.ui.estimateProgressBar.shown, "ran": len(ran), "same_nodes": ids() == before,
                   "estimate": mt.find_estimate_sequence(browser) is not None, "label": w.ui.resultsLabel.text,
                   "plotted": list(plotted),
                   "hidden": [w.ui.estimateProgressBar.visible, w.ui.cancelEstimateButton.visible]}
w = panel()
w.onInputInfoButton()
out["info"] = {"shown": w.ui.estimateProgressBar.shown, "same_nodes": ids() == before,
               "label": w.ui.inputInfoLabel.text}
out["messages"] = messages
print(json.dumps(out))
"""


def _run_panel(tmp_path, cancel_at: int) -> dict:
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-c", _PANEL, str(repo / "Testing" / "foundation"), str(tmp_path), str(cancel_at)],
        capture_output=True, text=True, timeout=300, cwd=repo,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_panel_cancel_while_the_estimate_reads_the_browser(tmp_path):
    """Cancel pressed while the bar shows the read: the estimate stops there, the model never runs, no node stays."""
    out = _run_panel(tmp_path, cancel_at=2)
    est = out["estimate"]
    assert est["shown"][0] == [0, 3]
    assert est["shown"] == [[0, 3]] * 3, est["shown"]  # the start, then two reports of the read
    assert est["ran"] == 0 and est["same_nodes"] and not est["estimate"] and est["plotted"] == []
    assert est["label"] == "Trajectory estimation was cancelled; nothing was written"
    assert est["hidden"] == [False, False]
    info = out["info"]  # the Info button reads the same browser with the same bar and Cancel
    assert len(info["shown"]) == 3 and all(v < m for v, m in info["shown"]), info["shown"]  # cancelled mid-read
    assert info["label"] == "Reading the recording was cancelled; nothing was written" and info["same_nodes"]
    assert not any(m.startswith("ERROR") for m in out["messages"])


def test_panel_estimate_and_info_without_cancel(tmp_path):
    """Cancel never pressed: the bar goes through the read to 3 of 3 and the estimate is written; Info completes."""
    out = _run_panel(tmp_path, cancel_at=10**6)
    est = out["estimate"]
    assert est["ran"] == 1 and est["estimate"] and not est["same_nodes"] and est["plotted"] == ["Sweep"]
    assert est["shown"][-1] == [3, 3] and est["shown"].count([0, 3]) >= 1 + 64 // 16
    assert "cancelled" not in out["info"]["label"] and out["info"]["label"]
    assert not any(m.startswith("ERROR") for m in out["messages"])
