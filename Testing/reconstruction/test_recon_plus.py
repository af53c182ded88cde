"""Reconstruction against PLUS's reference volumes (SpinePhantomFreehand, three configs).

PLUS's test setup (PlusLib ``src/PlusVolumeReconstruction/Testing/CMakeLists.txt``) runs all
three ``VolumeReconstructionOnly`` configs, NN_LATE included, on SpinePhantomFreehand.igs.mha.
"""

from __future__ import annotations

import numpy as np
import pytest
from testdata import plus_file

from FreehandUSLib.reconstruction import options_from_plus_config, reconstruct_volume

pytestmark = pytest.mark.realdata

CASES = {
    # config fragment: (reference volume, required share within 2 grey levels)
    "SpinePhantom_NN_MEAN": ("NNMEAN", 0.97),
    "SpinePhantom_LN_MAXI": ("LNMAXI", 0.97),
    "SonixRP_TRUS_D70mm_NN_LATE": ("NNLATE", 0.88),
}


@pytest.fixture(scope="module")
def spine():
    from FreehandUSLib.io import read_sequence

    return read_sequence(plus_file("TestImages/SpinePhantomFreehand.igs.mha"))


def _config(fragment):
    from FreehandUSLib.io.plus_config import read_plus_config

    return read_plus_config(plus_file(f"ConfigFiles/PlusDeviceSet_VolumeReconstructionOnly_{fragment}.xml"))


def _reference(name):
    from FreehandUSLib.io import read_volume

    return read_volume(plus_file(f"TestImages/vtkVolumeReconstructorTest{name}volumeRef.mha"))


def _agreement(ours, ref):
    a, b = ours.astype(np.int64), ref.astype(np.int64)
    nonzero = (a != 0) | (b != 0)
    return float(np.mean(np.abs(a - b)[nonzero] <= 2))


@pytest.mark.parametrize("fragment", list(CASES))
def test_matches_plus_reference_volume(spine, fragment):
    name, needed = CASES[fragment]
    config = _config(fragment)
    ref = _reference(name)
    result = reconstruct_volume(
        spine, config.coordinate_definitions.repository_fixed(), options_from_plus_config(config, emulate_plus=True)
    )
    vol = result.volume
    assert vol.dimensions == ref.dimensions
    assert vol.spacing_mm == ref.spacing_mm
    np.testing.assert_allclose(vol.origin_mm, ref.origin_mm, atol=5e-4)  # the file holds 6 digits
    assert result.frames_used == 21
    share = _agreement(vol.voxels, ref.voxels)
    assert share >= needed
    assert share == 1.0  # PLUS's arithmetic reproduced: identical voxels


@pytest.mark.parametrize("fragment", ["SpinePhantom_LN_MAXI", "SonixRP_TRUS_D70mm_NN_LATE"])
def test_exact_arithmetic_stays_close_to_plus(spine, fragment):
    """Default (exact) arithmetic: same geometry, nearly the same voxels."""
    name, needed = CASES[fragment]
    config = _config(fragment)
    ref = _reference(name)
    result = reconstruct_volume(spine, config.coordinate_definitions.repository_fixed(), options_from_plus_config(config))
    assert result.volume.dimensions == ref.dimensions
    assert _agreement(result.volume.voxels, ref.voxels) >= needed


def test_exact_mean_is_above_plus_truncating_mean(spine):
    """PLUS's MEAN truncates its running mean at every insertion, so it sits below the mean."""
    config = _config("SpinePhantom_NN_MEAN")
    fixed = config.coordinate_definitions.repository_fixed()
    exact = reconstruct_volume(spine, fixed, options_from_plus_config(config, fill_holes=False))
    plus = reconstruct_volume(spine, fixed, options_from_plus_config(config, fill_holes=False, emulate_plus=True))
    known = (exact.weight.voxels > 0) & (plus.weight.voxels > 0)
    assert known.sum() > 0.99 * (exact.weight.voxels > 0).sum()  # fixed-point positions move a few edge voxels
    diff = exact.volume.voxels[known].astype(int) - plus.volume.voxels[known].astype(int)
    assert np.mean(diff >= 0) > 0.99
    assert diff.mean() > 1.0  # many pixels per voxel: the truncation bias accumulates


def test_options_from_plus_config_mapping():
    config = _config("SonixRP_TRUS_D70mm_NN_LATE")
    opts = options_from_plus_config(config, interpolation="linear")
    assert opts.output_spacing_mm == (0.5, 0.5, 0.5)
    assert opts.clip_rectangle_origin_px == (192, 16) and opts.clip_rectangle_size_px == (420, 580)
    assert opts.fan_angles_deg == (-45.0, 45.0) and opts.fan_origin_px == (380.0, 20.0)
    assert (opts.fan_radius_start_px, opts.fan_radius_stop_px) == (120.0, 360.0)
    assert opts.compounding == "latest" and opts.interpolation == "linear"  # override wins
    assert opts.image_to_reference_transform == "ImageToReference"
    mean = options_from_plus_config(_config("SpinePhantom_NN_MEAN"))
    assert mean.fill_holes and mean.hole_filling[0].type == "STICK"
    assert mean.hole_filling[0].stick_length_limit == 9 and mean.hole_filling[0].number_of_sticks_to_use == 1
