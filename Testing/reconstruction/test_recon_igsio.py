"""``emulate_plus`` against IGSIO's C++ reconstructor (the engine inside PLUS), voxel for voxel.

``../shared/data/igsio`` holds IGSIO's reconstructions of BoneUltrasound_L14 (21 frames) for
every interpolation x compounding x pixel mask x hole-filling combination, with
``Optimization="FULL"`` and, once per interpolation x compounding, ``"NONE"``; ``long/`` holds
four reconstructions of the recording repeated 15 times (315 frames), where voxels receive
more than 255 contributions. Each test reconstructs with the reference's own config and
requires identical voxels. Skipped cleanly without the data.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from testdata import REPO_ROOT, plus_file

from FreehandUSLib.reconstruction import InvalidOptionError, ReconstructionOptions, options_from_plus_config, reconstruct_volume

pytestmark = pytest.mark.realdata

IGSIO_DATA = REPO_ROOT.parent / "shared" / "data" / "igsio"
CONFIGS = sorted(p.stem for p in IGSIO_DATA.glob("L14_*.xml")) if IGSIO_DATA.is_dir() else []
LONG = sorted(p.stem for p in (IGSIO_DATA / "long").glob("L14x15_*.mha")) if IGSIO_DATA.is_dir() else []


def _need(path):
    if not path.is_file():
        pytest.skip(f"IGSIO reference data not found: {path} (expected ../shared/data/igsio beside the repo)")
    return path


@pytest.fixture(scope="module")
def bone():
    from FreehandUSLib.io import read_sequence

    return read_sequence(plus_file("TestImages/BoneUltrasound_L14.igs.mha"))


def _reconstruct(sequence, config_name, threads):
    from FreehandUSLib.io.plus_config import read_plus_config

    config = read_plus_config(_need(IGSIO_DATA / f"{config_name}.xml"))
    opts = options_from_plus_config(config, emulate_plus=True)
    opts = dataclasses.replace(opts, number_of_threads=threads)
    return reconstruct_volume(sequence, config.coordinate_definitions.repository_fixed(), opts)


def _assert_identical(result, reference_path):
    from FreehandUSLib.io import read_volume

    ref = read_volume(_need(reference_path))
    vol = result.volume
    assert vol.dimensions == ref.dimensions
    np.testing.assert_allclose(vol.origin_mm, ref.origin_mm, atol=5e-4)  # the file holds 6 digits
    ours, theirs = vol.voxels.astype(np.int64), ref.voxels.astype(np.int64)
    differ = int(np.count_nonzero(ours != theirs))
    assert np.count_nonzero(theirs) > 100_000  # a real volume, not an empty match
    assert differ == 0, f"{differ} of {np.count_nonzero((ours != 0) | (theirs != 0))} non-empty voxels differ"


def test_the_reference_folder_is_complete():
    if not IGSIO_DATA.is_dir():
        pytest.skip(f"IGSIO reference data not found: {IGSIO_DATA}")
    assert len(CONFIGS) == 60 and len(LONG) == 4
    assert sum("_NONE" in c for c in CONFIGS) == 6


@pytest.mark.parametrize("config_name", CONFIGS or ["(no data)"])
def test_matches_igsio_voxel_for_voxel(bone, config_name):
    # Single-threaded, as IGSIO made them; the multi-threaded result is the same by design
    # (each worker owns whole planes and sees every pixel in order): one thread count each.
    threads = 1 + CONFIGS.index(config_name) % 2 if config_name in CONFIGS else 1
    result = _reconstruct(bone, config_name, threads)
    assert result.frames_used == 21
    _assert_identical(result, IGSIO_DATA / f"{config_name}.mha")


@pytest.mark.slow
@pytest.mark.parametrize("name", LONG or ["(no data)"])
def test_long_sweep_matches_igsio_past_255_contributions(bone, name):
    from FreehandUSLib import TrackedSequence

    long = TrackedSequence.concatenate([bone] * 15)
    result = _reconstruct(long, name.replace("L14x15", "L14"), threads=2)
    assert result.frames_used == 315
    if "_MEAN_" in name:  # the saturated-weight branch of PLUS's mean was exercised
        assert float(np.max(result.weight.voxels)) * 256.0 >= 65279.0
    _assert_identical(result, IGSIO_DATA / "long" / f"{name}.mha")


def test_plus_optimization_is_read_and_checked():
    from FreehandUSLib.io.plus_config import read_plus_config

    config = read_plus_config(_need(IGSIO_DATA / "L14_NE_MEAN_fan_off_NONE.xml"))
    assert options_from_plus_config(config).plus_optimization == "NONE"
    assert ReconstructionOptions().plus_optimization == "FULL"
    assert ReconstructionOptions(plus_optimization="partial").plus_optimization == "PARTIAL"  # recorded, not emulated
    with pytest.raises(InvalidOptionError, match="PARTIAL.*not emulated"):
        ReconstructionOptions(plus_optimization="PARTIAL", emulate_plus=True)
    with pytest.raises(InvalidOptionError, match="plus_optimization"):
        ReconstructionOptions(plus_optimization="FAST")
    # A config with a value PLUS does not know reconstructs as PLUS does: FULL.
    odd = dataclasses.replace(config.require_volume_reconstruction(), optimization="FAST")
    assert options_from_plus_config(odd).plus_optimization == "FULL"
