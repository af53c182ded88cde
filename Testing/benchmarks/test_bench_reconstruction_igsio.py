"""The IGSIO side-by-side machinery of ``bench_reconstruction.py`` (no IGSIO build needed).

Each mode's config copy reads back as that mode, the repeated recording is a valid recording,
the launcher measures the child's own time, return code and peak memory, the fidelity counts
what it says, and without the executable the section says why and writes that down.
"""

from __future__ import annotations

import argparse
import json
import sys

import bench_reconstruction as bench
import numpy as np
import pytest
from testdata import plus_file

from FreehandUSLib import TrackedSequence
from FreehandUSLib.io import read_sequence, write_sequence, write_volume
from FreehandUSLib.io.plus_config import read_plus_config
from FreehandUSLib.reconstruction import options_from_plus_config
from FreehandUSLib.volume import Volume

EXPECTED = {  # mode: (interpolation, compounding, fill_holes, fan)
    "NN_MEAN+STICK": ("nearest", "mean", True, False),
    "LN_MAXI": ("linear", "max", False, False),
    "NN_LATE (fan)": ("nearest", "latest", False, True),
    "LI_MEAN": ("linear", "mean", False, False),
    "NN_MAXI": ("nearest", "max", False, False),
    "LI_LATEST": ("linear", "latest", False, False),
}


@pytest.mark.realdata
@pytest.mark.parametrize("mode", list(EXPECTED))
def test_mode_config_reads_back_as_that_mode(tmp_path, mode):
    template = plus_file("ConfigFiles/PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml")
    path = bench.write_mode_config(template, bench.IGSIO_MODES[mode], 2, tmp_path / "c.xml")
    config = read_plus_config(path)
    opts = options_from_plus_config(config)
    interpolation, compounding, fill, fan = EXPECTED[mode]
    assert (opts.interpolation, opts.compounding, opts.fill_holes) == (interpolation, compounding, fill)
    assert opts.number_of_threads == 2
    assert (opts.fan_angles_deg is not None) == fan
    assert len(opts.hole_filling) == (1 if fill else 0)
    assert opts.output_spacing_mm == (0.5, 0.5, 0.5)
    # the calibration and Phantom->Reference of the template are kept
    assert config.coordinate_definitions.repository_fixed() is not None
    if mode == "LN_MAXI":  # the same settings as PLUS's own LN_MAXI config
        ln_maxi = plus_file("ConfigFiles/PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_LN_MAXI.xml")
        plus = read_plus_config(ln_maxi)
        assert options_from_plus_config(plus, number_of_threads=2) == opts


def _small_sequence(n=3):
    frames = np.arange(n * 4 * 5, dtype=np.uint8).reshape(n, 4, 5)
    mats = np.tile(np.eye(4), (n, 1, 1))
    mats[:, 0, 3] = np.arange(n)
    return TrackedSequence(frames=frames, timestamps_s=10.0 + 0.1 * np.arange(n),
                           transforms={"ProbeToTracker": (mats, np.array([True, False, True][:n]))})


def test_repeated_sequence_keeps_order_and_transforms_with_increasing_timestamps(tmp_path):
    seq = _small_sequence()
    out = bench.repeated_sequence(seq, 7)
    assert out.n_frames == 7
    np.testing.assert_array_equal(out.frames, seq.frames[[0, 1, 2, 0, 1, 2, 0]])
    np.testing.assert_array_equal(out.transforms["ProbeToTracker"].matrices[:, 0, 3], [0, 1, 2, 0, 1, 2, 0])
    np.testing.assert_array_equal(out.transforms["ProbeToTracker"].valid, [1, 0, 1, 1, 0, 1, 1])
    assert np.all(np.diff(out.timestamps_s) > 0)
    np.testing.assert_allclose(out.timestamps_s[3] - out.timestamps_s[2], 0.1)
    back = read_sequence(write_sequence(out, tmp_path / "r.igs.mha"))
    np.testing.assert_array_equal(back.frames, out.frames)
    np.testing.assert_allclose(back.timestamps_s, out.timestamps_s)


def test_run_measured_reports_the_childs_time_return_code_and_peak_memory(tmp_path):
    big = bench.run_measured([sys.executable, "-c", "x = b'1' * (300 * 2**20); import sys; sys.exit(3)"],
                             tmp_path / "big.log", tmp_path)
    small = bench.run_measured([sys.executable, "-S", "-c", "print('hello')"], tmp_path / "small.log", tmp_path)
    assert big["returncode"] == 3 and small["returncode"] == 0
    assert 300 * 2**20 < big["peak_rss_bytes"] < 500 * 2**20
    # not the launcher's parent (this test process, with numpy and the library loaded)
    assert small["peak_rss_bytes"] < 60 * 2**20
    assert 0 < small["seconds"] < big["seconds"] + 10
    assert (tmp_path / "small.log").read_text().strip() == "hello"


def test_voxel_fidelity_counts_voxels_non_empty_in_either(tmp_path):
    a = np.zeros((4, 5, 6), np.uint8)
    a[0, 0, :4] = [10, 20, 30, 40]
    b = a.copy()
    b[0, 0, 1] = 22  # within 2
    b[0, 0, 2] = 0  # empty in one of them
    b[1, 1, 1] = 7  # only in the other
    write_volume(Volume(a, spacing_mm=(0.5, 0.5, 0.5), origin_mm=(1, 2, 3)), tmp_path / "a.mha")
    write_volume(Volume(b, spacing_mm=(0.5, 0.5, 0.5), origin_mm=(1, 2, 3)), tmp_path / "b.mha")
    fid = bench.voxel_fidelity(tmp_path / "a.mha", tmp_path / "b.mha")
    assert fid["same_grid"] and fid["nonempty_voxels"] == 5
    assert fid["identical_share"] == pytest.approx(2 / 5)
    assert fid["within_2_share"] == pytest.approx(3 / 5)
    assert fid["max_abs_difference"] == 30
    write_volume(Volume(b, spacing_mm=(0.5, 0.5, 0.5), origin_mm=(1, 2, 3.5)), tmp_path / "c.mha")
    moved = bench.voxel_fidelity(tmp_path / "a.mha", tmp_path / "c.mha")
    assert not moved["same_grid"] and "identical_share" not in moved


def test_without_the_executable_the_section_says_why_and_writes_it(tmp_path, monkeypatch, capsys):
    assert bench.igsio_executable({})[0] is None
    not_exe = tmp_path / "VolumeReconstructorTest"
    not_exe.write_text("")
    exe, why = bench.igsio_executable({bench.IGSIO_ENV: str(not_exe)})
    assert exe is None and "not an executable" in why
    not_exe.chmod(0o755)
    assert bench.igsio_executable({bench.IGSIO_ENV: str(not_exe)}) == (not_exe.resolve(), "")

    monkeypatch.delenv(bench.IGSIO_ENV, raising=False)
    args = argparse.Namespace(igsio_out=str(tmp_path / "out" / "igsio.json"), igsio_frames=[21], igsio_threads=[1],
                              igsio_modes=["LN_MAXI"], igsio_repeats=1)
    report = bench.run_igsio_side_by_side(args)
    assert bench.IGSIO_ENV in report["skipped"]
    assert json.loads((tmp_path / "out" / "igsio.json").read_text()) == report
    assert "Skipped: " + report["skipped"] in (tmp_path / "out" / "igsio.md").read_text()
    assert "IGSIO side by side skipped" in capsys.readouterr().out

    # an IGSIO build but no freehandus beside the running python
    monkeypatch.setenv(bench.IGSIO_ENV, str(not_exe))
    monkeypatch.setattr(bench.sys, "executable", str(tmp_path / "bin" / "python"))
    report = bench.run_igsio_side_by_side(args)
    assert report["skipped"].startswith(f"{tmp_path / 'bin' / 'freehandus'} not found")


def test_markdown_table_has_one_row_per_case_with_the_ratio():
    row = {"frames": 210, "mode": "LN_MAXI", "threads": 1, "ours_seconds": 3.0, "igsio_seconds": 6.0,
           "ratio_ours_over_igsio": 0.5, "ours_peak_rss_bytes": 300e6, "igsio_peak_rss_bytes": 200e6,
           "fidelity": {"same_grid": True, "identical_share": 0.999, "within_2_share": 1.0},
           "load_after": [1.5, 1.0, 0.5]}
    failed = {"frames": 21, "mode": "LI_MEAN", "threads": 2, "error": "igsio exited 1: bad | thing"}
    report = {"igsio": "/x/VolumeReconstructorTest", "repeats": 3, "rows": [row, failed],
              "commit": {"commit": "abc123 msg", "uncommitted_library_files": []},
              "machine": {"cpus": 2, "python": "3.12", "load_start": [1, 1, 1], "load_end": [2, 2, 2]}}
    md = bench.igsio_markdown(report)
    assert "| 210 | LN_MAXI | 1 | 3.00 | 6.00 | 0.50 | 300 | 200 | 99.90 % | 100.00 % |  |  | 1.50 |" in md
    assert "| 21 | LI_MEAN | 2 | failed: igsio exited 1: bad / thing" in md
    assert "- commit: abc123 msg\n" in md and "before 1.00/1.00/1.00, after 2.00/2.00/2.00" in md
    report["commit_at_end"] = {"commit": "def456 next", "uncommitted_library_files": ["M kernels.py"]}
    assert "- commit: abc123 msg; at the end: def456 next (uncommitted: M kernels.py)\n" in bench.igsio_markdown(report)


@pytest.mark.parametrize("flags", [["--igsio-repeats", "0"], ["--igsio-frames", "21", "0"], ["--igsio-threads", "-1"]])
def test_non_positive_counts_are_one_clear_error(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(["--igsio-only", "--igsio-out", str(tmp_path / "x.json"), *flags])
    assert exc.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
