"""The acceptance run: 300 frames of 820x616 at 30 fps, replayed and recorded with zero loss."""

from __future__ import annotations

import numpy as np
import pytest
from igtl_testing import (
    assert_transforms_close,
    frame_index,
    make_stream_sequence,
    running,
    serve_args,
    wait_for_port_line,
)

from FreehandUSLib.igtl import record_stream
from FreehandUSLib.io import read_sequence, write_sequence

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def test_300_frames_820x616_at_30fps_recorded_losslessly(tmp_path):
    seq = make_stream_sequence(300, 616, 820, fps=30.0, invalid_reference=[40, 41, 250])
    source = write_sequence(seq, tmp_path / "source.igs.mhd", compress=False)
    with running(serve_args(source, "--port", "0", "--fps", "30", "--timestamps", "original")) as (proc, reader):
        port = wait_for_port_line(reader)
        summary = record_stream("127.0.0.1", port, tmp_path / "rec.igs.mhd", frames=300, connect_timeout_s=30)
    got = read_sequence(tmp_path / "rec.igs.mhd")
    assert (summary.frames, summary.dropped, summary.rejected, summary.disconnects) == (300, 0, 0, 0)
    assert [frame_index(f) for f in got.frames] == list(range(300))
    np.testing.assert_array_equal(got.frames, seq.frames)
    np.testing.assert_allclose(got.timestamps_s, seq.timestamps_s, rtol=0, atol=1e-6)
    for name, ft in seq.transforms.items():
        np.testing.assert_array_equal(got.transforms[name].valid, ft.valid, err_msg=name)
        # equal to the source within 1e-6 (relative to each value's magnitude, at least 1)
        assert_transforms_close(got.transforms[name].matrices[ft.valid], ft.matrices[ft.valid], rtol=1e-6)
    assert summary.fps == pytest.approx(30.0, rel=1e-3)
    assert summary.interpolated == 0
