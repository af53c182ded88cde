"""3D Slicer module "N-Wire Calibration": ImageToProbe from tracked frames of an N-wire phantom.

Slicer glue only (Module, parameter node, Widget, Logic, Test). The computation lives in
``NWireCalibrationLib`` (no slicer/qt/ctk imports); tracked recordings reach it as
``FreehandUSLib.TrackedSequence`` through the FreehandUS MRML bridge.

``FreehandUSLib`` and the ``FreehandUS`` module file live in the FreehandUS module folder. Slicer
puts each scripted module's folder on ``sys.path`` and the extension installs all three modules
into one ``qt-scripted-modules`` folder, so both import from here; this module lists "FreehandUS"
as a dependency so that folder is loaded first in a development setup too.

This version reads and checks the recordings; the calibration itself (wire detection, phantom
registration, RANSAC + Levenberg-Marquardt) arrives with NWireCalibrationLib.
"""

import enum
import sys
from pathlib import Path

import slicer
import vtk
from slicer import vtkMRMLLinearTransformNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
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
# NWireCalibration
#


class NWireCalibration(ScriptedLoadableModule):
    """Module description shown in Slicer (title, category, help)."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("N-Wire Calibration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Ultrasound")]
        self.parent.dependencies = ["FreehandUS", "Sequences"]
        self.parent.contributors = ["FreehandUS developers"]
        self.parent.helpText = _(
            """
<p>Automatic calibration of a tracked ultrasound probe (ImageToProbe) from recordings of an
N-wire phantom, with no manual point picking. Select the calibration recording (and optionally a
validation recording) and the PLUS configuration that describes the phantom wires.</p>
<p>From the Python console:</p>
<pre>
import NWireCalibration
logic = NWireCalibration.NWireCalibrationLogic()
browser = slicer.util.getNode("fCal_Test_Calibration_3NWires_fCal2.0")
sequence = logic.sequenceFromBrowser(browser)
print(logic.recordingsSummary(browser))
</pre>
<p>See the <a href="https://github.com/freehandus/FreehandUS#readme">FreehandUS documentation</a>.</p>
"""
        )
        self.parent.acknowledgementText = _(
            """
The method follows Liu et al., Sensors 2025, 25(16):5104 (automatic N-wire calibration with no
manual point picking); phantom definitions and test data come from the PLUS toolkit
(www.plustoolkit.org, fCal).
"""
        )


#
# Python dependencies (installed into Slicer's Python on first use)
#

#: Import names the calibration needs beyond Slicer's bundled packages (see FreehandUS.PYTHON_REQUIREMENTS).
REQUIRED_IMPORTS = ["skimage", "cv2"]


def installDependencies(*, askConfirmation=True) -> list:
    """pip-install scikit-image and opencv-python-headless into Slicer's Python if missing.

    Returns the requirements installed (empty when nothing was missing).
    """
    import FreehandUS

    return FreehandUS.ensurePythonPackages(REQUIRED_IMPORTS, askConfirmation=askConfirmation)


#
# NWireCalibrationParameterNode
#


class Detector(enum.Enum):
    """Method that finds the wire cross-sections in a frame (``freehandus detect --detector``)."""

    HESSIAN = "hessian"
    PLUS = "plus"
    AGCFD = "agcfd"
    TACD = "tacd"

    def label(self) -> str:
        return {
            "HESSIAN": _("Hessian blobs"),
            "PLUS": _("PLUS (fCal)"),
            "AGCFD": _("AGCFD"),
            "TACD": _("TACD"),
        }[self.name]


@parameterNodeWrapper
class NWireCalibrationParameterNode:
    """
    The parameters of the module, saved with the scene.

    calibrationBrowser - tracked frames of the phantom used to compute ImageToProbe.
    validationBrowser - optional second recording, used only to measure the error.
    configPath - PLUS device-set configuration with the phantom wires and PhantomToReference.
    detector - method that finds the wire cross-sections in each frame.
    imageToProbe - linear transform that receives the calibration.
    """

    calibrationBrowser: vtkMRMLSequenceBrowserNode
    validationBrowser: vtkMRMLSequenceBrowserNode
    configPath: Path
    detector: Detector = Detector.HESSIAN
    imageToProbe: vtkMRMLLinearTransformNode


#
# NWireCalibrationWidget
#


class NWireCalibrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: loads the .ui, binds it to the parameter node, one Logic call per button."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NWireCalibration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = NWireCalibrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputInfoButton.connect("clicked(bool)", self.onInputInfoButton)

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
        """Reload this file and NWireCalibrationLib (cached Lib modules are dropped first)."""
        for name in [
            n for n in sys.modules if n == "NWireCalibrationLib" or n.startswith("NWireCalibrationLib.")
        ]:
            del sys.modules[name]
        ScriptedLoadableModuleWidget.onReload(self)

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.calibrationBrowser:
            firstBrowser = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLSequenceBrowserNode")
            if firstBrowser:
                self._parameterNode.calibrationBrowser = firstBrowser

    def setParameterNode(self, inputParameterNode: NWireCalibrationParameterNode | None) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        self.ui.inputInfoButton.enabled = bool(self._parameterNode and self._parameterNode.calibrationBrowser)

    def onInputInfoButton(self) -> None:
        import FreehandUS

        with slicer.util.tryWithErrorDisplay(_("Failed to read the recordings."), waitCursor=True):
            parameters = self._parameterNode
            summaries = self.logic.recordingsSummary(
                parameters.calibrationBrowser, parameters.validationBrowser
            )
            self.ui.inputInfoLabel.text = "\n\n".join(
                f"{role.capitalize()}:\n{FreehandUS.summaryText(info)}" for role, info in summaries.items()
            )


#
# NWireCalibrationLogic
#


class NWireCalibrationLogic(ScriptedLoadableModuleLogic):
    """N-wire calibration from MRML nodes; usable with no widget.

    Recordings are read through the FreehandUS bridge (``FreehandUS.FreehandUSLogic``).
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> NWireCalibrationParameterNode:
        return NWireCalibrationParameterNode(super().getParameterNode())

    def sequenceFromBrowser(self, browserNode):
        """The tracked sequence held by ``browserNode`` (``FreehandUSLib.TrackedSequence``)."""
        import FreehandUS

        return FreehandUS.FreehandUSLogic().sequenceFromBrowser(browserNode)

    def recordingsSummary(self, calibrationBrowserNode, validationBrowserNode=None) -> dict:
        """``{"calibration": info, "validation": info}`` as ``freehandus info --json`` reports.

        ``validation`` is present only when ``validationBrowserNode`` is given.
        """
        import FreehandUS

        freehandLogic = FreehandUS.FreehandUSLogic()
        summaries = {"calibration": freehandLogic.sequenceSummary(calibrationBrowserNode)}
        if validationBrowserNode is not None:
            summaries["validation"] = freehandLogic.sequenceSummary(validationBrowserNode)
        return summaries


#
# NWireCalibrationTest
#


class NWireCalibrationTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer: synthetic recordings, Logic called directly."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_recordingsFromBrowsers()

    def test_recordingsFromBrowsers(self):
        self.delayDisplay("Synthetic recordings -> browsers -> NWireCalibrationLogic")
        from FreehandUSLib.mrml import sequence_to_browser

        import FreehandUS

        calibration = FreehandUS.makeTestSequence(nFrames=5, seed=2)
        validation = FreehandUS.makeTestSequence(nFrames=3, seed=3)
        calibrationNode = sequence_to_browser(slicer.mrmlScene, calibration, browser_name="Calibration")
        validationNode = sequence_to_browser(slicer.mrmlScene, validation, browser_name="Validation")

        logic = NWireCalibrationLogic()
        sequence = logic.sequenceFromBrowser(calibrationNode)
        self.assertEqual(sequence.n_frames, calibration.n_frames)
        self.assertEqual(set(sequence.transform_names), set(calibration.transform_names))

        summaries = logic.recordingsSummary(calibrationNode, validationNode)
        self.assertEqual(summaries["calibration"]["frames"], 5)
        self.assertEqual(summaries["validation"]["frames"], 3)
        self.assertNotIn("validation", logic.recordingsSummary(calibrationNode))
        self.delayDisplay("Test passed")
