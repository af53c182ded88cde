"""Live pipelines: a replayed stream reconstructed on the fly equals the offline reconstruction."""

from __future__ import annotations

import numpy as np
import pytest
from testdata import plus_file

from FreehandUSLib.simulation.analytic import simulate_analytic_sweep
from FreehandUSLib.igtl import IGTLClient, ImageMessage, ReplayServer
from FreehandUSLib.igtl.live import run_live
from FreehandUSLib.reconstruction.live import LiveReconstructionSink, live_reconstruct, reconstruct_for_command
from FreehandUSLib.igtl.pairing import FramePairer
from FreehandUSLib.io import read_sequence, read_volume

reconstruction = pytest.importorskip("FreehandUSLib.reconstruction")
pytestmark = pytest.mark.timeout(120)
TIMEOUT = 10.0


@pytest.fixture(scope="module")
def sweep():
    return simulate_analytic_sweep(n_frames=40, n_rows=80, n_cols=64, pixel_spacing_mm=0.4, step_mm=0.5)


def roi_options(sequence, image_to_probe, name):
    """A fixed ROI covering the sweep, so live and offline share one grid."""
    opts = reconstruction.ReconstructionOptions(
        output_spacing_mm=(1.0, 1.0, 1.0), image_to_reference_transform=name
    )
    grid = reconstruction.reconstruct_volume(sequence, {"ImageToProbe": image_to_probe}, opts).grid
    extent = tuple(v for d in grid.dims for v in (0, d - 1))
    return reconstruction.ReconstructionOptions(
        output_spacing_mm=(1.0, 1.0, 1.0),
        output_origin_mm=tuple(grid.origin_mm),
        output_extent=extent,
        image_to_reference_transform=name,
    )


def assert_volumes_agree(live, offline, *, min_fraction=0.99):
    a, b = live.volume.voxels, offline.volume.voxels
    assert a.shape == b.shape
    same = np.mean(np.abs(a.astype(int) - b.astype(int)) <= 1)
    # Poses travel as float32: a few boundary voxels may take a neighbouring pixel.
    assert same >= min_fraction, f"only {100 * same:.2f} % of voxels agree"


@pytest.mark.parametrize("pose", ["embedded", "transforms"])
def test_live_reconstruction_matches_offline(sweep, pose):
    seq, image_to_probe = sweep
    options = roi_options(seq, image_to_probe, "ImageToTracker")
    offline = reconstruction.reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, options)
    with ReplayServer(seq, port=0, fps=0, embedded_frame="Tracker", image_to_probe=image_to_probe) as server:
        result, summary = live_reconstruct(
            "127.0.0.1",
            server.port,
            options=options,
            pose=pose,
            fixed_transforms={"ImageToProbe": image_to_probe},
            frames=seq.n_frames,
        )
    assert summary.frames == seq.n_frames and summary.dropped == 0
    assert result.frames_used == seq.n_frames and result.frames_dropped == 0
    assert_volumes_agree(result, offline)


def test_run_live_feeds_every_sink_and_counts_frames_without_pose(sweep):
    seq, image_to_probe = sweep
    seq = seq.select(slice(0, 12))
    collected = []
    sink = LiveReconstructionSink(
        options=reconstruction.ReconstructionOptions(output_spacing_mm=(1.0, 1.0, 1.0)),
        pose="transforms",
        fixed_transforms={},  # no ImageToProbe: no frame has a pose
        image_to_reference="ImageToTracker",
    )
    with ReplayServer(seq, port=0, fps=0) as server:
        client = IGTLClient("127.0.0.1", server.port).start()
        try:
            assert client.wait_for_state("connected", TIMEOUT)
            summary = run_live(client, [collected.append, sink], frames=12, pairer=FramePairer())
        finally:
            client.close()
    assert summary.frames == 12 and len(collected) == 12
    assert [p.frame[0, 0] for p in collected] == [f[0, 0] for f in seq.frames]
    assert all(p.transforms["ProbeToTracker"][1] for p in collected)
    assert sink.frames_without_pose == 12
    assert summary.sinks["1"]["frames_skipped"] == 12
    with pytest.raises(reconstruction.NoUsableFramesError):
        sink.result()


def test_reconstruct_volume_command_writes_and_sends_the_volume(sweep, tmp_path):
    seq, image_to_probe = sweep
    options = reconstruction.ReconstructionOptions(
        output_spacing_mm=(1.0, 1.0, 1.0), image_to_reference_transform="ImageToTracker"
    )
    offline = reconstruction.reconstruct_volume(seq, {"ImageToProbe": image_to_probe}, options)
    with ReplayServer(seq, port=0, fps=30, loop=True, output_dir=tmp_path, embedded_frame="Tracker",
                      image_to_probe=image_to_probe, reconstruction_options=options,
                      reconstruct_command=reconstruct_for_command) as server:  # fmt: skip
        client = IGTLClient("127.0.0.1", server.port).start()
        try:
            assert client.wait_for_state("connected", TIMEOUT)
            reply = client.command("ReconstructVolume", timeout_s=60, OutputVolFilename="vol.mha",
                                   OutputVolDeviceName="Volume")  # fmt: skip
            assert reply.ok, reply
            assert reply.message.startswith(str(tmp_path / "vol.mha"))
            volume_msg = None
            for _ in range(10_000):
                m = client.get(timeout_s=TIMEOUT)
                assert m is not None
                if isinstance(m, ImageMessage) and m.device_name == "Volume":
                    volume_msg = m
                    break
            bad = client.command("ReconstructVolume", InputSeqFilename="missing.igs.mha")
            assert not bad.ok and "missing.igs.mha" in bad.message
            first = (tmp_path / "vol.mha").read_bytes()
            again = client.command("ReconstructVolume", timeout_s=60, OutputVolFilename="vol.mha",
                                   OutputSpacing="2 2 2")  # fmt: skip
            assert not again.ok and "vol.mha exists in the output folder" in again.message
            assert (tmp_path / "vol.mha").read_bytes() == first  # a remote command never replaces a file
        finally:
            client.close()
    written = read_volume(tmp_path / "vol.mha")
    np.testing.assert_array_equal(written.voxels, offline.volume.voxels)
    assert volume_msg is not None and volume_msg.pixels.shape == offline.volume.voxels.shape
    np.testing.assert_array_equal(volume_msg.pixels, offline.volume.voxels)
    np.testing.assert_allclose(volume_msg.ijk_to_world[:3, 3], offline.volume.origin_mm, atol=1e-3)


def test_reconstruct_volume_command_without_calibration_fails_clearly(sweep, tmp_path):
    seq, _ = sweep
    with ReplayServer(seq, port=0, fps=30, loop=True, output_dir=tmp_path,
                      reconstruct_command=reconstruct_for_command) as server:  # fmt: skip
        client = IGTLClient("127.0.0.1", server.port).start()
        try:
            assert client.wait_for_state("connected", TIMEOUT)
            reply = client.command("ReconstructVolume", timeout_s=30)
        finally:
            client.close()
    assert not reply.ok and "ReconstructVolume failed" in reply.message and "Image" in reply.message


def test_live_pose_option_is_checked():
    with pytest.raises(ValueError, match="pose"):
        LiveReconstructionSink(pose="guess")
    with pytest.raises(ValueError, match="can end"):
        live_reconstruct("127.0.0.1", 1)


@pytest.mark.realdata
@pytest.mark.slow
def test_live_spine_phantom_matches_offline_plus_reconstruction():
    from FreehandUSLib.io.plus_config import read_plus_config

    seq = read_sequence(plus_file("TestImages/SpinePhantomFreehand.igs.mha"))
    config = read_plus_config(
        plus_file("ConfigFiles/PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml")
    )
    fixed = config.coordinate_definitions.repository_fixed()
    options = reconstruction.options_from_plus_config(config)
    offline = reconstruction.reconstruct_volume(seq, fixed, options)
    grid = offline.grid
    import dataclasses

    fixed_roi = dataclasses.replace(
        options,
        output_origin_mm=tuple(grid.origin_mm),
        output_extent=tuple(v for d in grid.dims for v in (0, d - 1)),
    )
    with ReplayServer(seq, port=0, fps=0, fixed_transforms=fixed) as server:
        assert server.image_device == "Image_Reference"
        result, summary = live_reconstruct("127.0.0.1", server.port, options=fixed_roi, frames=seq.n_frames)
    assert summary.dropped == 0 and result.frames_used == offline.frames_used
    assert_volumes_agree(result, dataclasses.replace(offline), min_fraction=0.99)
