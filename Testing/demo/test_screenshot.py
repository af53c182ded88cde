"""The catalog screenshot (docs/images/FreehandUS-screenshot.png) is what Resources/make_screenshot.py draws.

The script renders a demo run (a reconstructed volume and an N-wire calibration); the committed
PNG must match a fresh rendering of ``freehandus demo --quick`` (seeded: the same picture, up to
antialiasing), so the catalog never shows a stale or hand-edited picture.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT = REPO_ROOT / "docs" / "images" / "FreehandUS-screenshot.png"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("make_screenshot", REPO_ROOT / "Resources" / "make_screenshot.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_centre_slices_crop_to_the_reached_voxels(script):
    voxels = np.zeros((10, 20, 30), dtype=np.float32)
    voxels[2:6, 5:15, 10:28] = 1.0
    (title_j, slice_j, extent_j), (title_k, slice_k, extent_k) = script.centre_slices(voxels, (0.5, 1.0, 2.0))
    assert title_j == "slice j = 10" and slice_j.shape == (4, 18) and np.all(slice_j == 1.0)
    assert title_k == "slice k = 4" and slice_k.shape == (10, 18)
    assert extent_j == (5.0, 14.0, 12.0, 4.0)  # x from i (0.5 mm), z from k (2 mm), top at the first k
    assert extent_k == (5.0, 14.0, 15.0, 5.0)


def test_calibration_lines_report_errors_and_the_matrix(script):
    calibration = {
        "phantom": "fCal-2.0 1.0",
        "solver": "ransac-lm",
        "pixel_spacing_mm": [0.2, 0.25],
        "calibration": {"frames_used": 38, "frames_total": 40, "error3d_mean_mm": 0.6},
        "validation": {"frames_used": 14, "frames_total": 15, "error3d_mean_mm": 0.29},
        "ImageToProbe": np.diag([0.2, 0.25, 1.0, 1.0]).tolist(),
    }
    lines = script.calibration_lines(calibration)
    assert "38 of 40 frames used, 3D error 0.60 mm" in lines[1]
    assert "14 of 15 frames, 3D error 0.29 mm" in lines[2]
    assert lines[-4].split() == ["0.200", "0.000", "0.000", "0.000"] and len(lines) == 9


def test_refuses_a_folder_that_is_not_a_demo_output(script, tmp_path, capsys):
    assert script.main(["--demo", str(tmp_path), "--out", str(tmp_path / "x.png")]) == 2
    assert "not a demo output folder" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_committed_screenshot_is_a_fresh_rendering(script, tmp_path):
    image = pytest.importorskip("PIL.Image")
    fresh = tmp_path / "screenshot.png"
    assert script.main(["--out", str(fresh)]) == 0  # runs `freehandus demo --quick`
    committed = np.asarray(image.open(SCREENSHOT).convert("RGB"), dtype=float)
    drawn = np.asarray(image.open(fresh).convert("RGB"), dtype=float)
    assert committed.shape == drawn.shape == (760, 1500, 3)
    assert np.abs(committed - drawn).mean() < 2.0, "stale: run python Resources/make_screenshot.py"
    assert drawn.std() > 20.0, "the rendering has no content"
