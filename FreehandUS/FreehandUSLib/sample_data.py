"""The PLUS toolkit's sample recordings, as Slicer's Sample Data module offers them.

The recordings stay outside this repository: they are files of the PLUS toolkit's public test
data repository (PlusLibData, BSD 3-Clause), downloaded from it at a fixed commit and checked by
SHA-256 before use. ``FreehandUS.registerSampleData`` adds one Sample Data entry per
:class:`SampleRecording` (category "FreehandUS"); ``FreehandUS.downloadSampleData`` downloads
an entry into Slicer's cache and loads its recordings as sequence browsers.

Nothing here imports slicer or downloads anything: this module only describes the data.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import FreehandUSError

__all__ = [
    "PLUS_DATA_COMMIT",
    "PLUS_DATA_LICENSE",
    "PLUS_DATA_REPOSITORY",
    "SAMPLES",
    "SampleFile",
    "SampleRecording",
    "sample_named",
]

#: Where the files come from: the PLUS toolkit's test data, at the commit they were checked at.
PLUS_DATA_REPOSITORY = "https://github.com/PlusToolkit/PlusLibData"
PLUS_DATA_COMMIT = "51dcbb76d9f29fad94cf80788a7a0b7c704fb5dc"
PLUS_DATA_LICENSE = "BSD 3-Clause (PLUS toolkit, PlusLibData/License.txt)"
_RAW_URL = "https://raw.githubusercontent.com/PlusToolkit/PlusLibData/{commit}/{path}"


@dataclass(frozen=True, eq=False)
class SampleFile:
    """One file of PlusLibData: its path there and its SHA-256 (hex)."""

    path: str
    sha256: str

    @property
    def name(self) -> str:
        """The file name (what it is called in Slicer's cache)."""
        return self.path.rsplit("/", 1)[-1]

    @property
    def url(self) -> str:
        """Download URL of the file at :data:`PLUS_DATA_COMMIT`."""
        return _RAW_URL.format(commit=PLUS_DATA_COMMIT, path=self.path)

    @property
    def checksum(self) -> str:
        """The checksum as Slicer's SampleData takes it (``SHA256:<hex>``)."""
        return f"SHA256:{self.sha256}"

    @property
    def is_recording(self) -> bool:
        """A tracked sequence (loaded as a browser) rather than a PLUS configuration."""
        return self.name.endswith((".igs.mha", ".igs.nrrd", ".seq.nrrd"))

    def to_dict(self) -> dict:
        return {"path": self.path, "sha256": self.sha256, "url": self.url}


@dataclass(frozen=True, eq=False)
class SampleRecording:
    """A Sample Data entry: recordings (loaded as browsers) and the PLUS config that goes with them.

    ``module`` names the FreehandUS module the sample is for; ``description`` says what to do.
    """

    name: str
    module: str
    description: str
    files: tuple = field(default_factory=tuple)

    def __str__(self) -> str:
        names = ", ".join(f.name for f in self.files)
        return f"{self.name} ({self.module}): {names}"

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "module": self.module,
            "description": self.description,
            "files": [f.to_dict() for f in self.files],
        }


SAMPLES = (
    SampleRecording(
        name="FreehandUSSpinePhantom",
        module="FreehandUS",
        description="PLUS spine phantom freehand sweep (tracked, 2D frames) and the PLUS volume reconstruction "
        "config (ImageToProbe, nearest neighbour, mean): reconstruct it in Freehand US, or estimate its "
        "trajectory in Sensorless Tracking and compare with the tracking.",
        files=(
            SampleFile(
                "TestImages/SpinePhantomFreehand.igs.mha",
                "55b500e987a2053a69df93ae08d109981df2ff8865d7b8e50643c9d6559205c0",
            ),
            SampleFile(
                "ConfigFiles/Testing/PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml",
                "7c566e59ac72410ef303c9203fa2b82fcf052745f213921b0b4f1b5a143b79a7",
            ),
        ),
    ),
    SampleRecording(
        name="FreehandUSNWireCalibration",
        module="NWireCalibration",
        description="PLUS fCal 2.0 N-wire calibration and validation recordings with their PLUS config: "
        "calibrate ImageToProbe in N-Wire Calibration.",
        files=(
            SampleFile(
                "TestImages/fCal_Test_Calibration_3NWires_fCal2.0.igs.mha",
                "df5da2c98d7bb32a654b36c9dd1bcb1570a4a9fa14f4756052b6e60647450512",
            ),
            SampleFile(
                "TestImages/fCal_Test_Validation_3NWires_fCal2.0.igs.mha",
                "c0c14fdd436431feddcd6182d5cba5f170e07d143a1d4fdda1a09cf25b5a15c4",
            ),
            SampleFile(
                "ConfigFiles/PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml",
                "1b0bd9de8a804f4925946d99ad9ed061e454a104017df0ca6370319f0541199d",
            ),
        ),
    ),
)


def sample_named(name: str) -> SampleRecording:
    """The sample called ``name``.

    Raises
    ------
    FreehandUSError
        No such sample (the message lists the known names).
    """
    for sample in SAMPLES:
        if sample.name == name:
            return sample
    raise FreehandUSError(f"no FreehandUS sample data named {name!r}; expected one of {[s.name for s in SAMPLES]}")
