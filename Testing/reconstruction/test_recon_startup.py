"""``freehandus reconstruct`` starts lean: it imports neither the other capabilities nor their libraries.

Start-up is most of the run on short recordings (issue: a whole 21-frame PLUS reconstruction
takes 0.2 s in IGSIO's C++), so the command must not pay for torch, opencv, the N-wire or
sensorless code, the OpenIGTLink stack or scipy's rotation module.
"""

from __future__ import annotations

import json
import subprocess
import sys

from recon_synthetic import linear_sweep

from FreehandUSLib.io import write_sequence

_PROBE = """
import json, sys
from FreehandUSApp.cli import main
code = main(sys.argv[1:])
heavy = ["torch", "cv2", "NWireCalibrationLib", "SensorlessTrackingLib", "FreehandUSLib.igtl",
         "FreehandUSLib.simulation", "scipy.spatial", "h5py", "matplotlib"]
print(json.dumps({"code": code, "loaded": [m for m in heavy if m in sys.modules]}))
"""


def test_reconstruct_imports_only_what_it_uses(tmp_path):
    seq = linear_sweep(n_frames=4, value=90)
    path = write_sequence(seq, tmp_path / "sweep.igs.mha")
    run = subprocess.run(
        [sys.executable, "-c", _PROBE, "reconstruct", str(path), "--spacing", "1", "--out", str(tmp_path / "v.mha")],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report == {"code": 0, "loaded": []}
    assert (tmp_path / "v.mha").is_file()


def test_help_still_lists_every_command():
    run = subprocess.run([sys.executable, "-m", "FreehandUSApp.cli", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0
    listed = {line.split()[0] for line in run.stdout.splitlines() if line.startswith("    ") and line.strip()}
    for command in ("reconstruct", "detect", "calibrate", "simulate", "track", "serve", "record", "calibrate-live"):
        assert command in listed


def test_plus_arithmetic_on_the_c_kernels_never_loads_numba(tmp_path):
    """``--emulate-plus`` with given fan angles and no hole filling runs without numba or scipy.

    Importing numba (and, through it, scipy) and loading its cached kernels is about half a
    second and 60 MB: more than IGSIO's whole run on a 21-frame recording.
    """
    from FreehandUSLib.reconstruction import native

    if not native.available():
        import pytest

        pytest.skip("the C kernels are not built (python -m FreehandUSLib.reconstruction.native_build)")
    seq = linear_sweep(n_frames=6, value=90)
    path = write_sequence(seq, tmp_path / "sweep.igs.mha")
    probe = _PROBE.replace('"matplotlib"]', '"matplotlib", "numba", "scipy", "llvmlite"]')
    for interpolation in ("nearest", "linear"):
        for compounding in ("mean", "max", "latest"):
            out = tmp_path / f"{interpolation}-{compounding}.mha"
            run = subprocess.run(
                [sys.executable, "-c", probe, "reconstruct", str(path), "--spacing", "1", "--emulate-plus",
                 "--interpolation", interpolation, "--compounding", compounding, "--threads", "2", "--out", str(out)],
                capture_output=True, text=True, timeout=300,
            )
            assert run.returncode == 0, run.stderr
            report = json.loads(run.stdout.strip().splitlines()[-1])
            assert report == {"code": 0, "loaded": []}, (interpolation, compounding)
            assert out.is_file()
