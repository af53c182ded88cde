"""The panels' side of cancelling and of the training process, with Qt stand-ins (no real Qt here).

Run in a separate interpreter set up by ``Testing/foundation/fresh_slicer_harness.py`` (real
MRML scene from slicer-core, stand-ins for qt and the parameter node wrapper): the widgets'
progress bar, Cancel button and labels are small fakes that record what the code does with
them. What this cannot cover: Qt's event loop and the real widgets (layout, clicks by a user).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
HARNESS_DIR = REPO_ROOT / "Testing" / "foundation"

pytestmark = pytest.mark.mrml

_PRELUDE = r"""
import json, sys, time, types
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import fresh_slicer_harness as harness
harness.setup_slicer(False, Path(sys.argv[2]))
import slicer

from fresh_slicer_harness import Signal, Widget  # Qt stand-ins for a panel's buttons and bars

messages = harness.capture_messages()
out = {}
"""

_CANCELLABLE_WORK = _PRELUDE + r"""
import FreehandUS
from FreehandUSLib.jobs import Cancelled
scene = slicer.mrmlScene
bar, button, label = Widget(), Widget(), Widget()
before = scene.GetNumberOfNodes()
reports = []
with FreehandUS.CancellableWork(bar, button, "Reconstruction", label) as work:
    out["shown"] = [bar.visible, button.visible, len(button.clicked.slots)]
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "HalfMade")
    work.progress(3, 10)
    out["bar"] = [bar.value, bar.maximum]
    button.clicked.emit()              # the user presses Cancel
    work.progress(4, 10)               # the Lib's next report stops the work
    out["after_cancel_ran"] = True
out["nodes_restored"] = scene.GetNumberOfNodes() == before
out["hidden"] = [bar.visible, button.visible, len(button.clicked.slots)]
out["label"] = label.text
out["messages"] = messages
try:
    with FreehandUS.CancellableWork(bar, button, "Reconstruction", label):
        scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Failed")
        raise ValueError("a real error")
except ValueError:
    out["error_propagates"] = True
out["error_nodes_restored"] = scene.GetNumberOfNodes() == before
print(json.dumps(out))
"""

_TRAINING_PANEL = _PRELUDE + r"""
import SensorlessTracking
from FreehandUSLib.jobs import ProcessJob

def panel():
    w = SensorlessTracking.SensorlessTrackingWidget.__new__(SensorlessTracking.SensorlessTrackingWidget)
    w.ui = types.SimpleNamespace(trainProgressBar=Widget(), cancelTrainButton=Widget(), trainStatusLabel=Widget())
    w._parameterNode = types.SimpleNamespace(modelChoice=None, modelPath=None)
    w._trainTimer = types.SimpleNamespace(stop=lambda: None, start=lambda: None)
    w._updateButtons = lambda *a: None
    return w

EVENTS = '''
import json, sys, time
for line in [{"event": "started", "pid": 0, "epochs": 2},
             {"event": "progress", "done": 1, "total": 2, "train_loss": 0.5, "val_loss": 0.6},
             {"event": "progress", "done": 2, "total": 2, "train_loss": 0.4, "val_loss": 0.5},
             {"event": "done", "checkpoint": sys.argv[1]}]:
    print(json.dumps(line), flush=True)
'''
w = panel()
w._trainJob = ProcessJob([sys.executable, "-c", EVENTS, "/models/run/best.pt"])
deadline = time.monotonic() + 60
while w._trainJob is not None and time.monotonic() < deadline:
    w.onTrainTimer()
    time.sleep(0.02)
out["finished"] = w._trainJob is None
out["model"] = [str(w._parameterNode.modelChoice), str(w._parameterNode.modelPath)]
out["status"] = w.ui.trainStatusLabel.text
out["bar"] = [w.ui.trainProgressBar.value, w.ui.trainProgressBar.maximum, w.ui.trainProgressBar.visible]

SLOW = 'import json, time\nprint(json.dumps({"event": "progress", "done": 1, "total": 9}), flush=True)\ntime.sleep(120)\n'
w = panel()
job = ProcessJob([sys.executable, "-c", SLOW])
w._trainJob = job
while not w.ui.trainStatusLabel.text and time.monotonic() < deadline:
    w.onTrainTimer()
    time.sleep(0.02)
started = time.monotonic()
w.onCancelTrainButton()
out["cancel_s"] = time.monotonic() - started
out["cancelled"] = [job.cancelled, job.returncode is not None, w._trainJob is None]
out["cancel_status"] = w.ui.trainStatusLabel.text
print(json.dumps(out))
"""


_WAIT_FOR_KERNELS = _PRELUDE + r"""
import FreehandUS
from FreehandUSLib.jobs import ProcessJob

WARM = 'import json, time\nfor i in (1, 2, 3):\n    print(json.dumps({"event": "progress", "done": i, "total": 3}), flush=True)\n    time.sleep(0.2)\n'
w = FreehandUS.FreehandUSWidget.__new__(FreehandUS.FreehandUSWidget)
w.ui = types.SimpleNamespace(reconstructionProgressBar=Widget(), cancelReconstructionButton=Widget(),
                             reconstructionStatusLabel=Widget())
w._warmJob = ProcessJob([sys.executable, "-c", WARM])
seen = []
with FreehandUS.CancellableWork(w.ui.reconstructionProgressBar, w.ui.cancelReconstructionButton, "Reconstruction",
                                w.ui.reconstructionStatusLabel) as work:
    original = work.progress
    work.progress = lambda d, t: (seen.append((d, t)), original(d, t))
    w._waitForKernels(work)
out["waited_until_done"] = not w._warmJob.running
out["reported"] = sorted({d for d, t in seen if t == 3})

w._warmJob = ProcessJob([sys.executable, "-c", 'import time; time.sleep(60)'])
started = time.monotonic()
with FreehandUS.CancellableWork(w.ui.reconstructionProgressBar, w.ui.cancelReconstructionButton, "Reconstruction",
                                w.ui.reconstructionStatusLabel) as work:
    w.ui.cancelReconstructionButton.clicked.emit()   # Cancel while waiting for the kernels
    w._waitForKernels(work)
    out["after_wait_ran"] = True
out["cancel_s"] = time.monotonic() - started
out["label"] = w.ui.reconstructionStatusLabel.text
w._warmJob.cancel()
print(json.dumps(out))
"""


def _run(script: str, tmp_path) -> dict:
    pytest.importorskip("slicer")
    run = subprocess.run([sys.executable, "-c", script, str(HARNESS_DIR), str(tmp_path)], capture_output=True,
                         text=True, timeout=300, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_cancellable_work_cancels_hides_and_rolls_back(tmp_path):
    out = _run(_CANCELLABLE_WORK, tmp_path)
    assert out["shown"] == [True, True, 1]
    assert out["bar"] == [3, 10]
    assert "after_cancel_ran" not in out  # the report after Cancel raised
    assert out["nodes_restored"] and out["error_nodes_restored"] and out["error_propagates"]
    assert out["hidden"] == [False, False, 0]  # the button is disconnected again
    assert out["label"] == "Reconstruction was cancelled; nothing was written"
    assert out["messages"] == [out["label"]]


def test_training_panel_follows_the_process_and_cancels_it(tmp_path):
    out = _run(_TRAINING_PANEL, tmp_path)
    assert out["finished"]
    assert out["model"] == ["ModelChoice.FILE", "/models/run/best.pt"]
    assert out["status"].startswith("Model written to /models/run/best.pt")
    assert out["bar"] == [2, 2, False]
    assert out["cancel_s"] < 1.0 and out["cancelled"] == [True, True, True]
    assert "Training cancelled" in out["cancel_status"]


def test_reconstruct_waits_for_the_kernels_warm_up_and_cancel_works_meanwhile(tmp_path):
    out = _run(_WAIT_FOR_KERNELS, tmp_path)
    assert out["waited_until_done"] and out["reported"] == [1, 2, 3]
    assert "after_wait_ran" not in out and out["cancel_s"] < 1.0
    assert out["label"] == "Reconstruction was cancelled; nothing was written"
