"""3D Slicer module "Freehand US": tracked ultrasound recordings in and out of the MRML scene.

Slicer glue only (Module, parameter node, Widget, Logic, Test, in the order of Slicer's scripted
module template). Everything that computes lives in ``FreehandUSLib``, which never imports
slicer/qt/ctk except its MRML bridge ``FreehandUSLib.mrml``.

Where ``FreehandUSLib`` comes from: Slicer puts the folder of every scripted module it loads on
``sys.path``. The extension installs FreehandUS, NWireCalibration and SensorlessTracking into the
same ``qt-scripted-modules`` folder, so ``import FreehandUSLib`` (and ``import FreehandUS``) works
from all three modules. During development, add the three module folders of the repository to
*Application Settings > Modules > Additional module paths*; the other two modules list
"FreehandUS" as a dependency, so this folder is on ``sys.path`` before they load.
"""

import enum
import importlib
import importlib.util
import logging
import sys
from pathlib import Path
from typing import Annotated

import numpy as np
import slicer
import vtk
from slicer import vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# MRML classes of loadable modules must come from their own packages: they are not yet in the
# slicer namespace when a module file is read (see Slicer's parameter node documentation).
from vtkSlicerMarkupsModuleMRMLPython import vtkMRMLMarkupsROINode
from vtkSlicerSequencesModuleMRMLPython import vtkMRMLSequenceBrowserNode

#: Node attribute naming the file a browser was loaded from (provenance).
SOURCE_FILE_ATTRIBUTE = "FreehandUS.SourceFile"
#: Node attribute naming the file a browser was last saved to.
SAVED_FILE_ATTRIBUTE = "FreehandUS.SavedFile"
#: Node reference from a loaded browser to the ImageToProbe transform used to place its frames.
IMAGE_TO_PROBE_REFERENCE = "FreehandUS.ImageToProbe"


#
# FreehandUS
#


class FreehandUS(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Freehand US")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Ultrasound")]
        self.parent.dependencies = ["Sequences"]
        self.parent.contributors = ["FreehandUS developers"]
        self.parent.helpText = _(
            """
<p>Freehand 3D ultrasound with a tracked 2D probe: load PLUS recordings (.igs.mha, .igs.nrrd,
.seq.nrrd) and TUS-REC scans (.h5) into a sequence browser, inspect them and save them in another
format. Volume reconstruction will be added to this module.</p>
<p>Everything the panel does is available from the Python console:</p>
<pre>
import FreehandUS
logic = FreehandUS.FreehandUSLogic()
browser = logic.loadSequence("/data/SpinePhantomFreehand.igs.mha")
sequence = logic.sequenceFromBrowser(browser)   # numpy frames + named transforms
print(sequence.n_frames, sequence.transform_names)
logic.saveSequence(browser, "/data/spine.seq.nrrd")
</pre>
<p>See the <a href="https://github.com/freehandus/FreehandUS#readme">FreehandUS documentation</a>.</p>
"""
        )
        self.parent.acknowledgementText = _(
            """
FreehandUS follows the coordinate conventions and file formats of the PLUS toolkit
(www.plustoolkit.org) and works alongside SlicerIGT and SlicerOpenIGTLink.
"""
        )


#
# Python dependencies (installed into Slicer's Python on first use)
#

#: Packages FreehandUS may need beyond what Slicer bundles, as import name -> pip requirement.
#: numpy and scipy ship with Slicer; vtk must never be pip-installed into Slicer; torch comes
#: from the PyTorch extension (see SensorlessTracking.ensureTorch).
PYTHON_REQUIREMENTS = {
    "nrrd": "pynrrd>=1.0",
    "h5py": "h5py>=3.9",
    "skimage": "scikit-image>=0.22",
    "cv2": "opencv-python-headless>=4.8",
    "pyigtl": "pyigtl>=0.3.4",
}

#: Extra imports the sequence reader/writer needs, per format of FreehandUSLib.io.sequence_format.
_SEQUENCE_FORMAT_IMPORTS = {"metafile": [], "nrrd": ["nrrd"], "tusrec": ["h5py"]}


def ensurePythonPackages(importNames, *, askConfirmation=True) -> list:
    """Install the missing packages among ``importNames`` into Slicer's Python.

    Parameters
    ----------
    importNames : iterable of str
        Import names (keys of :data:`PYTHON_REQUIREMENTS`), e.g. ``["nrrd", "h5py"]``.
    askConfirmation : bool
        Ask the user before downloading (never asked while Slicer runs tests).

    Returns
    -------
    list of str
        The pip requirements that were installed (empty when nothing was missing).

    Raises
    ------
    ValueError
        If an import name has no known pip requirement.
    RuntimeError
        If the user declines the installation.
    """
    importNames = list(importNames)
    unknown = [name for name in importNames if name not in PYTHON_REQUIREMENTS]
    if unknown:
        raise ValueError(
            f"ensurePythonPackages: no pip requirement known for {unknown}; "
            f"expected import names among {sorted(PYTHON_REQUIREMENTS)}"
        )
    missing = [PYTHON_REQUIREMENTS[name] for name in importNames if importlib.util.find_spec(name) is None]
    if not missing:
        return []
    if askConfirmation and not slicer.app.testingEnabled():
        message = _("FreehandUS needs these Python packages, which will be downloaded and installed now:")
        if not slicer.util.confirmOkCancelDisplay(message + "\n\n" + "\n".join(missing)):
            raise RuntimeError(f"FreehandUS needs {', '.join(missing)}; the installation was cancelled")
    logging.info("Installing Python packages: %s", ", ".join(missing))
    slicer.util.pip_install(missing)
    importlib.invalidate_caches()
    return missing


def sequenceFileImports(path) -> list:
    """Import names the reader/writer of this sequence file needs (see ensurePythonPackages)."""
    from FreehandUSLib.io import sequence_format

    return list(_SEQUENCE_FORMAT_IMPORTS[sequence_format(path)])


def summaryText(info: dict) -> str:
    """One ``key: value`` line per entry of a sequence summary, for a label in the panel."""
    lines = []
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            value = ", ".join(str(v) for v in value)
        elif isinstance(value, float):
            value = f"{value:.4g}"
        lines.append(f"{key.replace('_', ' ')}: {value}")
    return "\n".join(lines)


def _browserNameFromPath(path: Path) -> str:
    """``SpinePhantomFreehand.igs.mha`` -> ``SpinePhantomFreehand``."""
    name = path.name[: -len(path.suffix)] if path.suffix else path.name
    for inner in (".igs", ".seq"):
        if name.lower().endswith(inner):
            name = name[: -len(inner)]
    return name


#
# FreehandUSParameterNode
#


class Interpolation(enum.Enum):
    """How a frame pixel is spread into the volume (values of FreehandUSLib.reconstruction)."""

    NEAREST = "nearest"
    LINEAR = "linear"

    def label(self) -> str:
        return {"NEAREST": _("Nearest neighbour"), "LINEAR": _("Linear")}[self.name]


class Compounding(enum.Enum):
    """How frames that reach the same voxel are combined (values of FreehandUSLib.reconstruction)."""

    MEAN = "mean"
    MAX = "max"
    LATEST = "latest"

    def label(self) -> str:
        return {"MEAN": _("Mean"), "MAX": _("Maximum"), "LATEST": _("Latest")}[self.name]


@parameterNodeWrapper
class FreehandUSParameterNode:
    """
    The parameters of the module, saved with the scene.

    sequencePath - tracked sequence file to load (.igs.mha/.igs.mhd/.igs.nrrd/.seq.nrrd/.h5).
    imageToProbe - ImageToProbe calibration used to place the loaded frames (optional).
    inputBrowser - the tracked recording (sequence browser) the panel works on.
    outputSequencePath - file the recording is saved to; the format follows the name.
    roi - box to reconstruct, in the Reference frame (None: enclose all frames).
    outputSpacingMm - voxel size of the reconstruction, mm.
    interpolation - how a pixel is spread into voxels.
    compounding - how overlapping frames are combined.
    fillHoles - fill voxels no frame reached from their neighbours.
    outputVolume - scalar volume that receives the reconstruction.
    """

    sequencePath: Path
    imageToProbe: vtkMRMLLinearTransformNode
    inputBrowser: vtkMRMLSequenceBrowserNode
    outputSequencePath: Path
    roi: vtkMRMLMarkupsROINode
    # Defaults as in FreehandUSLib.reconstruction.ReconstructionOptions (a test keeps them equal).
    outputSpacingMm: Annotated[float, WithinRange(0.05, 10.0)] = 0.5
    interpolation: Interpolation = Interpolation.NEAREST
    compounding: Compounding = Compounding.MEAN
    fillHoles: bool = False
    outputVolume: vtkMRMLScalarVolumeNode


def _isSet(path: Path) -> bool:
    """A Path parameter left at its default (``Path()``, shown as ".") counts as not set."""
    return str(path) not in ("", ".")


#
# FreehandUSWidget
#


class FreehandUSWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: loads the .ui, binds it to the parameter node, one Logic call per button."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FreehandUS.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top-level mrmlSceneChanged signal to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FreehandUSLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadButton.connect("clicked(bool)", self.onLoadButton)
        self.ui.infoButton.connect("clicked(bool)", self.onInfoButton)
        self.ui.saveButton.connect("clicked(bool)", self.onSaveButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload this file and FreehandUSLib (cached FreehandUSLib modules are dropped first)."""
        for name in [n for n in sys.modules if n == "FreehandUSLib" or n.startswith("FreehandUSLib.")]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputBrowser:
            firstBrowser = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
            if firstBrowser:
                self._parameterNode.inputBrowser = firstBrowser

    def setParameterNode(self, inputParameterNode: FreehandUSParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" property in the .ui are bound to the parameters.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        self.ui.loadButton.enabled = bool(parameters and parameters.sequencePath.is_file())
        self.ui.infoButton.enabled = bool(parameters and parameters.inputBrowser)
        self.ui.saveButton.enabled = bool(
            parameters and parameters.inputBrowser and _isSet(parameters.outputSequencePath)
        )

    def onLoadButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the tracked sequence."), waitCursor=True):
            parameters = self._parameterNode
            parameters.inputBrowser = self.logic.loadSequence(
                parameters.sequencePath, parameters.imageToProbe
            )

    def onInfoButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to read the tracked sequence."), waitCursor=True):
            info = self.logic.sequenceSummary(self._parameterNode.inputBrowser)
            self.ui.infoLabel.text = summaryText(info)

    def onSaveButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to save the tracked sequence."), waitCursor=True):
            parameters = self._parameterNode
            written = self.logic.saveSequence(parameters.inputBrowser, parameters.outputSequencePath)
            slicer.util.showStatusMessage(_("Saved {path}").format(path=written), 3000)


#
# FreehandUSLogic
#


class FreehandUSLogic(ScriptedLoadableModuleLogic):
    """Tracked recordings between files, FreehandUSLib and MRML; usable with no widget.

    From the Python console::

        import FreehandUS
        logic = FreehandUS.FreehandUSLogic()
        browser = logic.loadSequence("/data/SpinePhantomFreehand.igs.mha")
        sequence = logic.sequenceFromBrowser(browser)
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> FreehandUSParameterNode:
        return FreehandUSParameterNode(super().getParameterNode())

    def loadSequence(self, path, imageToProbeNode=None, *, name=None):
        """Read a tracked sequence file into a new sequence browser.

        Parameters
        ----------
        path : str or pathlib.Path
            ``.igs.mha``/``.igs.mhd`` (PLUS), ``.igs.nrrd``/``.seq.nrrd`` (NRRD sequence) or
            ``.h5`` (TUS-REC). Frames are flipped to MF orientation on read.
        imageToProbeNode : vtkMRMLLinearTransformNode, optional
            ImageToProbe calibration (pixels to Probe, mm); when given, the bridge places the
            image with it and the browser references this node.
        name : str, optional
            Name of the browser node (default: the file name without its extensions).

        Returns
        -------
        vtkMRMLSequenceBrowserNode
            The new browser; its ``FreehandUS.SourceFile`` attribute holds ``path``.
        """
        path = Path(path)
        ensurePythonPackages(sequenceFileImports(path))
        from FreehandUSLib.io import read_sequence
        from FreehandUSLib.mrml import sequence_to_browser

        imageToProbe = None
        if imageToProbeNode is not None:
            imageToProbe = np.array(slicer.util.arrayFromTransformMatrix(imageToProbeNode))
        sequence = read_sequence(path)
        browserNode = sequence_to_browser(
            slicer.mrmlScene,
            sequence,
            image_to_probe=imageToProbe,
            browser_name=name or _browserNameFromPath(path),
        )
        browserNode.SetAttribute(SOURCE_FILE_ATTRIBUTE, str(path))
        if imageToProbeNode is not None:
            browserNode.SetNodeReferenceID(IMAGE_TO_PROBE_REFERENCE, imageToProbeNode.GetID())
        return browserNode

    def sequenceFromBrowser(self, browserNode):
        """The tracked sequence held by a browser (frames in MF, named transforms, timestamps).

        Parameters
        ----------
        browserNode : vtkMRMLSequenceBrowserNode

        Returns
        -------
        FreehandUSLib.TrackedSequence
        """
        if browserNode is None:
            raise ValueError("sequenceFromBrowser: browserNode is None; select a sequence browser")
        from FreehandUSLib.mrml import browser_to_sequence

        return browser_to_sequence(browserNode)

    def saveSequence(self, browserNode, path) -> Path:
        """Write the recording held by ``browserNode`` to ``path`` (format from the file name).

        Returns
        -------
        pathlib.Path
            The file written; also stored in the browser's ``FreehandUS.SavedFile`` attribute.
        """
        path = Path(path)
        ensurePythonPackages(sequenceFileImports(path))
        from FreehandUSLib.io import write_sequence

        written = Path(write_sequence(self.sequenceFromBrowser(browserNode), path))
        browserNode.SetAttribute(SAVED_FILE_ATTRIBUTE, str(written))
        return written

    def sequenceSummary(self, browserNode) -> dict:
        """What ``freehandus info --json`` reports for the recording held by ``browserNode``."""
        from FreehandUSLib.cli import sequence_info

        sequence = self.sequenceFromBrowser(browserNode)
        return sequence_info(sequence, path=browserNode.GetAttribute(SOURCE_FILE_ATTRIBUTE))


#
# FreehandUSTest
#


def makeTestSequence(nFrames=6, nRows=24, nCols=32, seed=0):
    """A small synthetic TrackedSequence (uint8 frames, ProbeToTracker + ReferenceToTracker).

    Used by the self-tests of all three modules; downloads nothing.
    """
    from FreehandUSLib import TrackedSequence

    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, size=(nFrames, nRows, nCols), dtype=np.uint8)

    def poses(offsetMm):
        matrices = np.tile(np.eye(4), (nFrames, 1, 1))
        angles = np.linspace(0.0, 0.4, nFrames)
        matrices[:, 0, 0] = np.cos(angles)
        matrices[:, 0, 1] = -np.sin(angles)
        matrices[:, 1, 0] = np.sin(angles)
        matrices[:, 1, 1] = np.cos(angles)
        matrices[:, :3, 3] = offsetMm + np.outer(np.arange(nFrames), [0.0, 2.0, 0.5])
        return matrices

    valid = np.ones(nFrames, dtype=bool)
    return TrackedSequence(
        frames=frames,
        timestamps_s=10.0 + 0.05 * np.arange(nFrames),
        transforms={
            "ProbeToTracker": (poses(np.array([10.0, -20.0, 30.0])), valid),
            "ReferenceToTracker": (poses(np.array([-5.0, 4.0, 100.0])), valid),
        },
    )


class FreehandUSTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer (Reload and Test, ctest): synthetic data, Logic called directly."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_sequenceFromBrowser()
        self.setUp()
        self.test_loadAndSave()

    def _assertSameSequence(self, actual, expected):
        self.assertEqual(actual.n_frames, expected.n_frames)
        np.testing.assert_array_equal(actual.frames, expected.frames)
        np.testing.assert_allclose(actual.timestamps_s, expected.timestamps_s, atol=1e-6)
        for transformName in expected.transform_names:
            self.assertIn(transformName, actual.transforms)
            np.testing.assert_allclose(
                actual.transforms[transformName].matrices,
                expected.transforms[transformName].matrices,
                atol=1e-6,
            )

    def test_sequenceFromBrowser(self):
        self.delayDisplay("Synthetic sequence -> browser -> Logic.sequenceFromBrowser")
        from FreehandUSLib.mrml import sequence_to_browser

        sequence = makeTestSequence()
        browserNode = sequence_to_browser(slicer.mrmlScene, sequence, browser_name="Synthetic")
        self.assertTrue(browserNode.IsA("vtkMRMLSequenceBrowserNode"))
        self._assertSameSequence(FreehandUSLogic().sequenceFromBrowser(browserNode), sequence)
        with self.assertRaises(ValueError):
            FreehandUSLogic().sequenceFromBrowser(None)
        self.delayDisplay("Test passed")

    def test_loadAndSave(self):
        self.delayDisplay("Logic.loadSequence / saveSequence round trip through .igs.mha")
        from FreehandUSLib.io import read_sequence, write_sequence

        sequence = makeTestSequence(seed=1)
        folder = Path(slicer.app.temporaryPath) / "FreehandUSTest"
        folder.mkdir(parents=True, exist_ok=True)
        source = write_sequence(sequence, folder / "Synthetic.igs.mha")

        logic = FreehandUSLogic()
        browserNode = logic.loadSequence(source)
        self.assertEqual(browserNode.GetName(), "Synthetic")
        self.assertEqual(browserNode.GetAttribute(SOURCE_FILE_ATTRIBUTE), str(source))
        self._assertSameSequence(logic.sequenceFromBrowser(browserNode), sequence)
        self.assertEqual(logic.sequenceSummary(browserNode)["frames"], sequence.n_frames)

        written = logic.saveSequence(browserNode, folder / "Copy.igs.mha")
        self._assertSameSequence(read_sequence(written), sequence)
        self.delayDisplay("Test passed")
