"""Hole filling: the compiled kernels against the straightforward reference, and the paths the
reconstruction uses (values read from the accumulators, rounded straight into the output)."""

from __future__ import annotations

import numpy as np
import pytest

from FreehandUSLib.reconstruction import HoleFillingElement, fill_holes
from FreehandUSLib.reconstruction.holefill import STORE_FLOOR, STORE_ROUND, fill_holes_into
from FreehandUSLib.reconstruction.reference import fill_holes_reference

CHAINS = {
    "stick": [HoleFillingElement("STICK", stick_length_limit=9)],
    "stick3": [HoleFillingElement("STICK", stick_length_limit=5, number_of_sticks_to_use=3)],
    "gauss+stick": [
        HoleFillingElement("GAUSSIAN", size=3, stdev=0.7, minimum_known_voxels_ratio=0.2),
        HoleFillingElement("STICK", stick_length_limit=6),
    ],
    "accum+dwi": [
        HoleFillingElement("GAUSSIAN_ACCUMULATION", size=5, stdev=1.2, minimum_known_voxels_ratio=0.1),
        HoleFillingElement("DISTANCE_WEIGHT_INVERSE", size=3, minimum_known_voxels_ratio=0.0),
    ],
    "nn+stick2": [
        HoleFillingElement("NEAREST_NEIGHBOR", size=7, minimum_known_voxels_ratio=0.01),
        HoleFillingElement("STICK", stick_length_limit=12, number_of_sticks_to_use=2),
    ],
}


def _random_volume(seed, shape=None, n_channels=1, known_fraction=None):
    rng = np.random.default_rng(seed)
    shape = tuple(rng.integers(5, 15, size=3)) if shape is None else shape
    p = rng.uniform(0.05, 0.6) if known_fraction is None else known_fraction
    known = rng.random(shape) < p
    values = np.where(known[..., None], rng.uniform(0, 255, size=shape + (n_channels,)), 0.0)
    weight = np.where(known, rng.uniform(0.5, 3.0, size=shape), 0.0)
    return values, known, weight


@pytest.mark.parametrize("chain", list(CHAINS))
@pytest.mark.parametrize("emulate,integer", [(False, False), (True, True), (True, False)])
def test_compiled_hole_filling_equals_the_reference_exactly(chain, emulate, integer):
    for seed in range(3):
        values, known, weight = _random_volume(seed * 7 + len(chain), n_channels=1 + seed % 2)
        ref, ref_filled = fill_holes_reference(values, known, weight, CHAINS[chain], emulate_plus=emulate,
                                               integer_values=integer)
        for threads in (1, 3):
            got = values.copy()
            filled, stats = fill_holes(got, known, weight, CHAINS[chain], n_threads=threads, emulate_plus=emulate,
                                       integer_values=integer)
            np.testing.assert_array_equal(filled, ref_filled)
            np.testing.assert_array_equal(got, ref)  # bit for bit
            assert stats.holes == int((~known).sum()) and stats.filled == int(filled.sum())
        assert ref_filled.sum() > 0


def test_dense_random_volume_fills_almost_every_hole_like_the_reference():
    # The benchmark's case in small: 30 % of the voxels known at random, STICK(9).
    values, known, weight = _random_volume(11, shape=(24, 26, 28), known_fraction=0.3)
    got = values.copy()
    filled, stats = fill_holes(got, known, weight, CHAINS["gauss+stick"], n_threads=2)
    ref, ref_filled = fill_holes_reference(values, known, weight, CHAINS["gauss+stick"])
    np.testing.assert_array_equal(got, ref)
    assert stats.filled_per_element[0] > 0 and stats.filled > 0.95 * stats.holes


def test_sticks_longer_than_255_voxels_use_wide_distances():
    known = np.zeros((3, 3, 300), bool)
    known[:, :, 0] = known[:, :, 290] = True
    values = np.zeros((3, 3, 300, 1))
    values[:, :, 0] = 10.0
    values[:, :, 290] = 300.0
    element = [HoleFillingElement("STICK", stick_length_limit=300)]
    got = values.copy()
    filled, _ = fill_holes(got, known, known * 1.0, element)
    ref, ref_filled = fill_holes_reference(values, known, known * 1.0, element)
    np.testing.assert_array_equal(got, ref)
    assert filled[:, :, 1:290].all() and not filled[:, :, 291:].any()
    np.testing.assert_allclose(got[1, 1, :291, 0], 10.0 + np.arange(291))  # linear along the stick


def test_filling_from_accumulators_equals_filling_the_means_then_rounding():
    """The reconstruction's path: means read as sums / counts, filled values rounded into uint8."""
    rng = np.random.default_rng(5)
    shape = (12, 13, 14)
    counts = np.where(rng.random(shape) < 0.35, rng.integers(1, 40, size=shape), 0).astype(np.uint32)
    sums = (counts * rng.integers(0, 256, size=shape)).astype(np.uint32)[..., None]
    known = counts > 0
    means = np.zeros(shape + (1,))
    np.divide(sums, counts[..., None], out=means, where=known[..., None])
    chain = CHAINS["gauss+stick"] + CHAINS["nn+stick2"]
    for emulate, store in ((False, STORE_ROUND), (True, STORE_FLOOR)):
        expected = means.copy()
        filled, _ = fill_holes(expected, known, counts.astype(float), chain, emulate_plus=emulate, integer_values=True)
        out = np.zeros(shape + (1,), np.uint8)
        stats = fill_holes_into(out, sums, known, counts, chain, divide=True, store=store, n_threads=2,
                                emulate_plus=emulate, integer_values=True)
        holes = filled[..., None]
        rounded = np.floor(expected + 0.5) if store == STORE_ROUND else np.floor(expected)
        np.testing.assert_array_equal(out[holes], np.clip(rounded, 0, 255)[holes])
        assert not out[~filled].any()  # nothing but holes is written
        assert stats.filled == int(filled.sum()) > 0


def test_nothing_to_fill():
    values, known, weight = _random_volume(2)
    all_known = np.ones_like(known)
    got = values.copy()
    filled, stats = fill_holes(got, all_known, weight, CHAINS["stick"])
    assert stats.holes == 0 and not filled.any() and np.array_equal(got, values)
    none_known = np.zeros_like(known)
    filled, stats = fill_holes(got, none_known, weight, CHAINS["gauss+stick"])
    assert stats.holes == known.size and stats.filled == 0 and not filled.any()


def test_mismatched_shapes_are_refused():
    values, known, weight = _random_volume(1, shape=(4, 5, 6))
    with pytest.raises(ValueError, match=r"shapes do not match: values \(4, 5, 6, 1\).*known \(4, 5, 5\)"):
        fill_holes(values, known[:, :, :5], weight, CHAINS["stick"])
    with pytest.raises(ValueError, match="weight"):
        fill_holes(values, known, weight[:3], CHAINS["stick"])
    with pytest.raises(ValueError, match=r"\(n_k, n_j, n_i, n_channels\)"):
        fill_holes_into(values[..., 0], values[..., 0], known, weight, CHAINS["stick"])
