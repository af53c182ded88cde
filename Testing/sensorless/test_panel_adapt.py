"""The Sensorless Tracking panel's sweep direction and "Adapt to this probe" reach the Lib.

Static checks on the module source (AST: the module imports slicer and qt, which plain pytest
lacks) and, with slicer-core, the adaptation job started from tracked browsers.
"""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE = REPO_ROOT / "SensorlessTracking" / "SensorlessTracking.py"


def _tree():
    return ast.parse(MODULE.read_text())


def _function(tree, cls: str, name: str):
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.FunctionDef) and item.name == name:
                    return item
    raise AssertionError(f"{cls}.{name} not found")


def _keywords(func, callee: str) -> dict:
    """Keyword arguments (source text) of the first call to ``...callee(...)`` in ``func``."""
    for node in ast.walk(func):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == callee:
            return {k.arg: ast.unparse(k.value) for k in node.keywords}
    raise AssertionError(f"{func.name} does not call {callee}")


def test_sweep_direction_choices_and_default_follow_the_lib():
    from SensorlessTrackingLib.conventions import SWEEP_DIRECTIONS

    tree = _tree()
    enum = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SweepDirection")
    values = [ast.literal_eval(a.value) for a in enum.body if isinstance(a, ast.Assign)]
    assert values == list(SWEEP_DIRECTIONS)
    params = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == "SensorlessTrackingParameterNode")
    default = next(ast.unparse(a.value) for a in params.body if isinstance(a, ast.AnnAssign)
                   and a.target.id == "sweepDirection")
    assert default == "SweepDirection.TOWARD" and values[0] == SWEEP_DIRECTIONS[0]
    ui = (REPO_ROOT / "SensorlessTracking" / "Resources" / "UI" / "SensorlessTracking.ui").read_text()
    assert "<string>sweepDirection</string>" in ui and "<string>adaptFineTune</string>" in ui


def test_estimate_button_passes_the_sweep_direction_to_the_lib():
    tree = _tree()
    on_estimate = _function(tree, "SensorlessTrackingWidget", "onEstimateButton")
    assert _keywords(on_estimate, "estimateTrajectory")["sweepDirection"] == "parameters.sweepDirection.value"
    logic = _function(tree, "SensorlessTrackingLogic", "estimateTrajectory")
    assert _keywords(logic, "estimate_trajectory_to_browser")["sweep_direction"] == "sweepDirection"


def test_adapt_button_starts_the_lib_adaptation_job():
    tree = _tree()
    on_adapt = _function(tree, "SensorlessTrackingWidget", "onAdaptButton")
    kw = _keywords(on_adapt, "startAdaptation")
    assert kw["fineTune"] == "parameters.adaptFineTune"
    logic = _function(tree, "SensorlessTrackingLogic", "startAdaptation")
    kw = _keywords(logic, "start_adaptation_job")
    assert kw["fine_tune"] == "fineTune" and kw["base"] == "base"


@pytest.mark.mrml
def test_adaptation_job_from_browsers_writes_an_adapted_model(tmp_path):
    pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")
    pytest.importorskip("torch")
    from FreehandUSLib import SequenceError, TransformError, mrml
    from mrml_scene import make_scene, release_scene
    from sensorless_helpers import tiny_sweep
    from SensorlessTrackingLib import mrml_tracking as mt
    from SensorlessTrackingLib.predict import load_model

    scene = make_scene()
    try:
        browsers = [mrml.sequence_to_browser(scene, tiny_sweep(seed=30 + s, n_frames=16, length_mm=5.0).sequence,
                                             browser_name=f"Probe{s}") for s in range(3)]
        with pytest.raises(SequenceError, match="at least 2 tracked recordings"):
            mt.start_adaptation_job(browsers[:1], tmp_path / "one.pt")
        seq = tiny_sweep(seed=40, n_frames=8).sequence
        from dataclasses import replace

        untracked = mrml.sequence_to_browser(scene, replace(seq, transforms={}), browser_name="Untracked")
        with pytest.raises(TransformError, match="Untracked"):
            mt.start_adaptation_job([browsers[0], untracked], tmp_path / "bad.pt")
        out = tmp_path / "adapted_probe.pt"
        job = mt.start_adaptation_job(browsers, out, job_dir=tmp_path / "job")
        events, deadline = [], time.monotonic() + 240
        while (job.running or not events or events[-1].get("event") not in ("done", "error")) \
                and time.monotonic() < deadline:
            events += job.poll()
            time.sleep(0.05)
        events += job.poll()
        assert events and events[-1]["event"] == "done", (events, job.error_text())
        assert [e["event"] for e in events][0] == "started"
        assert any(e["event"] == "progress" and "estimating 3 sweeps" in e["message"] for e in events)
        done = events[-1]
        assert Path(done["checkpoint"]) == out.resolve() and "correction: " in done["summary"]
        model = load_model(out)
        assert model.out_of_plane_scale == pytest.approx(done["result"]["out_of_plane_scale"])
        assert model.decorrelation_blend == done["result"]["decorrelation_blend"]
        assert done["result"]["validation"]["name"] == "Probe2"
    finally:
        release_scene(scene)
