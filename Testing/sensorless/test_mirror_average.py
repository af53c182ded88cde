"""Test-time averaging over a sweep's mirror images (SensorlessTrackingLib.mirror_average)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from sensorless_helpers import tiny_model_config, tiny_sweep  # noqa: E402
from sensorless_helpers import one_torch_thread  # noqa: E402, F401  (autouse fixture: one torch thread per test)

from SensorlessTrackingLib.mirror_average import MODES, check_mode  # noqa: E402
from SensorlessTrackingLib.predict import predict_poses_averaged  # noqa: E402
from SensorlessTrackingLib.models import build_model  # noqa: E402
from SensorlessTrackingLib.pose import matrices_to_params, mirror_x, mirror_z, params_to_matrices  # noqa: E402
from SensorlessTrackingLib.predict import predict_poses, track_sequence  # noqa: E402


@pytest.fixture(scope="module")
def model():
    """An untrained tiny model: random weights have no reason to respect either symmetry."""
    torch.manual_seed(3)
    return build_model(tiny_model_config(use_global=False)).eval()


@pytest.fixture(scope="module")
def frames():
    return np.random.default_rng(5).integers(0, 255, size=(11, 32, 32), dtype=np.uint8)


def _mirrored(params, mirror):
    return matrices_to_params(mirror @ params_to_matrices(params) @ mirror)


def _backwards(params):
    return _mirrored(matrices_to_params(np.linalg.inv(params_to_matrices(params[::-1]))), mirror_z())


def test_none_is_the_plain_prediction(model, frames):
    np.testing.assert_array_equal(predict_poses_averaged(frames, model, mode="none"), predict_poses(frames, model))


def test_averaged_estimate_is_exactly_equivariant(model, frames):
    flipped = np.ascontiguousarray(frames[:, :, ::-1])
    backwards = np.ascontiguousarray(frames[::-1])
    plain = predict_poses(frames, model)
    # the raw network is not equivariant, so the checks below can fail
    assert np.abs(predict_poses(flipped, model) - _mirrored(plain, mirror_x())).max() > 1e-3
    assert np.abs(predict_poses(backwards, model) - _backwards(plain)).max() > 1e-3
    for mode in ("flip", "flip+reverse"):
        avg = predict_poses_averaged(frames, model, mode=mode)
        assert avg.shape == plain.shape and np.all(np.isfinite(avg))
        mirrored = predict_poses_averaged(flipped, model, mode=mode)
        np.testing.assert_allclose(mirrored, _mirrored(avg, mirror_x()), atol=1e-5)
    avg = predict_poses_averaged(frames, model, mode="flip+reverse")
    backwards_avg = predict_poses_averaged(backwards, model, mode="flip+reverse")
    np.testing.assert_allclose(backwards_avg, _backwards(avg), atol=1e-5)


def test_track_sequence_mirror_average_and_bad_input(model):
    seq = tiny_sweep(seed=4, n_frames=8, length_mm=2.0).sequence
    plain = track_sequence(seq, model)
    averaged = track_sequence(seq, model, mirror_average="flip+reverse")
    assert averaged.method == f"{plain.method} (flip+reverse averaged)"
    assert averaged.info["mirror_average"] == "flip+reverse" and "mirror_average" not in plain.info
    assert not np.allclose(averaged.frame_to_frame, plain.frame_to_frame)
    with pytest.raises(ValueError, match="flip\\+reverse"):
        track_sequence(seq, model, mirror_average="mirror")
    with pytest.raises(ValueError, match="learned models"):
        track_sequence(seq, "decorrelation", mirror_average="flip")
    with pytest.raises(ValueError, match="global_frames"):
        predict_poses_averaged(seq.frames, model, global_frames=seq.frames)
    assert [check_mode(m) for m in MODES] == list(MODES)
