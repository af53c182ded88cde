"""PLUS INVALID tracking kept through File > Save when no FreehandUS module read the recording
(issue 22 item 3, the case the first fix left open), on real MRML classes (slicer-core).

A user opens a PLUS ``.igs.mha`` with File > Add Data (Slicer's
``vtkMRMLLinearTransformSequenceStorageNode`` reads it and drops ``TransformStatus``) and saves
the scene at once: Slicer's ``.seq.mha`` writer writes the lost frames ``OK`` and the storage
node now points to that file. ``FreehandUSLib.plus_status_observer`` (installed by the Freehand
US module when Slicer has started) marks the INVALID frames as soon as the reader has read the
file, so they stay invalid in the reopened scene and reconstruction skips them.

Here the real storage node reads the file inside a scene that the observer watches (the events
are the ones the real classes fire), the scene is written with Slicer's default writers and
opened again (``mrml_scene``); nothing calls ``browser_to_sequence`` before the save. The last
test does the start-up itself: the Freehand US module file in a fresh Slicer (the extension's
packages hidden), its ``startupCompleted()`` slot, then the same load and save.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

from FreehandUSLib import mrml  # noqa: E402
from FreehandUSLib import mrml_reconstruction as mr  # noqa: E402
from FreehandUSLib import plus_status_observer  # noqa: E402
from FreehandUSLib.simulation.analytic import simulate_analytic_sweep  # noqa: E402
from FreehandUSLib.io import write_sequence  # noqa: E402
from FreehandUSLib.reconstruction import ReconstructionOptions  # noqa: E402
from mrml_scene import load_plus_like_slicer, make_scene, release_scene, reload_scene, save_like_slicer  # noqa: E402

pytestmark = pytest.mark.mrml

REPO_ROOT = Path(__file__).resolve().parents[2]
LOST = [4, 9, 10]


@pytest.fixture
def scenes():
    made = []
    yield made
    for scene in made:
        release_scene(scene)


def _plus_file_with_lost_tracking(folder: Path):
    """A PLUS recording whose probe was not seen on frames LOST (PLUS writes a matrix and INVALID)."""
    seq, image_to_probe = simulate_analytic_sweep(n_frames=16, n_rows=40, n_cols=32, pixel_spacing_mm=0.5)
    seq.transforms["ProbeToTracker"].valid[LOST] = False
    seq.transforms["ProbeToTracker"].matrices[LOST] = np.eye(4)
    folder.mkdir(parents=True, exist_ok=True)
    path = write_sequence(seq, folder / "Lost.igs.mha")
    header = path.read_bytes()[:40000].decode(errors="replace")
    assert f"Seq_Frame{LOST[0]:04d}_ProbeToTrackerTransformStatus = INVALID" in header
    return path, seq, image_to_probe


def _only(scene, class_name):
    nodes = scene.GetNodesByClass(class_name)
    assert nodes.GetNumberOfItems() == 1, f"{nodes.GetNumberOfItems()} {class_name} nodes"
    return nodes.GetItemAsObject(0)


def _probe_sequence(scene):
    nodes = scene.GetNodesByClass("vtkMRMLSequenceNode")
    found = [
        nodes.GetItemAsObject(i)
        for i in range(nodes.GetNumberOfItems())
        if nodes.GetItemAsObject(i).GetAttribute(mrml.ATTR_SEQUENCES_SOURCE) == "ProbeToTracker"
    ]
    assert len(found) == 1
    return found[0]


def _assert_reopened_scene_skips_the_lost_frames(saved: Path, image_to_probe, cache: Path, scenes):
    """Slicer's writer wrote the lost frames OK; the reopened scene still reads them invalid and
    the reconstruction skips exactly them."""
    (probe_file,) = saved.parent.glob("*ProbeToTracker*.seq.mha")
    written = probe_file.read_text(errors="replace")
    assert f"Seq_Frame{LOST[0]:04d}_ProbeToTrackerTransformStatus = OK" in written
    assert "INVALID" not in written  # the file itself no longer knows
    reopened = reload_scene(saved, cache)
    scenes.append(reopened)
    browser = _only(reopened, "vtkMRMLSequenceBrowserNode")
    assert _probe_sequence(reopened).GetStorageNode().GetFileName() == str(probe_file)
    back = mrml.browser_to_sequence(browser)
    assert np.flatnonzero(~back.transforms["ProbeToTracker"].valid).tolist() == LOST
    calibration = mrml.transform_to_node(reopened, image_to_probe, name="ImageToProbe")
    opts = ReconstructionOptions(output_spacing_mm=(1.0, 1.0, 1.0), image_to_reference_transform="ImageToTracker")
    result = mr.reconstruct_browser_to_volume_node(browser, image_to_probe_node=calibration, options=opts)
    assert sorted(result.frames_skipped) == LOST
    assert result.frames_used == back.n_frames - len(LOST)


def test_add_data_then_save_keeps_invalid_frames_without_any_module_reading(scenes, tmp_path):
    path, seq, image_to_probe = _plus_file_with_lost_tracking(tmp_path / "recordings")
    scene = make_scene(tmp_path / "cache-1")
    scenes.append(scene)
    observer = plus_status_observer.observe(scene)  # what the module does when Slicer has started

    load_plus_like_slicer(scene, path)  # File > Add Data: Slicer's storage node reads the file

    probe = _probe_sequence(scene)
    assert probe.GetStorageNode().GetID() in observer.watched_storage_ids
    assert probe.GetNumberOfDataNodes() == seq.n_frames  # the reader kept the lost frames' matrices
    expected = [probe.GetNthIndexValue(i) for i in LOST]
    assert probe.GetAttribute(mrml.ATTR_INVALID_ITEMS).split() == expected
    # File > Save at once, with Slicer's writers; then File > Open.
    saved = save_like_slicer(scene, tmp_path / "saved" / "Scene.mrml")
    assert mrml.ATTR_INVALID_ITEMS in saved.read_text()
    _assert_reopened_scene_skips_the_lost_frames(saved, image_to_probe, tmp_path / "cache-2", scenes)


def test_scene_file_referring_to_the_plus_file_is_marked_when_opened(scenes, tmp_path):
    """File > Open of a scene whose transform sequence is stored in the PLUS file itself (saved
    before, without the observer): the reader reads it at Import, the observer marks it."""
    path, _seq, image_to_probe = _plus_file_with_lost_tracking(tmp_path / "recordings")
    scene = make_scene(tmp_path / "cache-1")
    scenes.append(scene)
    load_plus_like_slicer(scene, path)
    assert _probe_sequence(scene).GetAttribute(mrml.ATTR_INVALID_ITEMS) is None  # nothing observed it
    first = save_like_slicer(scene, tmp_path / "first" / "Scene.mrml")
    _probe_sequence(scene).GetStorageNode().SetFileName(str(path))  # the probe stays in the PLUS file
    assert scene.Commit()
    assert path.name in first.read_text()

    opened = make_scene(tmp_path / "cache-2")
    scenes.append(opened)
    plus_status_observer.observe(opened)
    opened.SetURL(str(first))
    assert opened.Import() == 1
    probe = _probe_sequence(opened)
    assert probe.GetAttribute(mrml.ATTR_INVALID_ITEMS).split() == [probe.GetNthIndexValue(i) for i in LOST]

    saved = save_like_slicer(opened, tmp_path / "saved" / "Scene.mrml")
    _assert_reopened_scene_skips_the_lost_frames(saved, image_to_probe, tmp_path / "cache-3", scenes)


def test_observer_reads_only_after_a_read_and_stops_when_removed(scenes, tmp_path, monkeypatch):
    path, _seq, _image_to_probe = _plus_file_with_lost_tracking(tmp_path / "recordings")
    scene = make_scene(tmp_path / "cache")
    scenes.append(scene)
    observer = plus_status_observer.observe(scene)
    assert plus_status_observer.observe(scene) is observer  # one per scene, however often called
    calls = []
    real = mrml.mark_plus_invalid_items
    monkeypatch.setattr(mrml, "mark_plus_invalid_items", lambda node: calls.append(node.GetName()) or real(node))

    load_plus_like_slicer(scene, path)
    assert len(calls) == 1  # once, when the read finished (not per item, not at SetFileName)
    storage = _probe_sequence(scene).GetStorageNode()
    storage.SetFileName(str(tmp_path / "elsewhere.seq.mha"))  # what File > Save does first
    assert len(calls) == 1

    scene.RemoveNode(storage)
    assert storage.GetID() not in observer.watched_storage_ids
    observer.remove()
    assert observer.watched_storage_ids == []
    again = make_scene(tmp_path / "cache-2")
    scenes.append(again)
    load_plus_like_slicer(again, path)
    assert len(calls) == 1  # another scene is not observed


def test_observer_marks_sequences_already_read_when_installed(scenes, tmp_path):
    path, _seq, _image_to_probe = _plus_file_with_lost_tracking(tmp_path / "recordings")
    scene = make_scene(tmp_path / "cache")
    scenes.append(scene)
    load_plus_like_slicer(scene, path)  # loaded before the module was (a module loaded later)
    plus_status_observer.observe(scene)
    probe = _probe_sequence(scene)
    assert probe.GetAttribute(mrml.ATTR_INVALID_ITEMS).split() == [probe.GetNthIndexValue(i) for i in LOST]


def test_observe_refuses_what_is_not_a_scene():
    with pytest.raises(TypeError, match="expected a vtkMRMLScene"):
        plus_status_observer.PlusStatusObserver(None)


FRESH_SLICER_STARTUP = r"""
import json, sys
from pathlib import Path
sys.path.insert(0, {testing!r})
sys.path.insert(0, {foundation!r})
import fresh_slicer_harness as harness
harness._hide(harness.REPO_ROOT / "FreehandUS" / "Resources" / "requirements.txt")
slicer = harness.setup_slicer(False, Path({tmp!r}))
slots = {{}}
slicer.app.connect = lambda signal, slot: slots.setdefault(signal, []).append(slot)
import FreehandUS
class Parent:
    pass
module = FreehandUS.FreehandUS(Parent())
names = [getattr(s, "__name__", "") for s in slots.get("startupCompleted()", [])]
for slot in slots.get("startupCompleted()", []):
    if getattr(slot, "__name__", "") != "registerSampleData":  # SampleData is not in slicer-core
        slot()
from mrml_scene import load_plus_like_slicer, save_like_slicer
load_plus_like_slicer(slicer.mrmlScene, {plus!r})
save_like_slicer(slicer.mrmlScene, {saved!r})
print(json.dumps({{"slots": names, "premature_import": harness.EVENTS["premature_import"],
                  "hidden": sorted(harness.HIDDEN_IMPORTS)}}))
"""


@pytest.mark.slow
def test_module_installs_the_observer_at_startup_in_a_fresh_slicer(scenes, tmp_path):
    """The Freehand US module file, constructed as Slicer does at start-up, with numba, OpenCV,
    pynrrd and h5py not installed: its startupCompleted() slot installs the observer, which
    imports none of them; a load + File > Save then keeps the lost frames."""
    path, _seq, image_to_probe = _plus_file_with_lost_tracking(tmp_path / "recordings")
    saved = tmp_path / "saved" / "Scene.mrml"
    script = FRESH_SLICER_STARTUP.format(
        testing=str(REPO_ROOT / "Testing"),
        foundation=str(REPO_ROOT / "Testing" / "foundation"),
        tmp=str(tmp_path),
        plus=str(path),
        saved=str(saved),
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert "observeLoadedRecordings" in report["slots"]
    assert {"numba", "cv2", "nrrd", "h5py"} <= set(report["hidden"])
    assert report["premature_import"] is None, report["premature_import"]
    _assert_reopened_scene_skips_the_lost_frames(saved, image_to_probe, tmp_path / "cache", scenes)
