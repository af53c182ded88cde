"""Training in a separate process (issue 22, item 5): start, JSON progress lines, cancel by PID.

``mrml_tracking.start_training_job`` prepares the sweeps from the browsers (slicer-core MRML),
writes the job and starts ``python -m SensorlessTrackingLib.train_job``; the test polls the
events as the module's timer does. A finished run yields a checkpoint the estimate loads; a
cancelled one is killed with its process group and reaped (no orphan, no zombie).
"""

from __future__ import annotations

import json
import os
import subprocess
import time

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")
torch = pytest.importorskip("torch")

from FreehandUSLib import mrml  # noqa: E402
from FreehandUSLib.errors import SequenceError  # noqa: E402
from FreehandUSLib.jobs import ProcessJob, wait_for_event  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402
from sensorless_helpers import tiny_model_config, tiny_sweep  # noqa: E402
from SensorlessTrackingLib import mrml_tracking as mt  # noqa: E402
from SensorlessTrackingLib.predict import load_model  # noqa: E402
from SensorlessTrackingLib.train import TrainConfig  # noqa: E402
from SensorlessTrackingLib.train_job import read_job, train_config_from_dict, write_job  # noqa: E402

pytestmark = pytest.mark.mrml

TIMEOUT_S = 120.0


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


def _browsers(scene):
    return [
        mrml.sequence_to_browser(scene, tiny_sweep(seed=s, n_frames=10, length_mm=2.5).sequence,
                                 browser_name=f"Train{s}")
        for s in (5, 6)
    ]


def _options(**kw):
    base = dict(model_config=tiny_model_config(), clips_per_epoch=4, batch_size=2, val_fraction=0.5, device="cpu",
                num_threads=1)
    base.update(kw)
    return base


def _gone(pid: int) -> bool:
    """No process (not even a zombie) with this id, and no process left in its group."""
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        pass
    else:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _events_until_end(job: ProcessJob) -> list:
    events = []
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        events += job.poll()
        if events and events[-1]["event"] in ("done", "error"):
            return events
        if not job.running:
            job.wait(10)
            return events + job.poll()
        try:
            job.process.wait(0.05)
        except subprocess.TimeoutExpired:
            pass
    raise AssertionError(f"the training job did not finish within {TIMEOUT_S} s: {events}")


def test_the_job_file_round_trips_the_configuration_and_sweeps(tmp_path):
    from SensorlessTrackingLib.data import prepare_sweep

    cfg = TrainConfig(model=tiny_model_config(), epochs=3, image_to_probe=tuple(map(tuple, np.eye(4))), seed=7)
    assert train_config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    seq = tiny_sweep(seed=5, n_frames=10, length_mm=2.5).sequence
    mats = seq.transforms["ImageToReference"].matrices
    sweep = prepare_sweep(seq.frames, mats, np.ones(10, dtype=bool), model_spacing_mm=0.4, image_size=(32, 32),
                          global_size=16, margin_px=8, name="A", group="g")
    path = write_job(tmp_path / "job", cfg, [sweep], tmp_path / "out")
    cfg2, sweeps, out_dir = read_job(path)
    assert cfg2 == cfg and out_dir == (tmp_path / "out").resolve()
    np.testing.assert_array_equal(sweeps[0].frames, sweep.frames)
    np.testing.assert_array_equal(sweeps[0].poses, sweep.poses)
    assert (sweeps[0].name, sweeps[0].group, sweeps[0].spacing_mm) == ("A", "g", sweep.spacing_mm)


def test_a_training_job_streams_progress_and_ends_with_a_checkpoint(scene, tmp_path):
    browsers = _browsers(scene)
    job = mt.start_training_job(browsers, tmp_path / "run", epochs=2, job_dir=tmp_path / "job", **_options())
    try:
        events = _events_until_end(job)
        assert job.wait(30) == 0, job.error_text()
    finally:
        job.cancel()
    kinds = [e["event"] for e in events]
    assert kinds == ["started", "progress", "progress", "done"], events
    assert events[0]["pid"] == job.pid and events[0]["epochs"] == 2
    assert [(e["done"], e["total"]) for e in events[1:3]] == [(1, 2), (2, 2)]
    assert all(np.isfinite(e["train_loss"]) for e in events[1:3])
    model = load_model(events[-1]["checkpoint"])
    assert model.config.image_size == (32, 32)
    assert _gone(job.pid)


def test_cancel_kills_the_training_process_by_pid(scene, tmp_path):
    browsers = _browsers(scene)
    job = mt.start_training_job(browsers, tmp_path / "run", epochs=200, job_dir=tmp_path / "job", **_options())
    try:
        first = wait_for_event(job, lambda e: e["event"] == "progress", TIMEOUT_S)
        assert first is not None and first["done"] == 1, job.error_text()
        started = time.perf_counter()
        job.cancel()
        assert time.perf_counter() - started < 1.0
    finally:
        job.cancel()
    assert job.cancelled and job.returncode is not None and job.returncode != 0
    assert _gone(job.pid)
    # the finished epochs stay and a later run resumes them
    history = json.loads((tmp_path / "run" / "history.json").read_text())
    assert 1 <= len(history) < 200 and (tmp_path / "run" / "last.pt").is_file()


def test_bad_inputs_fail_before_a_process_starts(scene, tmp_path):
    with pytest.raises(SequenceError, match="no sequence browsers"):
        mt.start_training_job([], tmp_path / "run", **_options())
    with pytest.raises(TypeError, match="progress"):
        mt.start_training_job(_browsers(scene), tmp_path / "run", progress=print)
    assert not (tmp_path / "run").exists()


def test_a_failing_job_reports_one_error_line(tmp_path):
    (tmp_path / "job.json").write_text("{not json")
    job = ProcessJob.python_module("SensorlessTrackingLib.train_job", str(tmp_path / "job.json"))
    try:
        events = _events_until_end(job)
        assert job.wait(30) == 2
    finally:
        job.cancel()
    assert [e["event"] for e in events] == ["error"]
    assert "cannot be read" in events[0]["message"] and "\n" not in events[0]["message"]
