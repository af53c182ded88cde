"""The modules' own self-tests of cancelling, run headless through the fresh-Slicer harness.

``Testing/foundation/fresh_slicer_harness.py`` runs named methods of ``<Module>Test`` on
slicer-core with the real MRML scene (stand-ins for qt and the parameter node wrapper, so the
panels themselves are not exercised: the Cancel button's Qt wiring is covered only by reading).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

HARNESS = Path(__file__).resolve().parents[1] / "foundation" / "fresh_slicer_harness.py"
REPO_ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.mrml


@pytest.mark.parametrize("module, method", [("FreehandUS", "test_cancelReconstruction")])
def test_module_self_test(module, method):
    pytest.importorskip("slicer")
    run = subprocess.run([sys.executable, str(HARNESS), module, method], capture_output=True, text=True,
                         timeout=600, cwd=REPO_ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["error"] is None, result["error"]
