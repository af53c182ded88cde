"""Transform names, the repository (chains, inverses, validity) and pose interpolation."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from FreehandUSLib import TransformError, TransformRepository
from FreehandUSLib.transforms import (
    check_matrix,
    interpolate_transforms,
    invert_transforms,
    split_transform_name,
)


def random_rigid(n, rng, scale=50.0):
    m = np.tile(np.eye(4), (n, 1, 1))
    m[:, :3, :3] = Rotation.random(n, random_state=rng.integers(1 << 31)).as_matrix()
    m[:, :3, 3] = rng.normal(scale=scale, size=(n, 3))
    return m


@pytest.mark.parametrize(
    "name, expected",
    [
        ("ImageToProbe", ("Image", "Probe")),
        ("ProbeToTrackerTransform", ("Probe", "Tracker")),
        ("ReferenceToTracker", ("Reference", "Tracker")),
        ("TransducerOriginPixelToTransducerOrigin", ("TransducerOriginPixel", "TransducerOrigin")),
    ],
)
def test_split_transform_name(name, expected):
    assert split_transform_name(name) == expected


@pytest.mark.parametrize("bad", ["Probe", "toProbe", "ImageToprobe", ""])
def test_split_transform_name_rejects_bad_names(bad):
    with pytest.raises(TransformError, match="<From>To<To>"):
        split_transform_name(bad)


def test_repository_resolves_chain_and_inverse_vectorised():
    rng = np.random.default_rng(1)
    n = 7
    probe_to_tracker = random_rigid(n, rng)
    reference_to_tracker = random_rigid(n, rng)
    image_to_probe = np.diag([0.2, 0.25, 1.0, 1.0])
    image_to_probe[:3, 3] = [-10.0, 3.0, 1.0]
    repo = TransformRepository(
        {
            "ProbeToTracker": (probe_to_tracker, np.ones(n, bool)),
            "ReferenceToTracker": (reference_to_tracker, np.ones(n, bool)),
        },
        fixed={"ImageToProbe": image_to_probe},
    )
    got = repo.get("ImageToReference")
    expected = np.linalg.inv(reference_to_tracker) @ probe_to_tracker @ image_to_probe
    assert got.shape == (n, 4, 4)
    np.testing.assert_allclose(got, expected, atol=1e-9)
    np.testing.assert_allclose(repo.get("ReferenceToImage"), np.linalg.inv(expected), atol=1e-9)
    np.testing.assert_allclose(repo.get("ImageToReference", frame=3), expected[3], atol=1e-9)
    np.testing.assert_allclose(repo.get("TrackerToTracker"), np.tile(np.eye(4), (n, 1, 1)))


def test_repository_invalid_link_gives_nan_and_mask():
    rng = np.random.default_rng(2)
    n = 5
    valid = np.array([True, False, True, True, False])
    repo = TransformRepository(
        {
            "ProbeToTracker": (random_rigid(n, rng), np.ones(n, bool)),
            "ReferenceToTracker": (random_rigid(n, rng), valid),
        },
        fixed={"ImageToProbe": np.eye(4)},
    )
    got = repo.get("ImageToReference")
    assert np.all(np.isnan(got[~valid]))
    assert np.all(np.isfinite(got[valid]))
    np.testing.assert_array_equal(repo.valid("ImageToReference"), valid)
    assert repo.valid("ImageToTracker").all()


def test_repository_missing_link_error_names_the_gap():
    rng = np.random.default_rng(3)
    repo = TransformRepository({"ProbeToTracker": (random_rigid(3, rng), np.ones(3, bool))})
    with pytest.raises(TransformError, match=r"ImageToReference.*'Image'"):
        repo.get("ImageToReference")
    repo.set_fixed("ImageToProbe", np.eye(4))
    with pytest.raises(TransformError, match=r"'Reference'.*ProbeToTracker"):
        repo.get("ImageToReference")
    assert repo.has("ImageToTracker") and not repo.has("ImageToReference")


def test_repository_rejects_inconsistent_frame_counts():
    rng = np.random.default_rng(4)
    with pytest.raises(TransformError, match="frame count"):
        TransformRepository(
            {
                "ProbeToTracker": (random_rigid(3, rng), np.ones(3, bool)),
                "ReferenceToTracker": (random_rigid(4, rng), np.ones(4, bool)),
            }
        )


@pytest.mark.parametrize(
    "matrix, message",
    [
        (np.full((4, 4), np.nan), "NaN"),
        (np.zeros((4, 4)), "last row"),
        (np.diag([1.0, 0.0, 1.0, 1.0]), "not invertible"),
        (np.eye(3), "4x4"),
    ],
)
def test_check_matrix_rejects_bad_matrices(matrix, message):
    with pytest.raises(TransformError, match=message):
        check_matrix(matrix, name="ImageToProbe", source="calib.xml")
    repo = TransformRepository()
    with pytest.raises(TransformError, match="ImageToProbe"):
        repo.set_fixed("ImageToProbe", matrix)


def test_invert_transforms_marks_singular_as_nan():
    m = np.stack([np.eye(4), np.diag([1.0, 0.0, 1.0, 1.0])])
    inv = invert_transforms(m)
    np.testing.assert_allclose(inv[0], np.eye(4))
    assert np.all(np.isnan(inv[1]))


def test_interpolation_translation_linear_rotation_slerp():
    t = np.array([0.0, 1.0, 2.0])
    m = np.tile(np.eye(4), (3, 1, 1))
    m[:, :3, :3] = Rotation.from_euler("z", [[0.0], [40.0], [80.0]], degrees=True).as_matrix()
    m[:, :3, 3] = [[0, 0, 0], [10, 0, 0], [10, 20, 0]]
    out, ok = interpolate_transforms(t, m, np.ones(3, bool), [0.25, 1.5, 2.0, -0.1, 2.1])
    np.testing.assert_array_equal(ok, [True, True, True, False, False])
    np.testing.assert_allclose(out[0, :3, 3], [2.5, 0, 0])
    np.testing.assert_allclose(out[1, :3, 3], [10, 10, 0])
    angles = Rotation.from_matrix(out[:2, :3, :3]).as_euler("zyx", degrees=True)[:, 0]
    np.testing.assert_allclose(angles, [10.0, 60.0], atol=1e-9)
    np.testing.assert_array_equal(out[2], m[2])  # exact sample: untouched
    assert np.all(np.isnan(out[3:]))


def test_interpolation_skips_invalid_samples():
    t = np.array([0.0, 1.0, 2.0])
    m = np.tile(np.eye(4), (3, 1, 1))
    m[:, 0, 3] = [0.0, 100.0, 2.0]
    out, ok = interpolate_transforms(t, m, np.array([True, False, True]), [1.0])
    assert ok[0]
    np.testing.assert_allclose(out[0, 0, 3], 1.0)  # bracketed by frames 0 and 2
