"""The PLUS sample recordings offered through Slicer's Sample Data module.

- ``FreehandUSLib.sample_data``: each file's SHA-256 is that of the PLUS test data we test on
  (``../shared/data/plus``, copied unchanged from PlusLibData at the same commit), its URL points
  at that commit, and each module has a sample.
- ``FreehandUS.registerSampleData`` registers them with ``SampleData.SampleDataLogic`` (a stand-in
  that records the registration and "downloads" from ``../shared/data/plus`` after checking the
  checksum, as SampleData does), and the entry's download button (``customDownloader``) loads the
  recordings as sequence browsers on real MRML (slicer-core) with the PLUS config beside them.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from FreehandUSLib import FreehandUSError
from FreehandUSLib.sample_data import PLUS_DATA_COMMIT, SAMPLES, sample_named
from testdata import PLUS_DATA

REPO_ROOT = Path(__file__).resolve().parents[2]
HARNESS_DIR = Path(__file__).resolve().parent


def _local(path: str) -> Path:
    """The shared copy of a PlusLibData file (configs of ConfigFiles/Testing/ are flattened there)."""
    return PLUS_DATA / path.replace("ConfigFiles/Testing/", "ConfigFiles/")


def test_samples_cover_the_modules_and_point_at_one_commit():
    assert {s.module for s in SAMPLES} == {"FreehandUS", "NWireCalibration"}
    names = [s.name for s in SAMPLES]
    assert len(set(names)) == len(names) and all(n.startswith("FreehandUS") for n in names)
    for sample in SAMPLES:
        assert any(f.is_recording for f in sample.files) and sum(not f.is_recording for f in sample.files) == 1
        for sample_file in sample.files:
            assert sample_file.url == (
                f"https://raw.githubusercontent.com/PlusToolkit/PlusLibData/{PLUS_DATA_COMMIT}/{sample_file.path}"
            )
            assert len(sample_file.sha256) == 64 and sample_file.checksum == f"SHA256:{sample_file.sha256}"
        assert json.loads(json.dumps(sample.to_dict()))["name"] == sample.name
    assert sample_named("FreehandUSSpinePhantom").module == "FreehandUS"
    with pytest.raises(FreehandUSError, match="no FreehandUS sample data named 'Spine'"):
        sample_named("Spine")


@pytest.mark.realdata
@pytest.mark.parametrize("sample", SAMPLES, ids=[s.name for s in SAMPLES])
def test_checksums_are_those_of_the_plus_test_data(sample):
    for sample_file in sample.files:
        local = _local(sample_file.path)
        if not local.is_file():
            pytest.skip(f"PLUS test data not found: {local}")
        assert hashlib.sha256(local.read_bytes()).hexdigest() == sample_file.sha256, sample_file.path


_SCRIPT = r"""
import hashlib, json, sys, types
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import fresh_slicer_harness as harness
slicer = harness.setup_slicer(False, Path(sys.argv[2]))
plus = Path(sys.argv[3])
registered, downloads = [], []

class SampleDataLogic:
    @staticmethod
    def registerCustomSampleDataSource(**options):
        registered.append(options)

    def downloadFileIntoCache(self, uri, name, checksum=None, forceDownload=False):
        path = uri.split("/PlusLibData/", 1)[1].split("/", 1)[1].replace("ConfigFiles/Testing/", "ConfigFiles/")
        local = plus / path
        algorithm, digest = checksum.split(":")
        assert algorithm == "SHA256" and hashlib.sha256(local.read_bytes()).hexdigest() == digest, uri
        downloads.append(name)
        return str(local)

sys.modules["SampleData"] = types.SimpleNamespace(SampleDataLogic=SampleDataLogic)
import FreehandUS
FreehandUS.registerSampleData()
loaded = {}
for options in registered:
    source = types.SimpleNamespace(sampleName=options["sampleName"])
    result = options["customDownloader"](source)
    loaded[options["sampleName"]] = {
        "browsers": [b.GetName() for b in result["browsers"]],
        "frames": [FreehandUS.FreehandUSLogic().sequenceSummary(b)["frames"] for b in result["browsers"]],
        "config": result["config"],
    }
summary = [{k: v for k, v in o.items() if k != "customDownloader"} for o in registered]
print(json.dumps({"registered": summary, "loaded": loaded, "downloads": downloads}))
"""


@pytest.mark.mrml
@pytest.mark.realdata
def test_register_and_load_sample_data(tmp_path):
    pytest.importorskip("slicer")
    if not PLUS_DATA.is_dir():
        pytest.skip(f"PLUS test data folder not found: {PLUS_DATA}")
    result = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(HARNESS_DIR), str(tmp_path), str(PLUS_DATA)],
        capture_output=True, text=True, timeout=600, cwd=REPO_ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    registered = {r["sampleName"]: r for r in report["registered"]}
    assert set(registered) == {s.name for s in SAMPLES}
    for sample in SAMPLES:
        entry = registered[sample.name]
        assert entry["category"] == "FreehandUS"
        assert entry["uris"] == [f.url for f in sample.files]
        assert entry["checksums"] == [f.checksum for f in sample.files]
        assert entry["loadFiles"] == [False] * len(sample.files), "SampleData must not load them with its reader"
        assert Path(entry["thumbnailFileName"]).is_file()
        loaded = report["loaded"][sample.name]
        recordings = [f for f in sample.files if f.is_recording]
        assert len(loaded["browsers"]) == len(recordings) and all(n > 0 for n in loaded["frames"])
        assert Path(loaded["config"]).name == next(f.name for f in sample.files if not f.is_recording)
    calibration, validation = report["loaded"]["FreehandUSNWireCalibration"]["browsers"]
    assert calibration.startswith("fCal_Test_Calibration") and validation.startswith("fCal_Test_Validation")
