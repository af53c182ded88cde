"""3D Slicer module "N-Wire Calibration": ImageToProbe from tracked frames of an N-wire phantom.

Slicer glue only (Module, parameter node, Widget, Logic, Test). The computation lives in
``NWireCalibrationLib`` (no slicer/qt/ctk imports); MRML nodes reach it through its bridge
``NWireCalibrationLib.mrml_calibration`` (tested headless with slicer-core in
``Testing/nwire/test_mrml_calibration.py``), which reads recordings with the FreehandUS bridge.

``FreehandUSLib`` and the ``FreehandUS`` module file live in the FreehandUS module folder. Slicer
puts each scripted module's folder on ``sys.path`` and the extension installs all three modules
into one ``qt-scripted-modules`` folder, so both import from here; this module lists "FreehandUS"
as a dependency so that folder is loaded first in a development setup too.
"""

import enum
import sys
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLLinearTransformNode, vtkMRMLPlotChartNode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode
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
from vtkSlicerMarkupsModuleMRMLPython import vtkMRMLMarkupsFiducialNode
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
        self.parent.dependencies = ["FreehandUS", "Sequences", "Markups", "Plots", "Tables"]
        self.parent.contributors = ["FreehandUS developers"]
        self.parent.helpText = _(
            """
<p>Automatic calibration of a tracked ultrasound probe (ImageToProbe, pixels to Probe mm) from
recordings of an N-wire phantom, with no manual point picking. Select the calibration recording
(and optionally a validation recording), the PLUS configuration that describes the phantom wires
and its registration (PhantomToReference), or a built-in phantom; without a registration the
phantom pose is estimated together with the calibration (no stylus needed).</p>
<p><b>Detect</b> finds the wire dots in every frame and overlays them on the image (they follow the
sequence browser). <b>Calibrate</b> writes ImageToProbe into the selected transform with its
errors, shows the accuracy table (PLUS 3D/2D reprojection errors), a residual plot per frame and
why frames did not count (frames detected per stage, labellings refused by the sequence stage, a
table of rejected and dropped frames with the missing wire or failed prior of each); the PLUS
<code>&lt;Transform From="Image" To="Probe" .../&gt;</code> element can be copied into a PLUS
device-set configuration, or <b>Send to PlusServer</b> puts it into a running PlusServer
(UpdateTransform and SaveConfig remote commands). Cancel stops reading the recordings, detection
or calibration and leaves the scene as it was. <b>Live</b> calibrates from a PlusServer stream as frames arrive,
keeps well-detected frames with new probe poses, and stops when the calibration has converged.</p>
<p>From the Python console:</p>
<pre>
import NWireCalibration
logic = NWireCalibration.NWireCalibrationLogic()
calBrowser = slicer.util.getNode("fCal_Test_Calibration_3NWires_fCal2.0")
valBrowser = slicer.util.getNode("fCal_Test_Validation_3NWires_fCal2.0")
imageToProbeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToProbe")
result = logic.calibrate(calBrowser, valBrowser, imageToProbeNode,
    configPath="/data/PlusDeviceSet_fCal_Sim_SpatialCalibration_2.0.xml", solver="ransac-lm")
print(result)                               # ImageToProbe, errors, warnings
print(result.plus_transform_element())      # paste into the PLUS config
outputs = logic.lastCalibration             # accuracy/residual tables and the plot chart

# Dots only (overlay on the slice views), or a built-in phantom without a PLUS config:
dots = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "DetectedDots")
detection = logic.detect(calBrowser, phantom="fCal-2.0", pixelSpacingMm=0.08, markupsNode=dots)

# Live, from SlicerOpenIGTLink nodes (Image_Image and ProbeToReference from PlusServer):
live = logic.startLiveCalibration(slicer.util.getNode("Image_Image"), imageToProbeNode,
    probeToReferenceNode=slicer.util.getNode("ProbeToReference"), configPath="/data/config.xml")
print(live.status())                        # frames, keyframes, last change, converged
logic.stopLiveCalibration()
</pre>
<p>Runs on 3D Slicer 5.10 and later (their bundled Python 3.12). The Python packages it needs
beyond Slicer's own (numba, OpenCV, pynrrd, h5py; listed with version bounds in the extension's
<code>Resources/requirements.txt</code>) are installed on first use, after asking.</p>
<p>See the <a href="https://github.com/freehandus/SlicerFreehandUS#readme">FreehandUS documentation</a>.</p>
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

def installDependencies(*, askConfirmation=True) -> list:
    """Install what Slicer's Python lacks of the extension's requirements; before any Lib import.

    The requirements (OpenCV for dot detection, numba, pynrrd, h5py) are one file for the three
    modules, ``FreehandUS/Resources/requirements.txt``; see ``FreehandUS.ensureRequirements``.
    Returns the requirements installed (empty when all were met).
    """
    import FreehandUS

    return FreehandUS.ensureRequirements(askConfirmation=askConfirmation, requester="N-Wire Calibration")


def _pathOrNone(path):
    """None for an unset path (None, "" or the parameter default ``Path()``, shown as ".")."""
    if path is None or str(path) in ("", "."):
        return None
    return Path(path)


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


class Phantom(enum.Enum):
    """The phantom geometry: the PLUS configuration's, or a built-in one (NWireCalibrationLib/phantoms)."""

    CONFIG = "config"
    FCAL_1_0 = "fCal-1.0"
    FCAL_1_2 = "fCal-1.2"
    FCAL_2_0 = "fCal-2.0"
    FCAL_2_0_AURORA = "fCal-2.0-Aurora"
    FCAL_2_1 = "fCal-2.1"
    FCAL_3_0 = "fCal-3.0"
    FCAL_L_1_4 = "fCal-L-1.4"
    LEGO_3_1 = "Lego-3.1"
    LEGO_3_1_DEEP = "Lego-3.1-deep"
    LEGO_3_1_6N = "Lego-3.1-6N"
    LEGO_3_1_3N_WIDE = "Lego-3.1-3N-wide"
    ICAL_1_0 = "iCal-1.0"
    ICAL_1_1 = "iCal-1.1"
    LIU_2025 = "Liu2025-multilayer"

    def label(self) -> str:
        return _("From the PLUS configuration") if self.name == "CONFIG" else self.value


class Solver(enum.Enum):
    """How ImageToProbe is solved (``freehandus calibrate --solver``)."""

    RANSAC_LM = "ransac-lm"
    LM = "lm"
    LSQ = "lsq"

    def label(self) -> str:
        return {
            "RANSAC_LM": _("RANSAC + Levenberg-Marquardt"),
            "LM": _("Levenberg-Marquardt"),
            "LSQ": _("Linear least squares (PLUS)"),
        }[self.name]


class PhantomPose(enum.Enum):
    """Whether PhantomToReference is known or estimated (``freehandus calibrate --phantom-pose``)."""

    AUTO = "auto"
    KNOWN = "known"
    ESTIMATE = "estimate"

    def label(self) -> str:
        return {
            "AUTO": _("Known if registered, else estimated"),
            "KNOWN": _("Known (PhantomToReference)"),
            "ESTIMATE": _("Estimated with the calibration"),
        }[self.name]


@parameterNodeWrapper
class NWireCalibrationParameterNode:
    """
    The parameters of the module, saved with the scene.

    calibrationBrowser - tracked frames of the phantom used to compute ImageToProbe.
    validationBrowser - optional second recording, used only to measure the error.
    configPath - PLUS device-set configuration with the phantom wires, PhantomToReference and the
        pixel spacing hint.
    phantom - the configuration's phantom, or a built-in one.
    phantomToReference - optional phantom registration; replaces the configuration's.
    pixelSpacingMm - approximate pixel spacing (mm/px) for the detector; 0: from the configuration
        (ApproximateSpacingMmPerPixel) or the recording.
    detector - method that finds the wire cross-sections in each frame.
    solver - how ImageToProbe is solved.
    phantomPose - known (registration) or estimated phantom pose.
    imageToProbe - linear transform that receives the calibration.
    detectedDots - markups that show the detected dots of the browser's current frame.
    accuracyTable, residualsTable, residualsChart - calibration outputs (errors per data set,
        per frame, and their plot).
    rejectionsTable - the frames that did not count and why (reason per frame); its
        NWireCalibration.DetectionReport attribute holds the per-stage counts shown above it.
    liveImage - live image node updated by SlicerOpenIGTLink (e.g. Image_Image); scalar or colour
        (vector: RGB frames are calibrated in grey, the mean of the colours).
    liveProbeToReference - its probe pose; None: the image's parent transform named ProbeTo...
    convergenceTable, convergenceChart - live calibration convergence curve and its plot.
    plusServer - host:port of the PlusServer that receives the calibration ("": the scene's
        first OpenIGTLink connector's server, else 127.0.0.1:18944).
    """

    calibrationBrowser: vtkMRMLSequenceBrowserNode
    validationBrowser: vtkMRMLSequenceBrowserNode
    configPath: Path
    phantom: Phantom = Phantom.CONFIG
    phantomToReference: vtkMRMLLinearTransformNode
    pixelSpacingMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    detector: Detector = Detector.HESSIAN
    solver: Solver = Solver.RANSAC_LM
    phantomPose: PhantomPose = PhantomPose.AUTO
    imageToProbe: vtkMRMLLinearTransformNode
    detectedDots: vtkMRMLMarkupsFiducialNode
    accuracyTable: vtkMRMLTableNode
    residualsTable: vtkMRMLTableNode
    residualsChart: vtkMRMLPlotChartNode
    rejectionsTable: vtkMRMLTableNode
    liveImage: vtkMRMLScalarVolumeNode
    liveProbeToReference: vtkMRMLLinearTransformNode
    convergenceTable: vtkMRMLTableNode
    convergenceChart: vtkMRMLPlotChartNode
    plusServer: str = ""


#
# NWireCalibrationWidget
#


class NWireCalibrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: loads the .ui, binds it to the parameter node, one Logic call per button.

    Live calibration: the Logic observes the live image node (no Qt in it); this widget runs a
    ``qt.QTimer`` that refreshes the status line, shows the convergence plot once the first
    calibration exists, and stops the live calibration when it has converged.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._liveTimer = None
        self._liveChartShown = False
        self._shownTable = None
        self._shownRejections = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/NWireCalibration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top-level mrmlSceneChanged signal to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = NWireCalibrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.inputInfoButton.connect("clicked(bool)", self.onInputInfoButton)
        self.ui.detectButton.connect("clicked(bool)", self.onDetectButton)
        self.ui.calibrateButton.connect("clicked(bool)", self.onCalibrateButton)
        self.ui.showResidualsButton.connect("clicked(bool)", self.onShowResidualsButton)
        self.ui.copyPlusTransformButton.connect("clicked(bool)", self.onCopyPlusTransformButton)
        self.ui.pushToPlusServerButton.connect("clicked(bool)", self.onPushToPlusServerButton)
        self.ui.liveButton.connect("toggled(bool)", self.onLiveButton)
        self.ui.calibrationProgressBar.hide()
        self.ui.cancelCalibrationButton.hide()

        self._liveTimer = qt.QTimer()
        self._liveTimer.setInterval(500)
        self._liveTimer.connect("timeout()", self.onLiveTimer)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopLive()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called when another module is opened (live calibration goes on)."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)

    def onSceneStartClose(self, caller, event) -> None:
        self._stopLive()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onReload(self) -> None:
        """Reload this file and NWireCalibrationLib (cached Lib modules are dropped first)."""
        self._stopLive()
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
            # Widgets with a "SlicerParameterName" property in the .ui are bound to the parameters.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateButtons)
        self._updateButtons()

    def _updateButtons(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        live = bool(self.logic and self.logic.isLiveCalibrationRunning())
        hasPhantom = bool(
            parameters and (_pathOrNone(parameters.configPath) is not None or parameters.phantom != Phantom.CONFIG)
        )
        hasRecording = bool(parameters and parameters.calibrationBrowser)
        self.ui.inputInfoButton.enabled = hasRecording
        if not hasRecording:
            why = _("Select the calibration recording (a sequence browser) first.")
        elif not hasPhantom:
            why = _("Select the PLUS configuration that defines the phantom, or a built-in phantom.")
        else:
            why = ""
        self.ui.detectButton.enabled = not why
        self.ui.detectButton.toolTip = why or _(
            "Detect the wire dots in every frame of the calibration recording and show them on the image."
        )
        self.ui.calibrateButton.enabled = not why
        self.ui.calibrateButton.toolTip = why or _(
            "Detect the dots in the recordings, compute ImageToProbe into the selected transform and "
            "show the accuracy table and the residual plot."
        )
        self.ui.showResidualsButton.enabled = bool(parameters and parameters.residualsChart)
        self.ui.copyPlusTransformButton.enabled = bool(
            parameters and parameters.imageToProbe and self.logic.plusTransformElement(parameters.imageToProbe)
        )
        self.ui.pushToPlusServerButton.enabled = self.ui.copyPlusTransformButton.enabled
        table = parameters.accuracyTable if parameters else None
        if table is not self._shownTable:
            self.ui.accuracyTableView.setMRMLTableNode(table)
            self._shownTable = table
        rejections = parameters.rejectionsTable if parameters else None
        if rejections is not self._shownRejections:
            self.ui.rejectionsTableView.setMRMLTableNode(rejections)
            self._shownRejections = rejections
        self.ui.detectionReportLabel.text = self.logic.detectionReport(rejections) if self.logic else ""
        self.ui.liveButton.enabled = live or bool(parameters and parameters.liveImage and hasPhantom)
        if self.ui.liveButton.checked != live:
            wasBlocked = self.ui.liveButton.blockSignals(True)
            self.ui.liveButton.checked = live
            self.ui.liveButton.blockSignals(wasBlocked)
        self.ui.liveButton.text = _("Stop live calibration") if live else _("Start live calibration")

    def onInputInfoButton(self) -> None:
        import FreehandUS

        with slicer.util.tryWithErrorDisplay(_("Failed to read the recordings."), waitCursor=True), self._work(
            _("Reading the recordings"), self.ui.inputInfoLabel
        ) as work:
            parameters = self._parameterNode
            summaries = self.logic.recordingsSummary(
                parameters.calibrationBrowser, parameters.validationBrowser, progress=work.progress, cancel=work.token
            )
            self.ui.inputInfoLabel.text = "\n\n".join(
                f"{role.capitalize()}:\n{FreehandUS.summaryText(info)}" for role, info in summaries.items()
            )

    def _work(self, what: str, statusLabel):
        """Progress bar + Cancel button around reading, detection or calibration (FreehandUS.CancellableWork)."""
        import FreehandUS

        return FreehandUS.CancellableWork(
            self.ui.calibrationProgressBar, self.ui.cancelCalibrationButton, what, statusLabel
        )

    def _newNode(self, className: str, name: str):
        return slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(name))

    def onDetectButton(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Dot detection failed."), waitCursor=True):
            with self._work(_("Dot detection"), self.ui.detectionStatusLabel) as work:
                if not parameters.detectedDots:
                    parameters.detectedDots = self._newNode("vtkMRMLMarkupsFiducialNode", "DetectedDots")
                detection = self.logic.detect(
                    parameters.calibrationBrowser,
                    markupsNode=parameters.detectedDots,
                    progress=work.progress,
                    cancel=work.token,
                    **self.logic.setupOptionsFromParameterNode(parameters),
                )
                self.ui.detectionStatusLabel.text = str(detection)
                self.logic.showDetection(parameters.calibrationBrowser)

    def onCalibrateButton(self) -> None:
        parameters = self._parameterNode
        self.ui.calibrationResultLabel.text = ""
        try:
            with slicer.util.tryWithErrorDisplay(_("Calibration failed."), waitCursor=True), self._work(
                _("Calibration"), self.ui.calibrationResultLabel
            ) as work:
                if not parameters.imageToProbe:
                    parameters.imageToProbe = self._newNode("vtkMRMLLinearTransformNode", "ImageToProbe")
                if not parameters.accuracyTable:
                    parameters.accuracyTable = self._newNode("vtkMRMLTableNode", "CalibrationAccuracy")
                if not parameters.residualsTable:
                    parameters.residualsTable = self._newNode("vtkMRMLTableNode", "CalibrationResiduals")
                if not parameters.residualsChart:
                    parameters.residualsChart = self._newNode("vtkMRMLPlotChartNode", "CalibrationResidualsPlot")
                if not parameters.rejectionsTable:
                    parameters.rejectionsTable = self._newNode("vtkMRMLTableNode", "CalibrationRejections")
                result = self.logic.calibrate(
                    parameters.calibrationBrowser,
                    parameters.validationBrowser,
                    parameters.imageToProbe,
                    phantomToReferenceNode=parameters.phantomToReference,
                    solver=parameters.solver.value,
                    phantomPose=parameters.phantomPose.value,
                    accuracyTableNode=parameters.accuracyTable,
                    residualsTableNode=parameters.residualsTable,
                    plotChartNode=parameters.residualsChart,
                    rejectionsTableNode=parameters.rejectionsTable,
                    progress=work.progress,
                    cancel=work.token,
                    **self.logic.setupOptionsFromParameterNode(parameters),
                )
                self.ui.calibrationResultLabel.text = str(result)
                self.logic.showResidualPlot(parameters.residualsChart)
        finally:
            self._updateButtons()

    def onShowResidualsButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to show the residual plot."), waitCursor=True):
            self.logic.showResidualPlot(self._parameterNode.residualsChart)

    def onCopyPlusTransformButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to copy the PLUS transform element."), waitCursor=True):
            element = self.logic.plusTransformElement(self._parameterNode.imageToProbe)
            qt.QApplication.clipboard().setText(element)
            slicer.util.showStatusMessage(_("PLUS <Transform> element copied to the clipboard"), 3000)

    def onPushToPlusServerButton(self) -> None:
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to send the calibration to PlusServer."), waitCursor=True):
            result = self.logic.pushCalibrationToPlusServer(parameters.imageToProbe, server=parameters.plusServer)
            self.ui.calibrationResultLabel.text = str(result)
            slicer.util.showStatusMessage(str(result), 5000)

    def onLiveButton(self, checked) -> None:
        if not checked:
            self._stopLive()
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start live calibration."), waitCursor=True):
            if not parameters.imageToProbe:
                parameters.imageToProbe = self._newNode("vtkMRMLLinearTransformNode", "ImageToProbe")
            if not parameters.convergenceTable:
                parameters.convergenceTable = self._newNode("vtkMRMLTableNode", "LiveCalibrationConvergence")
            if not parameters.convergenceChart:
                parameters.convergenceChart = self._newNode("vtkMRMLPlotChartNode", "LiveCalibrationConvergencePlot")
            if not parameters.detectedDots:
                parameters.detectedDots = self._newNode("vtkMRMLMarkupsFiducialNode", "DetectedDots")
            self.logic.startLiveCalibration(
                parameters.liveImage,
                parameters.imageToProbe,
                probeToReferenceNode=parameters.liveProbeToReference,
                phantomToReferenceNode=parameters.phantomToReference,
                phantomPose=parameters.phantomPose.value,
                convergenceTableNode=parameters.convergenceTable,
                plotChartNode=parameters.convergenceChart,
                markupsNode=parameters.detectedDots,
                **self.logic.setupOptionsFromParameterNode(parameters),
            )
            self._liveChartShown = False
            self._liveTimer.start()
            self.ui.liveStatusLabel.text = _("Waiting for frames from {node}...").format(
                node=parameters.liveImage.GetName()
            )
        self._updateButtons()

    def onLiveTimer(self) -> None:
        status = self.logic.liveCalibrationStatus()
        self.ui.liveStatusLabel.text = self.logic.liveCalibrationText()
        parameters = self._parameterNode
        if status.get("calibrations") and not self._liveChartShown and parameters and parameters.convergenceChart:
            self.logic.showResidualPlot(parameters.convergenceChart)
            self._liveChartShown = True
        if status.get("converged"):
            self._stopLive()

    def _stopLive(self) -> None:
        if self._liveTimer is not None:
            self._liveTimer.stop()
        if self.logic is None or not self.logic.isLiveCalibrationRunning():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to finish live calibration."), waitCursor=True):
            text = self.logic.liveCalibrationText()
            matrix = self.logic.stopLiveCalibration()
            if matrix is None:
                text += "\n" + _("Too few keyframes for a calibration; move the probe over the phantom in more poses.")
            else:
                node = self._parameterNode.imageToProbe if self._parameterNode else None
                text += "\n" + _("ImageToProbe written into {node}.").format(node=node.GetName() if node else "")
            self.ui.liveStatusLabel.text = text
        self._updateButtons()


#
# NWireCalibrationLogic
#


class NWireCalibrationLogic(ScriptedLoadableModuleLogic):
    """N-wire calibration from MRML nodes; usable with no widget.

    Thin glue over ``NWireCalibrationLib.mrml_calibration`` (``make_setup``, ``detect_browser``,
    ``calibrate_browsers``, ``LiveCalibration``). Phantom options shared by all methods:
    ``configPath`` (PLUS configuration: phantom, PhantomToReference, spacing hint), ``phantom``
    (None: the configuration's; else a built-in name such as ``"fCal-2.0"`` or a phantom file,
    which replaces it) and ``pixelSpacingMm`` (detector hint, mm/px; None or 0: from the
    configuration or the recording). Errors are ``FreehandUSLib.FreehandUSError`` subclasses
    whose message says what to select or fix.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._live = None
        #: ``mrml_calibration.BrowserCalibration`` of the last :meth:`calibrate` (nodes, detections).
        self.lastCalibration = None
        #: ``DetectionResult`` of the last :meth:`detect`.
        self.lastDetection = None

    def getParameterNode(self) -> NWireCalibrationParameterNode:
        return NWireCalibrationParameterNode(super().getParameterNode())

    def sequenceFromBrowser(self, browserNode):
        """The tracked sequence held by ``browserNode`` (``FreehandUSLib.TrackedSequence``)."""
        import FreehandUS

        return FreehandUS.FreehandUSLogic().sequenceFromBrowser(browserNode)

    def recordingsSummary(self, calibrationBrowserNode, validationBrowserNode=None, *, progress=None,
                          cancel=None) -> dict:
        """``{"calibration": info, "validation": info}`` as ``freehandus info --json`` reports.

        ``validation`` is present only when ``validationBrowserNode`` is given. ``progress``
        (``callable(done, total)``) is called every few frames read; ``cancel``
        (``FreehandUSLib.jobs.CancelToken``) is checked there (``FreehandUSLib.jobs.Cancelled``).
        """
        import FreehandUS

        freehandLogic = FreehandUS.FreehandUSLogic()
        summaries = {
            "calibration": freehandLogic.sequenceSummary(calibrationBrowserNode, progress=progress, cancel=cancel)
        }
        if validationBrowserNode is not None:
            summaries["validation"] = freehandLogic.sequenceSummary(
                validationBrowserNode, progress=progress, cancel=cancel
            )
        return summaries

    def setupOptionsFromParameterNode(self, parameterNode=None) -> dict:
        """``configPath``, ``phantom``, ``detector`` and ``pixelSpacingMm`` keyword arguments from the panel."""
        p = parameterNode or self.getParameterNode()
        return {
            "configPath": _pathOrNone(p.configPath),
            "phantom": None if p.phantom == Phantom.CONFIG else p.phantom.value,
            "detector": p.detector.value,
            "pixelSpacingMm": p.pixelSpacingMm or None,
        }

    def calibrationSetup(self, configPath=None, phantom=None, pixelSpacingMm=None):
        """The phantom, PhantomToReference and spacing hint (``NWireCalibrationLib.pipeline.CalibrationSetup``)."""
        installDependencies()
        from NWireCalibrationLib.mrml_calibration import make_setup

        return make_setup(_pathOrNone(configPath), phantom=phantom or None, pixel_spacing_mm=pixelSpacingMm or None)

    def detect(self, browserNode, *, configPath=None, phantom=None, detector="hessian", pixelSpacingMm=None,
               markupsNode=None, progress=None, cancel=None):
        """Detect the phantom's dots in every frame of a recording.

        Parameters
        ----------
        browserNode : vtkMRMLSequenceBrowserNode
        configPath, phantom, pixelSpacingMm :
            See the class docstring.
        detector : str
            ``"hessian"``, ``"plus"``, ``"agcfd"`` or ``"tacd"``.
        markupsNode : vtkMRMLMarkupsFiducialNode, optional
            Shows the dots of the browser's selected frame (it follows the browser).
        progress : callable(done, total), optional
        cancel : FreehandUSLib.jobs.CancelToken, optional
            Set it to stop after the current frame (``FreehandUSLib.jobs.Cancelled``).

        Returns
        -------
        NWireCalibrationLib.results.DetectionResult
            Dots ``(n_frames, n_wires, 2)`` (x, y) pixels, ``ok`` per frame; ``str()`` summarises.
        """
        setup = self.calibrationSetup(configPath, phantom, pixelSpacingMm)
        from NWireCalibrationLib.mrml_calibration import detect_browser

        self.lastDetection = detect_browser(browserNode, setup, detector=detector, markups_node=markupsNode,
                                            progress=progress, cancel=cancel)
        return self.lastDetection

    def calibrate(self, calibrationBrowserNode, validationBrowserNode, imageToProbeNode, *, configPath=None,
                  phantom=None, phantomToReferenceNode=None, solver="ransac-lm", phantomPose="auto",
                  detector="hessian", pixelSpacingMm=None, accuracyTableNode=None, residualsTableNode=None,
                  plotChartNode=None, rejectionsTableNode=None, progress=None, cancel=None, **solverOptions):
        """Calibrate from recordings and write ImageToProbe into ``imageToProbeNode``.

        Parameters
        ----------
        calibrationBrowserNode : vtkMRMLSequenceBrowserNode
            Images + ProbeToReference (or ProbeToTracker and ReferenceToTracker).
        validationBrowserNode : vtkMRMLSequenceBrowserNode or None
        imageToProbeNode : vtkMRMLLinearTransformNode or None
            Receives ImageToProbe and its provenance attributes (``NWireCalibration.*``, e.g.
            ``NWireCalibration.PlusTransform``); None: a new ``ImageToProbe`` node.
        configPath, phantom, pixelSpacingMm :
            See the class docstring.
        phantomToReferenceNode : vtkMRMLLinearTransformNode, optional
            Phantom registration; replaces the configuration's.
        solver : str
            ``"ransac-lm"``, ``"lm"`` or ``"lsq"`` (PLUS, needs the registration).
        phantomPose : str
            ``"auto"``, ``"known"`` or ``"estimate"``.
        detector : str
        accuracyTableNode, residualsTableNode : vtkMRMLTableNode, optional
        plotChartNode : vtkMRMLPlotChartNode, optional
            Filled; None: new nodes (see :attr:`lastCalibration`).
        rejectionsTableNode : vtkMRMLTableNode, optional
            Receives the frames that did not count and why, and the per-stage counts (see
            :meth:`detectionReport`); None: a new node.
        progress : callable(done, total), optional
        cancel : FreehandUSLib.jobs.CancelToken, optional
            Set it to stop within a second; nothing is written (``FreehandUSLib.jobs.Cancelled``).
        **solverOptions
            ``ransac_iterations``, ``ransac_threshold_mm``, ``seed``...

        Returns
        -------
        NWireCalibrationLib.results.CalibrationResult
            ``image_to_probe``, errors, ``warnings``; ``plus_transform_element()``.
        """
        setup = self.calibrationSetup(configPath, phantom, pixelSpacingMm)
        from NWireCalibrationLib.mrml_calibration import calibrate_browsers

        self.lastCalibration = calibrate_browsers(
            calibrationBrowserNode,
            validationBrowserNode,
            setup,
            image_to_probe_node=imageToProbeNode,
            phantom_to_reference_node=phantomToReferenceNode,
            solver=solver,
            phantom_pose=phantomPose,
            detector=detector,
            accuracy_table_node=accuracyTableNode,
            residuals_table_node=residualsTableNode,
            plot_chart_node=plotChartNode,
            rejections_table_node=rejectionsTableNode,
            progress=progress,
            cancel=cancel,
            **solverOptions,
        )
        return self.lastCalibration.result

    def detectionReport(self, rejectionsTableNode) -> str:
        """Why frames did not count (per-stage counts, refused, rejected by reason), as stored on the table.

        "" for no table or one that no calibration has filled.
        """
        installDependencies()
        from NWireCalibrationLib.mrml_calibration import ATTR_DETECTION_REPORT

        return (rejectionsTableNode.GetAttribute(ATTR_DETECTION_REPORT) or "") if rejectionsTableNode else ""

    def pushCalibrationToPlusServer(self, imageToProbeNode, *, server="", connectorNode=None, saveConfig=True,
                                    configFilename=None, timeoutS=5.0):
        """Send a calibration to a running PlusServer (``UpdateTransform``, then ``SaveConfig``).

        Parameters
        ----------
        imageToProbeNode : vtkMRMLLinearTransformNode
            A calibration made by :meth:`calibrate` or live calibration.
        server : str
            ``"host:port"``; "" (default): the server of ``connectorNode``, else of the scene's
            first OpenIGTLink connector (``vtkMRMLIGTLConnectorNode``), else ``127.0.0.1:18944``.
        connectorNode : vtkMRMLIGTLConnectorNode, optional
        saveConfig : bool
            Also ask PlusServer to write its configuration with the new transform.
        configFilename : str, optional
            Where the server writes it (default: its own configuration file).
        timeoutS : float

        Returns
        -------
        NWireCalibrationLib.plus_remote.PushResult
            The server's replies; ``str()`` says what was done.
        """
        installDependencies()
        from NWireCalibrationLib import mrml_calibration, plus_remote

        if not server and connectorNode is None:
            connectorNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLIGTLConnectorNode")
        host, port = plus_remote.parse_server(server, connector_node=connectorNode)
        return mrml_calibration.push_calibration_node(
            imageToProbeNode, host=host, port=port, save_config=saveConfig, config_filename=configFilename,
            timeout_s=timeoutS,
        )

    def plusTransformElement(self, imageToProbeNode) -> str:
        """The PLUS ``<Transform From="Image" To="Probe" .../>`` element of a calibration ("" if none)."""
        if imageToProbeNode is None:
            return ""
        return imageToProbeNode.GetAttribute("NWireCalibration.PlusTransform") or ""

    def showDetection(self, browserNode) -> None:
        """Show the browser's image in the slice views, turned into the image plane (the dots lie on it)."""
        installDependencies()
        from NWireCalibrationLib.mrml_calibration import image_proxy_node

        slicer.util.setSliceViewerLayers(background=image_proxy_node(browserNode), fit=True, rotateToVolumePlane=True)

    def showResidualPlot(self, plotChartNode) -> None:
        """Switch to a layout with a plot view and show ``plotChartNode`` in it."""
        if plotChartNode is None:
            raise ValueError("showResidualPlot: no plot chart node (calibrate first)")
        slicer.modules.plots.logic().ShowChartInLayout(plotChartNode)

    def startLiveCalibration(self, imageNode, imageToProbeNode=None, *, probeToReferenceNode=None, configPath=None,
                             phantom=None, pixelSpacingMm=None, detector="hessian", phantomToReferenceNode=None,
                             phantomPose="auto", convergenceTableNode=None, plotChartNode=None, markupsNode=None,
                             **keyframeSettings):
        """Calibrate from a live image node as frames arrive (keyframes, until convergence).

        Every update of ``imageNode`` with new pixels is a frame; its probe pose is
        ``probeToReferenceNode`` (matrix to parent), else the image's nearest parent transform
        named ``ProbeTo...``. A running live calibration is stopped first.

        Parameters
        ----------
        imageNode : vtkMRMLScalarVolumeNode
            E.g. SlicerOpenIGTLink's ``Image_Image`` (pixels in MF as sent by PlusServer).
        imageToProbeNode : vtkMRMLLinearTransformNode, optional
            Receives every new calibration; None: a new node at the first one.
        probeToReferenceNode, phantomToReferenceNode : vtkMRMLLinearTransformNode, optional
        configPath, phantom, pixelSpacingMm, detector :
            See the class docstring.
        phantomPose : str
        convergenceTableNode, plotChartNode, markupsNode : optional
            Convergence curve, its plot, and the dots of the latest frame.
        **keyframeSettings
            ``NWireCalibrationLib.keyframes.KeyframeSettings`` fields (``min_keyframes``,
            ``convergence_mm``...).

        Returns
        -------
        NWireCalibrationLib.mrml_calibration.LiveCalibration
            ``status()``, ``converged``, ``image_to_probe``.
        """
        if imageNode is None:
            raise ValueError("startLiveCalibration: imageNode is None; select the live image (e.g. Image_Image)")
        self.stopLiveCalibration()
        setup = self.calibrationSetup(configPath, phantom, pixelSpacingMm)
        from NWireCalibrationLib.keyframes import KeyframeSettings
        from NWireCalibrationLib.mrml_calibration import LiveCalibration

        live = LiveCalibration(
            setup,
            image_to_probe_node=imageToProbeNode,
            probe_to_reference_node=probeToReferenceNode,
            phantom_to_reference_node=phantomToReferenceNode,
            phantom_pose=phantomPose,
            detector=detector,
            settings=KeyframeSettings(**keyframeSettings),
            convergence_table_node=convergenceTableNode,
            plot_chart_node=plotChartNode,
            markups_node=markupsNode,
        )
        self._live = live.observe(imageNode)
        return self._live

    def stopLiveCalibration(self):
        """Stop observing and calibrate from all keyframes; ImageToProbe (4x4) or None (too few keyframes)."""
        live, self._live = self._live, None
        return None if live is None else live.stop()

    def isLiveCalibrationRunning(self) -> bool:
        return self._live is not None

    def liveCalibrationStatus(self) -> dict:
        """Counters of the running live calibration (empty when none runs)."""
        return {} if self._live is None else self._live.status()

    def liveCalibrationText(self) -> str:
        """One line for the panel: frames, keyframes, calibrations, last change, converged."""
        return "" if self._live is None else str(self._live)


#
# NWireCalibrationTest
#


def _simulatedRecordings(tempDir):
    """(calibration, validation) simulated recordings and a PLUS config written into ``tempDir``."""
    installDependencies(askConfirmation=False)
    from NWireCalibrationLib.simulate import simulate_nwire

    options = {"probe": "linear", "depth_mm": 50.0, "image_size_px": (320, 240)}
    calibration = simulate_nwire(n_frames=30, seed=1, **options)
    validation = simulate_nwire(n_frames=12, seed=9, **options)
    configPath = Path(tempDir) / "NWireSimulation.xml"
    configPath.write_text(calibration.config_xml(), encoding="utf-8")
    return calibration, validation, configPath


class NWireCalibrationTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer: simulated N-wire recordings, Logic called directly, nothing downloaded."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        installDependencies(askConfirmation=False)

    def runTest(self):
        self.setUp()
        self.test_recordingsFromBrowsers()
        self.setUp()
        self.test_calibrateSimulatedRecordings()
        self.setUp()
        self.test_liveCalibration()
        self.setUp()
        self.test_badInputs()

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

    def test_calibrateSimulatedRecordings(self):
        self.delayDisplay("Simulated N-wire recordings -> detect, calibrate -> ImageToProbe")
        import tempfile

        import numpy as np
        from FreehandUSLib.mrml import sequence_to_browser, vtk_to_matrix
        from NWireCalibrationLib.metrics import target_errors_mm

        with tempfile.TemporaryDirectory() as tempDir:
            calibration, validation, configPath = _simulatedRecordings(tempDir)
            calibrationNode = sequence_to_browser(slicer.mrmlScene, calibration.sequence, browser_name="Calibration")
            validationNode = sequence_to_browser(slicer.mrmlScene, validation.sequence, browser_name="Validation")
            logic = NWireCalibrationLogic()

            dots = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "DetectedDots")
            detection = logic.detect(calibrationNode, configPath=configPath, markupsNode=dots)
            self.assertEqual(detection.frames_detected, 30)
            self.assertEqual(dots.GetNumberOfControlPoints(), calibration.phantom.n_wires)
            logic.showDetection(calibrationNode)

            imageToProbeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToProbe")
            result = logic.calibrate(calibrationNode, validationNode, imageToProbeNode, configPath=configPath,
                                     solver="ransac-lm", ransac_iterations=300)
        error = target_errors_mm(result.image_to_probe, calibration.image_to_probe,
                                 points_px=calibration.fov_points_px()).mean()
        self.assertLess(error, 0.3)
        self.assertEqual(result.validation.frames_segmented, 12)
        matrix = vtk.vtkMatrix4x4()
        imageToProbeNode.GetMatrixTransformToParent(matrix)
        np.testing.assert_allclose(vtk_to_matrix(matrix), result.image_to_probe, atol=1e-12)
        self.assertIn('<Transform From="Image" To="Probe"', logic.plusTransformElement(imageToProbeNode))
        self.assertEqual(logic.lastCalibration.accuracy_table_node.GetNumberOfRows(), 2)
        self.assertEqual(logic.lastCalibration.residuals_table_node.GetNumberOfRows(), 30)
        report = logic.detectionReport(logic.lastCalibration.rejections_table_node)
        self.assertIn("Calibration recording: 30 of 30 frames detected", report)
        self.assertEqual(logic.lastCalibration.rejections_table_node.GetNumberOfRows(), 0)
        logic.showResidualPlot(logic.lastCalibration.plot_chart_node)
        self.delayDisplay("Test passed")

    def test_liveCalibration(self):
        self.delayDisplay("Simulated frames through a live image node -> keyframes until convergence")
        import tempfile

        import numpy as np
        from FreehandUSLib.mrml import matrix_to_vtk
        from NWireCalibrationLib.metrics import target_errors_mm
        from NWireCalibrationLib.pipeline import probe_to_reference
        from NWireCalibrationLib.simulate import simulate_nwire
        from vtk.util import numpy_support

        simulation = simulate_nwire(n_frames=60, seed=4, probe="linear", depth_mm=50.0, image_size_px=(320, 240))
        poses = probe_to_reference(simulation.sequence)
        probeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ProbeToReference")
        imageNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image_Image")
        imageNode.SetAndObserveTransformNodeID(probeNode.GetID())
        imageToProbeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "ImageToProbe")
        logic = NWireCalibrationLogic()
        with tempfile.TemporaryDirectory() as tempDir:
            configPath = Path(tempDir) / "NWireSimulation.xml"
            configPath.write_text(simulation.config_xml(), encoding="utf-8")
            live = logic.startLiveCalibration(imageNode, imageToProbeNode, configPath=configPath,
                                              min_keyframes=15, min_pose_diversity_deg=5.0)
        self.assertTrue(logic.isLiveCalibrationRunning())
        rows, cols = simulation.sequence.frames.shape[1:]
        for index in range(simulation.sequence.n_frames):  # as SlicerOpenIGTLink updates the nodes
            probeNode.SetMatrixTransformToParent(matrix_to_vtk(poses[index]))
            image = vtk.vtkImageData()
            image.SetDimensions(cols, rows, 1)
            image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = simulation.sequence.frames[index].ravel()
            wasModified = imageNode.StartModify()
            imageNode.SetAndObserveImageData(image)
            imageNode.EndModify(wasModified)
            if live.converged:
                break
        status = logic.liveCalibrationStatus()
        self.assertTrue(status["converged"], logic.liveCalibrationText())
        matrix = logic.stopLiveCalibration()
        self.assertFalse(logic.isLiveCalibrationRunning())
        error = target_errors_mm(matrix, simulation.image_to_probe, points_px=simulation.fov_points_px()).mean()
        self.assertLess(error, 0.3)
        self.assertGreater(live.convergence_table_node.GetNumberOfRows(), 2)
        self.assertTrue(np.all(np.isfinite(matrix)))
        self.delayDisplay("Test passed")

    def test_badInputs(self):
        self.delayDisplay("Bad inputs give FreehandUSError messages that say what to select")
        from FreehandUSLib import FreehandUSError

        logic = NWireCalibrationLogic()
        with self.assertRaises(FreehandUSError):
            logic.calibrate(None, None, None, phantom="fCal-2.0")
        with self.assertRaises(FreehandUSError):
            logic.calibrationSetup()  # neither a configuration nor a phantom
        self.delayDisplay("Test passed")
