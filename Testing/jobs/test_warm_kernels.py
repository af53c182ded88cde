"""The kernels' warm-up process fills numba's cache, so a new process (Slicer) compiles nothing.

Issue 22, item 5 (the first numba compile blocked the GUI): ``python -m
FreehandUSLib.warm_kernels`` runs beside Slicer. Checked with numba's own counters: in a fresh
process over the warmed cache a reconstruction (linear, max, hole filling) has cache hits and no
cache misses; over an empty cache the same reconstruction misses (the check can fail).
Both processes use a temporary ``NUMBA_CACHE_DIR``. Slow: the cold compile takes about a minute.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from FreehandUSLib.jobs import ProcessJob

pytestmark = pytest.mark.slow

COUNT_CACHE_USE = """
import json, sys
from numba.core.registry import CPUDispatcher
from FreehandUSLib.reconstruction import ReconstructionOptions, reconstruct_volume
from FreehandUSLib.reconstruction.cli import DEFAULT_HOLE_FILLING
from FreehandUSLib.warm_kernels import _tiny_sweep
options = ReconstructionOptions(output_spacing_mm=0.5, interpolation="linear", compounding="max", fill_holes=True,
                                hole_filling=DEFAULT_HOLE_FILLING, image_to_reference_transform="ImageToReference")
reconstruct_volume(_tiny_sweep(), None, options)
hits = misses = 0
for name, module in list(sys.modules.items()):
    if name.startswith("FreehandUSLib.reconstruction"):
        for obj in vars(module).values():
            if isinstance(obj, CPUDispatcher):
                hits += sum(obj.stats.cache_hits.values())
                misses += sum(obj.stats.cache_misses.values())
print(json.dumps({"hits": hits, "misses": misses}))
"""


def _cache_use(cache_dir) -> dict:
    run = subprocess.run([sys.executable, "-c", COUNT_CACHE_USE], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)})
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_the_warm_up_process_fills_the_cache_a_new_process_uses(tmp_path):
    job = ProcessJob.python_module("FreehandUSLib.warm_kernels", env={"NUMBA_CACHE_DIR": str(tmp_path / "warm")})
    try:
        assert job.wait(600) == 0, job.error_text()
    finally:
        job.cancel()
    events = job.poll()
    assert [e["event"] for e in events][0] == "started" and events[-1]["event"] == "done"
    progress = [(e["done"], e["total"]) for e in events if e["event"] == "progress"]
    assert progress == [(i, 12) for i in range(1, 13)]

    warmed = _cache_use(tmp_path / "warm")
    assert warmed["misses"] == 0 and warmed["hits"] > 0, warmed
    cold = _cache_use(tmp_path / "cold")
    assert cold["misses"] > 0 and cold["hits"] == 0, cold
