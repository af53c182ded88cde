"""The Freehand US panel's Load and Save buttons: progress and a Cancel that leaves scene and files
as they were (issue 22 item 5), with Qt stand-ins.

Runs in a separate interpreter set up by ``fresh_slicer_harness.py`` (real MRML scene from
slicer-core, stand-ins for qt and the parameter node wrapper). The user's click on Cancel is
played when the work lets Slicer handle events (``slicer.app.processEvents``, which the panel's
progress calls), as a real click would be delivered. What this cannot cover: Qt's event loop
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
        w.ui.cancelRecordingButton.clicked.emit()

slicer.app.processEvents = process_events

import FreehandUS
w = FreehandUS.FreehandUSWidget.__new__(FreehandUS.FreehandUSWidget)
w.ui = types.SimpleNamespace(recordingProgressBar=Widget(), cancelRecordingButton=Widget(), infoLabel=Widget())
w.logic = FreehandUS.FreehandUSLogic()
recording, target = Path(sys.argv[3]), Path(sys.argv[4])
w._parameterNode = types.SimpleNamespace(sequencePath=recording, imageToProbe=None, inputBrowser=None,
                                         outputSequencePath=target)
scene = slicer.mrmlScene
out = {}

before = scene.GetNumberOfNodes()
events["click_at"] = 2                    # Cancel while the file is read
w.onLoadButton()
out["load_cancelled"] = [scene.GetNumberOfNodes() == before, w._parameterNode.inputBrowser is None,
                         w.ui.infoLabel.text, w.ui.recordingProgressBar.visible, w.ui.cancelRecordingButton.visible]
events.update(count=0, click_at=None)
w.onLoadButton()
browser = w._parameterNode.inputBrowser
out["loaded"] = [browser is not None and browser.GetName(), scene.GetNumberOfNodes() > before,
                 w.ui.recordingProgressBar.value]

nodes = scene.GetNumberOfNodes()
target.write_bytes(b"an earlier recording")
events.update(count=0, click_at=3)        # Cancel while the browser is read for saving
w.onSaveButton()
out["save_cancelled"] = [target.read_bytes() == b"an earlier recording", w.ui.infoLabel.text,
                         sorted(p.name for p in target.parent.iterdir()), scene.GetNumberOfNodes() == nodes]
events.update(count=0, click_at=None)
w.onSaveButton()
out["saved"] = [target.read_bytes()[:10].decode(errors="replace"), browser.GetAttribute(FreehandUS.SAVED_FILE_ATTRIBUTE)]
out["messages"] = messages
print(json.dumps(out))
"""


def test_load_and_save_buttons_cancel_and_complete(tmp_path):
    pytest.importorskip("slicer")
    from FreehandUSLib.simulation.analytic import simulate_analytic_sweep
    from FreehandUSLib.io import write_sequence

    seq, _ = simulate_analytic_sweep(n_frames=60, n_rows=48, n_cols=40, pixel_spacing_mm=0.5)
    recording = write_sequence(seq, tmp_path / "Sweep.igs.mha")
    (tmp_path / "out").mkdir()
    target = tmp_path / "out" / "Saved.igs.mha"
    run = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(REPO_ROOT / "Testing" / "foundation"), str(tmp_path), str(recording),
         str(target)],
        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["load_cancelled"] == [True, True, "Loading was cancelled; nothing was written", False, False]
    assert out["loaded"][0] == "Sweep" and out["loaded"][1]
    assert out["save_cancelled"] == [True, "Saving was cancelled; nothing was written", ["Saved.igs.mha"], True]
    assert out["saved"] == ["ObjectType", str(target)]
    assert "Loading was cancelled; nothing was written" in out["messages"]
