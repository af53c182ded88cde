"""Orientation conventions (mirrored calibrations), sweep direction and per-frame flags of
sensorless estimates (issue 25, items 2, 3 and 4)."""

from dataclasses import replace

import numpy as np
import pytest

from FreehandUSLib.errors import SequenceError, TransformError
from FreehandUSLib.io import write_sequence
from SensorlessTrackingLib.confidence import FLAG_DECORRELATED, FLAG_EMPTY, FLAG_OK, decorrelated_frames
from SensorlessTrackingLib.conventions import (
    column_mirror,
    elevational_displacement_mm,
    image_handedness,
    reverse_direction,
)
from SensorlessTrackingLib.metrics import tracking_metrics
from SensorlessTrackingLib.predict import FLAG_FIELD, TRAJECTORY_SOURCE_KEY, default_model_path, track_sequence

from sensorless_helpers import one_torch_thread, run_cli, tiny_model_config, tiny_sweep  # noqa: F401


@pytest.fixture(scope="module")
def sweep():
    """30 frames of the training simulator: it moves along -z of the image ("toward")."""
    return tiny_sweep(seed=3, n_frames=30, length_mm=8.0).sequence


def mirrored(seq):
    """The same sweep with the image columns and every Image* calibration mirrored (det < 0)."""
    m = column_mirror(seq.n_cols)
    out = replace(seq, frames=np.ascontiguousarray(seq.frames[:, :, ::-1]), transforms=dict(seq.transforms))
    for name in seq.transform_names:
        if name.startswith("Image"):
            out.set_transform(name, seq.transforms[name].matrices @ m, seq.transforms[name].valid)
    return out


def backwards(seq):
    """The sweep played backwards: the same frames moving along +z ("away")."""
    out = replace(seq, frames=np.ascontiguousarray(seq.frames[::-1]), transforms=dict(seq.transforms),
                  image_ok=seq.image_ok[::-1].copy())
    for name in seq.transform_names:
        out.set_transform(name, seq.transforms[name].matrices[::-1].copy(), seq.transforms[name].valid[::-1].copy())
    return out


def _tiny_pairwise():
    import torch

    from SensorlessTrackingLib.models import build_model

    torch.manual_seed(0)
    model = build_model(tiny_model_config("pairwise"))
    model.eval()
    return model


def _methods():
    out = [("decorrelation", lambda: "decorrelation"), ("pairwise", _tiny_pairwise)]
    if default_model_path().is_file():
        out.append(("shipped", lambda: "default"))
    return out


def test_simulated_sweep_is_mirrored_consistently(sweep):
    m = sweep.transforms["ImageToReference"].matrices
    mm = mirrored(sweep).transforms["ImageToReference"].matrices
    assert np.linalg.det(m[0, :3, :3]) > 0 > np.linalg.det(mm[0, :3, :3])
    # the same pixels in the same places: pixel (c, r) of the mirror is pixel (cols-1-c, r)
    p = np.array([5.0, 7.0, 0.0, 1.0])
    q = np.array([sweep.n_cols - 1 - 5.0, 7.0, 0.0, 1.0])
    np.testing.assert_allclose(m[4] @ q, mm[4] @ p, atol=1e-9)
    assert image_handedness(m) == 1 and image_handedness(mm) == -1


@pytest.mark.parametrize("name,make", _methods(), ids=[n for n, _ in _methods()])
def test_mirrored_calibration_gives_the_same_trajectory(sweep, name, make):
    """det > 0 and det < 0 (columns and calibration mirrored) place every pixel the same way, with
    the same (default) sweep direction: the direction is one of the sweep in space."""
    model = make()
    a = track_sequence(sweep, model)
    b = track_sequence(mirrored(sweep), model)
    ea = a.sequence.transforms["ImageToReference"].matrices
    eb = b.sequence.transforms["ImageToReference"].matrices
    m = column_mirror(sweep.n_cols)
    np.testing.assert_allclose(eb, ea @ m, atol=1e-9)
    assert np.linalg.det(eb[-1, :3, :3]) < 0  # placed with the mirrored calibration
    # ProbeToReference (estimate / calibration) is the same rigid motion in both
    np.testing.assert_allclose(b.sequence.transforms["ProbeToReference"].matrices,
                               a.sequence.transforms["ProbeToReference"].matrices, atol=1e-9)
    assert b.info["image_frame"] == "mirrored" and a.info["image_frame"] == "right-handed"
    assert b.info["direction_check"] == pytest.approx(a.info["direction_check"])
    # the orientation error against the mirrored truth equals the one against the original truth
    shape = (sweep.n_rows, sweep.n_cols)
    ta = tracking_metrics(sweep.transforms["ImageToReference"].matrices, ea, shape)
    tb = tracking_metrics(mirrored(sweep).transforms["ImageToReference"].matrices, eb, shape)
    assert tb.final_drift_mm == pytest.approx(ta.final_drift_mm, abs=1e-6)
    if name == "decorrelation":
        assert ta.mean_angle_error_deg < 15.0 and tb.mean_angle_error_deg < 15.0


def test_mirror_consistency_holds_with_the_calibration_alone(sweep):
    """An untracked sweep with only a mirrored ImageToProbe: the estimate maps back too."""
    itp = sweep.transforms["ImageToProbe"].matrices[0]
    m = column_mirror(sweep.n_cols)
    plain = replace(sweep, transforms={})
    flipped = replace(plain, frames=np.ascontiguousarray(sweep.frames[:, :, ::-1]))
    a = track_sequence(plain, "decorrelation", image_to_probe=itp)
    b = track_sequence(flipped, "decorrelation", image_to_probe=itp @ m)
    np.testing.assert_allclose(b.sequence.transforms["ProbeToReference"].matrices,
                               a.sequence.transforms["ProbeToReference"].matrices, atol=1e-9)


def test_inconsistent_handedness_is_refused(sweep):
    bad = mirrored(sweep)
    bad.set_transform("ImageToProbe", sweep.transforms["ImageToProbe"].matrices)  # tracked mirrored, calibration not
    with pytest.raises(TransformError, match="ProbeToReference would be a mirror"):
        track_sequence(bad, "decorrelation")
    mixed = sweep.transforms["ImageToReference"].matrices.copy()
    mixed[5:] = mixed[5:] @ column_mirror(sweep.n_cols)
    with pytest.raises(TransformError, match="on some frames and not on others"):
        image_handedness(mixed)


@pytest.mark.parametrize("direction", ["toward", "away"])
def test_direction_reverses_the_elevational_motion_exactly(sweep, direction):
    other = "away" if direction == "toward" else "toward"
    a = track_sequence(sweep, "decorrelation", sweep_direction=direction)
    b = track_sequence(sweep, "decorrelation", sweep_direction=other)
    np.testing.assert_allclose(b.frame_to_frame, reverse_direction(a.frame_to_frame), atol=1e-12)
    assert a.info["sweep_direction"] == direction and f"assumed sweep direction: {direction}" in str(a)


@pytest.mark.parametrize("forward", [True, False], ids=["toward-sweep", "away-sweep"])
@pytest.mark.parametrize("tracked_frames", [None, 15], ids=["all-tracked", "first-15-tracked"])
def test_sweeps_in_both_directions(sweep, forward, tracked_frames):
    """The right direction follows the tracking; the wrong one is warned about, from the whole
    tracked sweep or from its tracked first frames."""
    seq = sweep if forward else backwards(sweep)
    truth = seq.transforms["ImageToReference"].matrices
    shape = (seq.n_rows, seq.n_cols)
    true_d = elevational_displacement_mm(truth, shape, 0, seq.n_frames - 1)
    assert (true_d < -3.0) if forward else (true_d > 3.0)
    given = seq
    if tracked_frames is not None:
        given = replace(seq, transforms=dict(seq.transforms))
        valid = np.arange(seq.n_frames) < tracked_frames
        given.set_transform("ImageToReference", truth, valid)
    right, wrong = ("toward", "away") if forward else ("away", "toward")
    good = track_sequence(given, "decorrelation", sweep_direction=right)
    bad = track_sequence(given, "decorrelation", sweep_direction=wrong)
    est_d = elevational_displacement_mm(good.sequence.transforms["ImageToReference"].matrices, shape, 0, seq.n_frames - 1)
    assert np.sign(est_d) == np.sign(true_d)
    assert good.info["direction_check"]["agrees"] is True and "warnings" not in good.info
    assert bad.info["direction_check"]["agrees"] is False
    assert any(f"sweep direction '{right}'" in w for w in bad.info["warnings"])
    assert "DISAGREES" in str(bad)
    if tracked_frames is not None:
        assert bad.info["direction_check"]["last_frame"] == tracked_frames - 1
    # better trajectory with the right direction
    m_good = tracking_metrics(truth, good.sequence.transforms["ImageToReference"].matrices, shape)
    m_bad = tracking_metrics(truth, bad.sequence.transforms["ImageToReference"].matrices, shape)
    assert m_good.final_drift_mm < m_bad.final_drift_mm


def test_shipped_model_follows_the_training_convention(sweep):
    if not default_model_path().is_file():
        pytest.skip("no shipped model")
    res = track_sequence(sweep, "default")
    assert res.info["direction_check"]["agrees"] is True
    assert np.median(res.frame_to_frame[:, 2]) < 0  # "toward" is -z


def test_untracked_sweep_has_no_direction_check(sweep):
    res = track_sequence(replace(sweep, transforms={}), "decorrelation", spacing_mm=sweep.pixel_spacing_mm)
    assert "direction_check" not in res.info and res.info["sweep_direction"] == "toward"
    with pytest.raises(ValueError, match="sweep_direction"):
        track_sequence(sweep, "decorrelation", sweep_direction="forward")


# ---- per-frame flags (item 4, partly) ------------------------------------------------------------


def test_flags_empty_and_jump_frames(sweep):
    long = tiny_sweep(seed=5, n_frames=60, length_mm=16.0).sequence
    f = long.frames.copy()
    f[20] = (f[20] * 0.02).astype(f.dtype)  # probe lifted: nearly black
    f[40] = long.frames[5]  # a jump: frame 40 shows tissue ~10 mm back, unrelated to frame 39
    flags = decorrelated_frames(f)
    assert flags.flags[20] == FLAG_EMPTY
    assert flags.flags[21] == FLAG_DECORRELATED  # the motion into the frame after the lift is unknown
    assert flags.flags[40] == FLAG_DECORRELATED and flags.flags[41] == FLAG_DECORRELATED
    assert flags.n_empty == 1 and 3 <= flags.n_decorrelated <= 4
    clean = decorrelated_frames(long.frames)
    assert (clean.flags == FLAG_OK).all(), clean
    assert clean.threshold > clean.floor and clean.typical > clean.threshold


def test_flags_are_reported_with_the_estimate(sweep):
    f = sweep.frames.copy()
    f[12] = 0
    res = track_sequence(replace(sweep, frames=f), "decorrelation")
    assert res.info["frame_flags"]["empty_frames"] == 1
    assert res.sequence.frame_fields[FLAG_FIELD][12] == FLAG_EMPTY
    assert "1 empty" in str(res) and any("empty" in w for w in res.info["warnings"])
    assert res.sequence.metadata[TRAJECTORY_SOURCE_KEY].startswith("sensorless estimate")


@pytest.mark.parametrize("value", [0, 255, 0.0, 37.5])
def test_a_sweep_of_blank_frames_is_all_empty_and_not_tracked(sweep, tmp_path, capsys, value):
    """Frames without contrast are empty even when all are (no sweep median to compare with);
    estimating such a sweep is refused with one line, not a trajectory from nothing."""
    blank = np.full(sweep.frames.shape, value, dtype=np.float32 if isinstance(value, float) else sweep.frames.dtype)
    flags = decorrelated_frames(blank)
    assert flags.n_empty == len(blank)
    partly = sweep.frames.copy()
    partly[:3] = value
    assert np.flatnonzero(decorrelated_frames(partly).flags == FLAG_EMPTY).tolist() == [0, 1, 2]
    for model in ("default", "decorrelation"):
        with pytest.raises(SequenceError, match="blank"):
            track_sequence(replace(sweep, frames=blank), model)
    path = write_sequence(replace(sweep, frames=blank.astype(sweep.frames.dtype)), tmp_path / "blank.igs.mha")
    assert run_cli(["track", "predict", str(path), "--out", str(tmp_path / "out.igs.mha")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "blank" in err[0]
    assert not (tmp_path / "out.igs.mha").exists()


def test_flag_arguments_are_checked():
    with pytest.raises(ValueError, match="n_frames >= 2"):
        decorrelated_frames(np.zeros((1, 8, 8)))
    with pytest.raises(ValueError, match="empty_fraction"):
        decorrelated_frames(np.zeros((4, 8, 8)), empty_fraction=1.5)


def test_flags_on_a_long_stack_and_on_noise():
    """Frames beyond the first block of 64 are flagged too; pure noise (nothing to decorrelate:
    neighbours no more alike than far frames) flags nothing as decorrelated."""
    f = np.random.default_rng(0).integers(20, 255, (130, 40, 50), dtype=np.uint8)
    f[100] = 0
    flags = decorrelated_frames(f)
    assert np.flatnonzero(flags.flags == FLAG_EMPTY).tolist() == [100]
    assert np.flatnonzero(flags.flags == FLAG_DECORRELATED).tolist() == [101]  # after the empty frame only
    assert np.isnan(flags.threshold)


def test_training_data_of_a_mirrored_calibration_is_the_right_handed_sweep(sweep):
    """track train: a det < 0 recording is prepared exactly as the same sweep with det > 0 (no
    improper poses, which rigid() would turn into wrong rotations)."""
    from SensorlessTrackingLib.data import prepare_sweep

    kw = dict(model_spacing_mm=0.4, image_size=(32, 32), global_size=16)
    a = prepare_sweep(sweep.frames, sweep.transforms["ImageToReference"].matrices, **kw)
    mir = mirrored(sweep)
    b = prepare_sweep(mir.frames, mir.transforms["ImageToReference"].matrices, **kw)
    np.testing.assert_array_equal(b.frames, a.frames)
    np.testing.assert_allclose(b.poses, a.poses, atol=1e-9)
    mixed = sweep.transforms["ImageToReference"].matrices.copy()
    mixed[5:] = mixed[5:] @ column_mirror(sweep.n_cols)
    with pytest.raises(TransformError, match="on some frames and not on others"):
        prepare_sweep(sweep.frames, mixed, **kw)


def test_decorrelation_calibration_of_a_mirrored_sweep(sweep):
    from SensorlessTrackingLib.decorrelation import calibrate_decorrelation

    mir = mirrored(sweep)
    a = calibrate_decorrelation([(sweep.frames, sweep.transforms["ImageToReference"].matrices, sweep.pixel_spacing_mm)])
    b = calibrate_decorrelation([(mir.frames, mir.transforms["ImageToReference"].matrices, mir.pixel_spacing_mm)])
    da, db = a.to_dict(), b.to_dict()
    assert {k: v for k, v in db.items() if not isinstance(v, (float, tuple))} == \
        {k: v for k, v in da.items() if not isinstance(v, (float, tuple))}
    for k, v in da.items():  # the fitted numbers: equal up to rounding (the mirror applied twice)
        if isinstance(v, (float, tuple)):
            np.testing.assert_allclose(db[k], v, rtol=1e-9)


def test_plus_bone_sweep_goes_away_and_the_check_says_so(plus_data):
    """Real data: BoneUltrasound_L14 is swept 'away' (the other way than the training sweeps and
    SpinePhantomFreehand); the default is warned about, and the right direction drifts far less
    (measured with the shipped model: 177 % -> 14 % of the path)."""
    from FreehandUSLib.io import read_plus_config, read_sequence
    from SensorlessTrackingLib.data import image_to_reference_of

    seq = read_sequence(plus_data / "TestImages" / "BoneUltrasound_L14.igs.mha")
    itp = read_plus_config(plus_data / "ConfigFiles" / "BoneUltrasound_L14_config.xml").require_transform("ImageToProbe")
    mats, valid = image_to_reference_of(seq, image_to_probe=itp)
    keep = valid & seq.image_ok
    seq = seq.select(keep)
    seq.set_transform("ImageToReference", mats[keep])
    truth = seq.transforms["ImageToReference"].matrices
    fdr = {}
    for direction in ("toward", "away"):
        res = track_sequence(seq, "decorrelation", sweep_direction=direction)
        assert res.info["direction_check"]["agrees"] is (direction == "away")
        fdr[direction] = tracking_metrics(truth, res.sequence.transforms["ImageToReference"].matrices,
                                          (seq.n_rows, seq.n_cols)).fdr_path_percent
    assert fdr["away"] < 0.5 * fdr["toward"], fdr
