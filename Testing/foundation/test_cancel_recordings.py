"""Cancel stops loading, reading, saving recordings and preparing training sweeps within a second,
and leaves the scene (and the files) as they were (issue 22 item 5, the steps left out before).

On the real MRML classes (slicer-core). Work that reports progress is cancelled from another
thread at a chosen report (``cancel_helpers``); the steps without progress of their own
(reading or writing a file, resampling the training frames) run on a worker thread, here made
to hang until the test releases them, so the test shows that the call returns within a second
of the cancel however long that step takes, and that what the worker does after the cancel
(its file, its sweep) is dropped.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("slicer", reason="slicer-core (real MRML classes) is not installed")

import FreehandUSLib.io  # noqa: E402
from FreehandUSLib import jobs, mrml  # noqa: E402
from FreehandUSLib.simulation.analytic import simulate_analytic_sweep  # noqa: E402
from FreehandUSLib.io import read_sequence, write_sequence  # noqa: E402
from FreehandUSLib.jobs import Cancelled, CancelToken  # noqa: E402
from cancel_helpers import CancelOnFirstReport, assert_cancelled_fast, node_ids  # noqa: E402
from mrml_scene import make_scene, release_scene  # noqa: E402

pytestmark = pytest.mark.mrml


@pytest.fixture
def scene():
    s = make_scene()
    yield s
    release_scene(s)


def _sweep(n_frames=120, seed=0):
    seq, image_to_probe = simulate_analytic_sweep(n_frames=n_frames, n_rows=48, n_cols=40, pixel_spacing_mm=0.5,
                                                  seed=seed)  # fmt: skip
    seq.transforms["ProbeToTracker"].valid[[n_frames // 3, n_frames // 3 + 1]] = False
    return seq, image_to_probe


class CancelWhen:
    """A progress callback that has another thread cancel once ``when(done, total)`` holds."""

    def __init__(self, token, when):
        self.token = token
        self.when = when
        self.reports = []
        self.cancelled_at = None

    def __call__(self, done, total):
        self.reports.append((done, total))
        if self.cancelled_at is None and self.when(done, total):
            worker = threading.Thread(target=self._cancel)
            worker.start()
            worker.join()

    def _cancel(self):
        self.cancelled_at = time.perf_counter()
        self.token.cancel()


class Hanging:
    """Wraps a function so that it waits (on another thread) until the test releases it."""

    def __init__(self, fn):
        self.fn = fn
        self.started = threading.Event()
        self.release = threading.Event()
        self.finished = threading.Event()

    def __call__(self, *args, **kwargs):
        self.started.set()
        assert self.release.wait(30), "never released"
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.finished.set()


def _assert_stops_fast(call, reporter, limit_s=1.0):
    with pytest.raises(Cancelled, match="cancelled"):
        call()
    assert reporter.cancelled_at is not None, "the work ended before the cancel"
    assert time.perf_counter() - reporter.cancelled_at < limit_s


def _browser_state(scene):
    """Every node ID, and every sequence's item count (a half-made sequence would show)."""
    seqs = scene.GetNodesByClass("vtkMRMLSequenceNode")
    items = {seqs.GetItemAsObject(i).GetID(): seqs.GetItemAsObject(i).GetNumberOfDataNodes()
             for i in range(seqs.GetNumberOfItems())}  # fmt: skip
    return node_ids(scene), items


# -- reading a browser into arrays ------------------------------------------------------------
def test_browser_to_sequence_reports_and_stops_midway(scene):
    seq, image_to_probe = _sweep()
    browser = mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, reference_frame="Tracker", browser_name="Sweep")
    before = _browser_state(scene)
    token = CancelToken("reading the recording")
    reporter = CancelOnFirstReport(token, after=3)  # in the frames
    assert_cancelled_fast(lambda: mrml.browser_to_sequence(browser, progress=reporter, cancel=token), reporter)
    assert _browser_state(scene) == before

    token = CancelToken("reading the recording")
    reporter = CancelWhen(token, lambda done, total: done > seq.n_frames)  # in the transform items
    _assert_stops_fast(lambda: mrml.browser_to_sequence(browser, progress=reporter, cancel=token), reporter)

    reports = []
    back = mrml.browser_to_sequence(browser, progress=lambda d, t: reports.append((d, t)), cancel=CancelToken())
    total = seq.n_frames + (seq.n_frames - 2)  # frames + the valid ProbeToTracker items
    assert {t for _, t in reports} == {total}
    assert [d for d, _ in reports] == sorted(d for d, _ in reports) and len(reports) > 10
    np.testing.assert_array_equal(back.frames, seq.frames)
    np.testing.assert_array_equal(back.transforms["ProbeToTracker"].valid, seq.transforms["ProbeToTracker"].valid)


# -- making a browser, loading a file ---------------------------------------------------------
@pytest.mark.parametrize("where", ["frames", "transforms"])
def test_sequence_to_browser_cancelled_leaves_no_node(scene, where):
    seq, image_to_probe = _sweep()
    scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Mine")
    before = _browser_state(scene)
    token = CancelToken("loading")
    at = 3 if where == "frames" else seq.n_frames + 20
    reporter = CancelWhen(token, lambda done, total: done >= at)
    _assert_stops_fast(
        lambda: mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, reference_frame="Tracker", browser_name="Sweep",
                                         progress=reporter, cancel=token),  # fmt: skip
        reporter,
    )
    assert _browser_state(scene) == before  # sequences, their items, browser and proxies removed


def test_an_error_while_making_the_browser_removes_what_was_made(scene, monkeypatch):
    seq, image_to_probe = _sweep(n_frames=20)
    before = _browser_state(scene)

    def failing(done, total):
        if done > seq.n_frames:
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, reference_frame="Tracker", progress=failing)
    assert _browser_state(scene) == before


def test_load_cancelled_while_the_file_is_read(scene, tmp_path, monkeypatch):
    seq, image_to_probe = _sweep(n_frames=30)
    path = write_sequence(seq, tmp_path / "Sweep.igs.mha")
    hanging = Hanging(read_sequence)
    monkeypatch.setattr(FreehandUSLib.io, "read_sequence", hanging)
    before = _browser_state(scene)
    token = CancelToken("loading")
    reporter = CancelWhen(token, lambda done, total: hanging.started.is_set())
    try:
        _assert_stops_fast(lambda: mrml.load_sequence_file(scene, path, progress=reporter, cancel=token), reporter)
    finally:
        hanging.release.set()
    assert hanging.finished.wait(30)  # the read ended on its thread; its sequence is dropped
    assert _browser_state(scene) == before
    assert all(d == 0 for d, _ in reporter.reports)  # the reading half shows its start


def test_load_cancelled_while_the_nodes_are_made_and_a_full_load(scene, tmp_path):
    seq, image_to_probe = _sweep()
    path = write_sequence(seq, tmp_path / "Sweep.igs.mha")
    before = _browser_state(scene)
    token = CancelToken("loading")
    reporter = CancelWhen(token, lambda done, total: done >= 0.7 * total)
    _assert_stops_fast(lambda: mrml.load_sequence_file(scene, path, progress=reporter, cancel=token), reporter)
    assert _browser_state(scene) == before

    reports = []
    browser = mrml.load_sequence_file(scene, path, browser_name="Sweep", progress=lambda d, t: reports.append((d, t)),
                                      cancel=CancelToken())  # fmt: skip
    assert browser.GetName() == "Sweep"
    assert reports[0] == (0, jobs.STEP_TOTAL) and max(d for d, _ in reports) > 0.9 * jobs.STEP_TOTAL
    back = mrml.browser_to_sequence(browser)
    np.testing.assert_array_equal(back.frames, seq.frames)


# -- saving a browser to a file ---------------------------------------------------------------
def _wait_for_workers():
    for thread in threading.enumerate():
        if thread.name == "freehandus-work":
            thread.join(30)


def test_save_cancelled_while_reading_the_browser_writes_nothing(scene, tmp_path):
    seq, image_to_probe = _sweep()
    browser = mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, reference_frame="Tracker", browser_name="Sweep")
    before = _browser_state(scene)
    token = CancelToken("saving")
    reporter = CancelOnFirstReport(token, after=2)
    target = tmp_path / "Out.igs.mha"
    assert_cancelled_fast(lambda: mrml.save_browser_sequence(browser, target, progress=reporter, cancel=token),
                          reporter)  # fmt: skip
    assert not target.exists() and list(tmp_path.iterdir()) == []
    assert _browser_state(scene) == before


@pytest.mark.parametrize("name", ["Out.igs.mha", "Out.igs.mhd", "Out.seq.nrrd"])
def test_save_cancelled_while_writing_keeps_the_old_file(scene, tmp_path, monkeypatch, name):
    seq, image_to_probe = _sweep(n_frames=30)
    browser = mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, reference_frame="Tracker", browser_name="Sweep")
    target = tmp_path / name
    old = _sweep(n_frames=5, seed=3)[0]
    write_sequence(old, target)
    old_files = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    hanging = Hanging(write_sequence)
    monkeypatch.setattr(FreehandUSLib.io, "write_sequence", hanging)
    token = CancelToken("saving")
    reporter = CancelWhen(token, lambda done, total: hanging.started.is_set())
    try:
        _assert_stops_fast(lambda: mrml.save_browser_sequence(browser, target, progress=reporter, cancel=token),
                           reporter)  # fmt: skip
    finally:
        hanging.release.set()
    assert hanging.finished.wait(30)
    _wait_for_workers()
    # the writer finished its file after the cancel: it was not put in place, nothing is left over
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == old_files
    assert read_sequence(target).n_frames == 5

    monkeypatch.setattr(FreehandUSLib.io, "write_sequence", write_sequence)
    written = mrml.save_browser_sequence(browser, target, progress=lambda d, t: None, cancel=CancelToken())
    assert written == target and read_sequence(target).n_frames == 30
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_cancel_while_the_written_files_are_moved_is_too_late(tmp_path, monkeypatch):
    """The files are being put in place when the cancel comes: the save completes and says so."""
    seq, _ = _sweep(n_frames=6)
    target = tmp_path / "Out.igs.mha"
    token = CancelToken("saving")
    real_replace = jobs.os.replace

    def replace_then_cancel(src, dst):
        if Path(dst).parent == tmp_path:  # putting the file in place (not the writer's own rename)
            token.cancel()
        real_replace(src, dst)

    monkeypatch.setattr(jobs.os, "replace", replace_then_cancel)
    assert jobs.write_cancellable(lambda p: write_sequence(seq, p), target, cancel=token) == target
    monkeypatch.undo()
    assert token.cancelled and read_sequence(target).n_frames == 6


def test_save_refuses_an_unknown_extension_before_reading(scene):
    seq, image_to_probe = _sweep(n_frames=6)
    browser = mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, reference_frame="Tracker", browser_name="Sweep")
    calls = []
    with pytest.raises(FreehandUSLib.FileFormatError, match="unknown file type"):
        mrml.save_browser_sequence(browser, "/tmp/out.txt", progress=lambda d, t: calls.append(d))
    assert calls == []


def test_step_progress_scales_into_the_whole_bar():
    seen = []
    step = jobs.step_progress(lambda d, t: seen.append((d, t)), 0.5, 1.0)
    step(0, 4)
    step(2, 4)
    step(4, 4)
    assert seen == [(500, 1000), (750, 1000), (1000, 1000)]
    assert jobs.step_progress(None, 0.0, 0.5) is None
    with pytest.raises(ValueError, match="start <= stop"):
        jobs.step_progress(print, 0.6, 0.5)


# -- preparing the training sweeps ------------------------------------------------------------
def _tiny_model_config():
    from SensorlessTrackingLib.models import ModelConfig

    return ModelConfig(name="dualtrack", image_size=(32, 32), pixel_spacing_mm=0.4, clip_length=4,
                       channels=(4, 8, 8, 8), token_dim=16, heads=2, max_global_tokens=4, global_size=16,
                       corr_radius=1, lstm_hidden=16)  # fmt: skip


def _training_browsers(scene):
    browsers = []
    for seed in (1, 2):
        seq, image_to_probe = _sweep(n_frames=40, seed=seed)
        browsers.append(mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, reference_frame="Tracker",
                                                 browser_name=f"T{seed}"))
    return browsers


def test_training_preparation_cancelled_while_reading_starts_nothing(scene, tmp_path):
    pytest.importorskip("torch")
    from SensorlessTrackingLib import mrml_tracking as mt

    browsers = _training_browsers(scene)
    before = _browser_state(scene)
    token = CancelToken("preparing the training sweeps")
    reporter = CancelWhen(token, lambda done, total: done > 0.6 * total)  # reading the second browser
    _assert_stops_fast(
        lambda: mt.start_training_job(browsers, tmp_path / "run", job_dir=tmp_path / "job", epochs=1,
                                      model_config=_tiny_model_config(), prepare_progress=reporter, cancel=token),
        reporter,
    )  # fmt: skip
    assert not (tmp_path / "run").exists() and not (tmp_path / "job").exists()  # no files, no process
    assert _browser_state(scene) == before
    with pytest.raises(TypeError, match="progress comes from the job's events"):
        mt.start_training_job(browsers, tmp_path / "run", progress=print)


def test_training_preparation_cancelled_while_resampling(scene, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from SensorlessTrackingLib import data as sensorless_data
    from SensorlessTrackingLib import mrml_tracking as mt

    browsers = _training_browsers(scene)
    hanging = Hanging(sensorless_data.prepare_sweep)
    monkeypatch.setattr(sensorless_data, "prepare_sweep", hanging)
    token = CancelToken("preparing the training sweeps")
    reporter = CancelWhen(token, lambda done, total: hanging.started.is_set())
    try:
        _assert_stops_fast(
            lambda: mt.start_training_job(browsers, tmp_path / "run", job_dir=tmp_path / "job", epochs=1,
                                          model_config=_tiny_model_config(), prepare_progress=reporter,
                                          cancel=token),
            reporter,
        )  # fmt: skip
    finally:
        hanging.release.set()
    assert hanging.finished.wait(30)
    assert not (tmp_path / "run").exists() and not (tmp_path / "job").exists()
    assert max(d for d, _ in reporter.reports) <= jobs.STEP_TOTAL // 2  # stopped in the first browser


def test_adaptation_reading_cancelled_starts_nothing(scene, tmp_path):
    pytest.importorskip("torch")
    from SensorlessTrackingLib import mrml_tracking as mt

    browsers = _training_browsers(scene)
    token = CancelToken("reading the recordings")
    reporter = CancelOnFirstReport(token, after=2)
    assert_cancelled_fast(
        lambda: mt.start_adaptation_job(browsers, tmp_path / "adapted.pt", job_dir=tmp_path / "job",
                                        prepare_progress=reporter, cancel=token),
        reporter,
    )  # fmt: skip
    assert not (tmp_path / "job").exists() and not (tmp_path / "adapted.pt").exists()


def test_reconstruction_cancelled_while_the_browser_is_read(scene, monkeypatch):
    """Reading the recording (before any frame is inserted) reports and is cancelled too."""
    from FreehandUSLib import mrml_reconstruction as mr

    started = []
    real = mr.reconstruct_volume
    monkeypatch.setattr(mr, "reconstruct_volume", lambda *a, **k: started.append(1) or real(*a, **k))

    seq, image_to_probe = _sweep()
    browser = mrml.sequence_to_browser(scene, seq, image_to_probe=image_to_probe, reference_frame="Tracker",
                                       browser_name="Sweep")  # fmt: skip
    before = _browser_state(scene)
    token = CancelToken("reconstruction")
    reporter = CancelWhen(token, lambda done, total: len(reporter.reports) == 3)
    _assert_stops_fast(
        lambda: mr.reconstruct_browser_to_volume_node(browser, image_to_reference_transform="ImageToTracker",
                                                      output_spacing_mm=1.0, progress=reporter, cancel=token),
        reporter,
    )  # fmt: skip
    assert _browser_state(scene) == before
    assert reporter.reports == [(0, 1)] * 3  # the bar at its start ...
    assert started == []  # ... while reading: the reconstruction never started
