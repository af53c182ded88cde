"""The model input fitted to the recordings' field of view (``--image-size fit``)."""

import pytest

from FreehandUSLib.errors import SequenceError
from FreehandUSLib.simulation import ProbeConfig
from SensorlessTrackingLib.input_size import MAX_FIT_SIDE, field_of_view_mm, fitting_image_size, sequence_field_of_view_mm

from sensorless_helpers import tiny_sweep


def test_the_benchmark_probe_fits_128_by_112():
    probe = ProbeConfig()  # the one-probe benchmark's probe: 40 mm deep, 38 mm wide
    field = field_of_view_mm((probe.n_rows, probe.n_cols), probe.pixel_spacing_mm)
    assert field == pytest.approx((probe.depth_mm, probe.width_mm))
    assert fitting_image_size([field], 0.3) == (128, 112)


def test_the_smallest_recording_and_the_cap_decide():
    # depth from one recording, width from another; 38.4 mm is exactly 128 pixels of 0.3 mm
    assert fitting_image_size([(38.4, 50.0), (60.0, 30.0)], 0.3) == (128, 96)
    assert fitting_image_size([(150.0, 60.0)], 0.3) == (MAX_FIT_SIDE, MAX_FIT_SIDE)
    assert fitting_image_size([(150.0, 60.0)], 0.3, max_side=64) == (64, 64)
    assert fitting_image_size([(10.0, 10.0)], 0.3) == (32, 32)  # smaller than the shipped 96 x 96 too


def test_too_small_or_no_recording_is_refused():
    with pytest.raises(SequenceError, match=r"thin\.mha is 4\.0 x 38\.0 mm, less than 16 pixels of 0\.3 mm"):
        fitting_image_size([(40.0, 38.0), (4.0, 38.0)], 0.3, names=["wide.mha", "thin.mha"])
    with pytest.raises(SequenceError, match="no recording"):
        fitting_image_size([], 0.3)


def test_field_of_view_of_a_tracked_sequence():
    seq = tiny_sweep(seed=3, n_frames=4, length_mm=1.0, n_rows=96, depth_mm=19.2).sequence  # 0.2 mm pixels
    assert sequence_field_of_view_mm(seq) == pytest.approx((19.2, 12.8))
    assert fitting_image_size([sequence_field_of_view_mm(seq)], 0.4) == (48, 32)
