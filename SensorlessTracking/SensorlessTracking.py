"""3D Slicer module "Sensorless Tracking": a probe trajectory estimated from the images alone.

Slicer glue only (Module, parameter node, Widget, Logic, Test). The models, training and
prediction live in ``SensorlessTrackingLib`` (no slicer/qt/ctk imports; torch only in the files
that need it); recordings reach it as ``FreehandUSLib.TrackedSequence`` through the FreehandUS MRML
bridge.

``FreehandUSLib`` and the ``FreehandUS`` module file live in the FreehandUS module folder. Slicer
puts each scripted module's folder on ``sys.path`` and the extension installs all three modules
into one ``qt-scripted-modules`` folder, so both import from here; this module lists "FreehandUS"
as a dependency so that folder is loaded first in a development setup too.

torch is not pip-installed by this module: it comes from the PyTorch extension (``PyTorchUtils``),
which picks a build that matches the GPU driver. This version reads and checks recordings and sets
up PyTorch; trajectory estimation arrives with SensorlessTrackingLib.
"""

import enum
import sys
from pathlib import Path
from typing import Annotated

import slicer
import vtk
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

# MRML classes of loadable modules must come from their own packages (see Slicer's parameter
# node documentation): they are not in the slicer namespace yet when this file is read.
from vtkSlicerSequencesModuleMRMLPython import vtkMRMLSequenceBrowserNode

#
# SensorlessTracking
#


class SensorlessTracking(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Sensorless Tracking")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Ultrasound")]
        self.parent.dependencies = ["FreehandUS", "Sequences"]
        self.parent.contributors = ["FreehandUS developers"]
        self.parent.helpText = _(
            """
<p>Estimate the trajectory of a freehand ultrasound sweep from the images alone, with a deep
network trained on tracked recordings or on simulation, and reconstruct from it. PyTorch is
installed on first use through the PyTorch extension.</p>
<p>From the Python console:</p>
<pre>
import SensorlessTracking
logic = SensorlessTracking.SensorlessTrackingLogic()
print(logic.setupTorch())                 # e.g. "PyTorch 2.5.1, device cuda"
browser = slicer.util.getNode("Sweep")
sequence = logic.sequenceFromBrowser(browser)
print(sequence.n_frames, sequence.frames.shape)
</pre>
<p>See the <a href="https://github.com/freehandus/FreehandUS#readme">FreehandUS documentation</a>.</p>
"""
        )
        self.parent.acknowledgementText = _(
            """
The approach follows published trackerless reconstruction work (DualTrack, MICCAI ASMUS 2025;
MoGLo-Net, IEEE TMI 2025) and the TUS-REC challenge data format and metrics. PyTorch is provided
by the SlicerPyTorch extension.
"""
        )


#
# Python dependencies (installed into Slicer's Python on first use)
#

#: Import names this module needs beyond Slicer's bundled packages (TUS-REC scans are HDF5).
REQUIRED_IMPORTS = ["h5py"]

#: Versions of torch the PyTorch extension may install for this module.
TORCH_VERSION_REQUIREMENT = ">=2.0"


def installDependencies(*, askConfirmation=True) -> list:
    """pip-install h5py into Slicer's Python if missing (torch: see :func:`ensureTorch`).

    Returns the requirements installed (empty when nothing was missing).
    """
    import FreehandUS

    return FreehandUS.ensurePythonPackages(REQUIRED_IMPORTS, askConfirmation=askConfirmation)


def ensureTorch(*, askConfirmation=True):
    """The ``torch`` module, installed on first use by the PyTorch extension's PyTorchUtils.

    Raises
    ------
    RuntimeError
        If the PyTorch extension is not installed, or the user cancelled the installation.
    """
    try:
        import PyTorchUtils
    except ImportError as exc:
        raise RuntimeError(
            "Sensorless Tracking needs the PyTorch extension (module PyTorchUtils); "
            "install it with the Extensions Manager and restart Slicer"
        ) from exc
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    if torchLogic.torchInstalled():
        return torchLogic.torch
    torch = torchLogic.installTorch(askConfirmation, torchVersionRequirement=TORCH_VERSION_REQUIREMENT)
    if torch is None:
        raise RuntimeError("PyTorch was not installed (the installation was cancelled)")
    return torch


#
# SensorlessTrackingParameterNode
#


class Device(enum.Enum):
    """Where the model runs."""

    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self) -> str:
        return {"AUTO": _("Automatic (GPU if available)"), "CPU": _("CPU"), "CUDA": _("CUDA GPU")}[self.name]


@parameterNodeWrapper
class SensorlessTrackingParameterNode:
    """
    The parameters of the module, saved with the scene.

    inputBrowser - the ultrasound frames to track (tracking, if any, only for evaluation).
    modelPath - trained trajectory model (PyTorch checkpoint).
    device - where the model runs.
    batchSize - frames given to the model at once.
    outputBrowser - receives the frames with the estimated poses.
    """

    inputBrowser: vtkMRMLSequenceBrowserNode
    modelPath: Path
    device: Device = Device.AUTO
    batchSize: Annotated[int, WithinRange(1, 1024)] = 16
    outputBrowser: vtkMRMLSequenceBrowserNode


#
# SensorlessTrackingWidget
#


class SensorlessTrackingWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: loads the .ui, binds it to the parameter node, one Logic call per button."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SensorlessTracking.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = SensorlessTrackingLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputInfoButton.connect("clicked(bool)", self.onInputInfoButton)
        self.ui.setupTorchButton.connect("clicked(bool)", self.onSetupTorchButton)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
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
        """Reload this file and SensorlessTrackingLib (cached Lib modules are dropped first)."""
        for name in [
            n for n in sys.modules if n == "SensorlessTrackingLib" or n.startswith("SensorlessTrackingLib.")
        ]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputBrowser:
            firstBrowser = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
            if firstBrowser:
                self._parameterNode.inputBrowser = firstBrowser

    def setParameterNode(self, inputParameterNode: SensorlessTrackingParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        self.ui.inputInfoButton.enabled = bool(self._parameterNode and self._parameterNode.inputBrowser)

    def onInputInfoButton(self) -> None:
        import FreehandUS

        with slicer.util.tryWithErrorDisplay(_("Failed to read the recording."), waitCursor=True):
            info = self.logic.sequenceSummary(self._parameterNode.inputBrowser)
            self.ui.inputInfoLabel.text = FreehandUS.summaryText(info)

    def onSetupTorchButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to set up PyTorch."), waitCursor=True):
            self.ui.torchStatusLabel.text = self.logic.setupTorch()


#
# SensorlessTrackingLogic
#


class SensorlessTrackingLogic(ScriptedLoadableModuleLogic):
    """Sensorless tracking from MRML nodes; usable with no widget.

    Recordings are read through the FreehandUS bridge (``FreehandUS.FreehandUSLogic``).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> SensorlessTrackingParameterNode:
        return SensorlessTrackingParameterNode(super().getParameterNode())

    def sequenceFromBrowser(self, browserNode):
        """The tracked sequence held by ``browserNode`` (``FreehandUSLib.TrackedSequence``)."""
        import FreehandUS

        return FreehandUS.FreehandUSLogic().sequenceFromBrowser(browserNode)

    def sequenceSummary(self, browserNode) -> dict:
        """What ``freehandus info --json`` reports for the recording held by ``browserNode``."""
        import FreehandUS

        return FreehandUS.FreehandUSLogic().sequenceSummary(browserNode)

    def setupTorch(self, *, askConfirmation=True) -> str:
        """Make sure PyTorch is available (installing it through PyTorchUtils); describe it.

        Returns
        -------
        str
            ``"PyTorch <version>, device <cuda|cpu>"``.
        """
        torch = ensureTorch(askConfirmation=askConfirmation)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return f"PyTorch {torch.__version__}, device {device}"


#
# SensorlessTrackingTest
#


class SensorlessTrackingTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer: a synthetic recording, Logic called directly."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_recordingFromBrowser()

    def test_recordingFromBrowser(self):
        self.delayDisplay("Synthetic recording -> browser -> SensorlessTrackingLogic")
        import numpy as np
        from FreehandUSLib.mrml import sequence_to_browser

        import FreehandUS

        sweep = FreehandUS.makeTestSequence(nFrames=4, seed=4)
        browserNode = sequence_to_browser(slicer.mrmlScene, sweep, browser_name="Sweep")

        logic = SensorlessTrackingLogic()
        sequence = logic.sequenceFromBrowser(browserNode)
        self.assertEqual(sequence.n_frames, sweep.n_frames)
        np.testing.assert_array_equal(sequence.frames, sweep.frames)
        self.assertEqual(logic.sequenceSummary(browserNode)["frames"], sweep.n_frames)
        self.delayDisplay("Test passed")
