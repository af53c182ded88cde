"""The N-Wire Calibration panel's Info, Detect and Calibrate buttons: Cancel while the recordings are read
(issue 22 item 5), with Qt stand-ins.

Runs in a separate interpreter set up by ``Testing/foundation/fresh_slicer_harness.py`` (real
MRML scene from slicer-core, stand-ins for qt and the parameter node wrapper). The user's click
on Cancel is played when the work lets Slicer handle events (``slicer.app.processEvents``, which
the panel's progress calls), as a real click would be delivered; the click comes at the second
event of the work, while the calibration recording is read. Checked: the read runs inside the
panel's progress and Cancel (the click is seen), detection never starts, the nodes the panel
made for the outputs are removed again, the bar and the button are hidden and the status says
it was cancelled; without a click each button completes. What this cannot cover: Qt's event loop
and the real widgets.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.mrml

_SCRIPT = r"""
import json, sys, types
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import fresh_slicer_harness as harness
harness.setup_slicer(False, Path(sys.argv[2]))
import slicer

from fresh_slicer_harness import Signal, Widget  # Qt stand-ins for a panel's buttons and bars

messages = harness.capture_messages()
slicer.app.setOverrideCursor = lambda *a: None
slicer.app.restoreOverrideCursor = lambda: None
import qt
qt.Qt = types.SimpleNamespace(WaitCursor=0)
events = {"count": 0, "click_at": None}

def process_events():  # the user clicks Cancel once the work has let events run click_at times
    events["count"] += 1
    if events["click_at"] is not None and events["count"] == events["click_at"]:
        w.ui.cancelCalibrationButton.clicked.emit()

slicer.app.processEvents = process_events

from FreehandUSLib import mrml
from NWireCalibrationLib import mrml_calibration as mc
from nwire_synthetic import setup_for, small_simulation
import NWireCalibration as nw

detections = []
detect = mc.detect_sequence
def recording_detect(sequence, *args, **kwargs):
    detections.append(sequence.n_frames)
    return detect(sequence, *args, **kwargs)
mc.detect_sequence = recording_detect

scene = slicer.mrmlScene
sim = small_simulation("linear", 50.0, n_frames=30)
val = small_simulation("linear", 50.0, n_frames=12, seed=9)
cal_browser = mrml.sequence_to_browser(scene, sim.sequence, browser_name="Calibration")
val_browser = mrml.sequence_to_browser(scene, val.sequence, browser_name="Validation")
registration = mrml.transform_to_node(scene, sim.phantom_to_reference, name="PhantomToReference")

w = nw.NWireCalibrationWidget.__new__(nw.NWireCalibrationWidget)
w.ui = types.SimpleNamespace(calibrationProgressBar=Widget(), cancelCalibrationButton=Widget(),
                             calibrationResultLabel=Widget(), detectionStatusLabel=Widget(), inputInfoLabel=Widget())
w.logic = nw.NWireCalibrationLogic()
plots = []
w.logic.showResidualPlot = lambda node: plots.append(node.GetName())
w.logic.showDetection = lambda browser: None
w._updateButtons = lambda *a: None
class Parameters:
    # The parameter node wrapper's stand-in: node parameters are references of a real parameter node,
    # so a node the rollback removes reads None afterwards (MRML drops references to removed nodes).
    NODES = ("calibrationBrowser", "validationBrowser", "phantomToReference", "imageToProbe", "accuracyTable",
             "residualsTable", "residualsChart", "rejectionsTable", "detectedDots")
    def __init__(self, **values):
        self.__dict__["_node"] = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "NWireCalibration")
        for key, value in values.items():
            setattr(self, key, value)
    def __getattr__(self, name):
        if name in Parameters.NODES:
            return self._node.GetNodeReference(name)
        raise AttributeError(name)
    def __setattr__(self, name, value):
        if name in Parameters.NODES:
            self._node.SetNodeReferenceID(name, None if value is None else value.GetID())
        else:
            self.__dict__[name] = value

w._parameterNode = Parameters(
    calibrationBrowser=cal_browser, validationBrowser=val_browser, configPath=None, phantom=nw.Phantom.FCAL_2_0,
    phantomToReference=registration, pixelSpacingMm=setup_for(sim).pixel_spacing_mm[0], detector=nw.Detector.HESSIAN,
    solver=nw.Solver.LSQ, phantomPose=nw.PhantomPose.KNOWN)
p = w._parameterNode
out = {}

def widgets():
    return [w.ui.calibrationProgressBar.visible, w.ui.cancelCalibrationButton.visible,
            len(w.ui.cancelCalibrationButton.clicked.slots)]

for button, label in (("onInputInfoButton", "inputInfoLabel"), ("onDetectButton", "detectionStatusLabel"),
                      ("onCalibrateButton", "calibrationResultLabel")):
    before = scene.GetNumberOfNodes()
    events.update(count=0, click_at=2)   # Cancel while the calibration recording is read
    getattr(w, button)()
    out[button] = {"clicked_at": events["count"], "nodes_restored": scene.GetNumberOfNodes() == before,
                   "outputs": [n for n in Parameters.NODES if getattr(p, n) is not None],
                   "detections": list(detections), "label": getattr(w.ui, label).text, "widgets": widgets()}

events.update(count=0, click_at=None)    # without Cancel each completes
w.onInputInfoButton()
out["info"] = w.ui.inputInfoLabel.text
w.onDetectButton()
out["detected"] = [list(detections), p.detectedDots.GetNumberOfControlPoints() > 0]
detections.clear()
w.onCalibrateButton()
out["calibrated"] = [list(detections), p.imageToProbe.GetAttribute(mc.ATTR_SOLVER), plots,
                     w.ui.calibrationResultLabel.text.split(chr(10))[0], widgets()]
out["messages"] = messages
print(json.dumps(out))
"""


def test_cancel_while_the_panel_reads_the_recordings(tmp_path):
    pytest.importorskip("slicer")
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(REPO_ROOT / "Testing" / "foundation"), str(tmp_path)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    for button, what in (("onInputInfoButton", "Reading the recordings"), ("onDetectButton", "Dot detection"),
                         ("onCalibrateButton", "Calibration")):
        cancelled = out[button]
        assert cancelled["clicked_at"] == 2, button  # the work stopped at the event where Cancel was clicked
        assert cancelled["detections"] == [], button  # detection never started
        assert cancelled["nodes_restored"], button  # DetectedDots, ImageToProbe, tables, plot removed again
        assert cancelled["outputs"] == ["calibrationBrowser", "validationBrowser", "phantomToReference"], button
        assert cancelled["label"] == f"{what} was cancelled; nothing was written"
        assert cancelled["widgets"] == [False, False, 0], button
    assert "Calibration:" in out["info"] and "Validation:" in out["info"]
    assert out["detected"] == [[30], True]
    detections, solver, plots, first_line, widgets = out["calibrated"]
    assert detections == [30, 12] and solver == "lsq" and len(plots) == 1
    assert first_line and "cancelled" not in first_line and widgets == [False, False, 0]
    assert not [m for m in out["messages"] if m.startswith("ERROR")]
