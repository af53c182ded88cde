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
which picks a build that matches the GPU driver (a torch already importable in Slicer's Python is
used as it is).

Estimation, plots, reconstruction from the estimate and training go through
``SensorlessTrackingLib.mrml_tracking`` (the MRML bridge of this module): the Logic converts
panel values to arguments and calls it, nothing more.
"""

import enum
import sys
from pathlib import Path
from typing import Annotated

import qt
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
from slicer import vtkMRMLLinearTransformNode, vtkMRMLScalarVolumeNode
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
browser = slicer.util.getNode("SweepBrowser")
summary = logic.estimateTrajectory(browser)            # shipped model; or model="/path/best.pt"
summary = logic.estimateTrajectory(browser, sweepDirection="away")  # probe moved into the screen
print(logic.summaryText(summary))         # frames/s, path, drift/GPE vs tracking if recorded
chart = logic.trajectoryPlot(browser)     # estimated vs tracked image centre per frame
result = logic.reconstructEstimated(browser, output_spacing_mm=0.5)   # new volume node
model = logic.trainFromBrowsers([browser], "/data/models/mine", epochs=20, initModel="default")
job = logic.startTraining([browser], "/data/models/mine", epochs=20)   # separate process
print(job.poll())                         # its progress events; job.cancel() stops it
job = logic.startAdaptation(trackedBrowsers, "/data/models/adapted_probe.pt")  # 2+ tracked sweeps
</pre>
<p>The estimate is added to the same browser as the transform sequence
<i>ImageToEstimatedReference</i> (one pose per frame); a new estimate replaces it and nothing
else. It hangs under the transform the recording's images hang under (e.g. ReferenceToRAS),
so it shows where the tracked frames show. <b>Train</b> runs in a separate process: Slicer
stays usable, the panel shows each epoch, and Cancel stops it (the finished epochs stay; a new
run in the same folder resumes them). <b>Adapt to this probe</b> chooses, on a few tracked
recordings of your probe, between no correction, the model's out-of-plane scale, a blend
with calibrated speckle decorrelation and that decorrelation instead of the model (whichever drifts least on recordings it was not fitted
on; optionally it fine-tunes the model too), in a separate process: on simulated probes it was
not trained on, the median drift went from 15-25 % to 8-16 % of the path in our tests. Reading the recording (Info), estimating (its
reading of the recording included) and reconstructing show progress and have a Cancel button
too, which leaves the scene as it was.</p>
<p>Runs on 3D Slicer 5.10 and later (their bundled Python 3.12). The Python packages it needs
beyond Slicer's own (numba, OpenCV, pynrrd, h5py; listed with version bounds in the extension's
<code>Resources/requirements.txt</code>) are installed on first use, after asking.</p>
<p>See the <a href="https://github.com/freehandus/SlicerFreehandUS#readme">FreehandUS documentation</a>.</p>
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

#: Versions of torch the PyTorch extension may install for this module.
TORCH_VERSION_REQUIREMENT = ">=2.0"


def installDependencies(*, askConfirmation=True) -> list:
    """Install what Slicer's Python lacks of the extension's requirements; before any Lib import.

    ``SensorlessTrackingLib.mrml_tracking`` imports the reconstruction (numba) and OpenCV, the
    TUS-REC reader h5py: the requirements are one file for the three modules,
    ``FreehandUS/Resources/requirements.txt`` (see ``FreehandUS.ensureRequirements``); torch is
    not among them (see :func:`ensureTorch`). Returns the requirements installed.
    """
    import FreehandUS

    return FreehandUS.ensureRequirements(askConfirmation=askConfirmation, requester="Sensorless Tracking")


def torchVersionMet() -> bool:
    """Whether the installed torch satisfies :data:`TORCH_VERSION_REQUIREMENT` (by its metadata)."""
    from FreehandUSLib.dependencies import unmet_requirements

    return not unmet_requirements([f"torch{TORCH_VERSION_REQUIREMENT}"])


def ensureTorch(*, askConfirmation=True):
    """The ``torch`` module; installed or updated by the PyTorch extension's PyTorchUtils if needed.

    A torch already in Slicer's Python is used when its version satisfies
    :data:`TORCH_VERSION_REQUIREMENT`; otherwise PyTorchUtils installs one that does (a build that
    matches the GPU driver).

    Raises
    ------
    RuntimeError
        If the PyTorch extension is not installed, the user cancelled the installation, or the
        torch it installed is still too old.
    """
    if torchVersionMet():
        import torch

        return torch
    try:
        import PyTorchUtils
    except ImportError as exc:
        raise RuntimeError(
            f"Sensorless Tracking needs PyTorch {TORCH_VERSION_REQUIREMENT} from the PyTorch extension (module "
            "PyTorchUtils); install the extension with the Extensions Manager and restart Slicer"
        ) from exc
    torchLogic = PyTorchUtils.PyTorchUtilsLogic()
    torch = torchLogic.installTorch(askConfirmation, torchVersionRequirement=TORCH_VERSION_REQUIREMENT)
    if torch is None:
        raise RuntimeError("PyTorch was not installed (the installation was cancelled)")
    if not torchVersionMet():
        raise RuntimeError(
            f"PyTorch {torch.__version__} is installed but Sensorless Tracking needs torch{TORCH_VERSION_REQUIREMENT}; "
            "update it in the PyTorch Utils module and restart Slicer"
        )
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


class ModelChoice(enum.Enum):
    """Which trajectory model estimates: the shipped one, a file, or the non-learned baseline."""

    DEFAULT = "default"
    FILE = "file"
    DECORRELATION = "decorrelation"

    def label(self) -> str:
        return {
            "DEFAULT": _("Shipped model (DualTrack, simulated training)"),
            "FILE": _("Model file"),
            "DECORRELATION": _("Speckle decorrelation (no learning)"),
        }[self.name]


class SweepDirection(enum.Enum):
    """Which way the probe moved out of the image plane (SensorlessTrackingLib.conventions)."""

    TOWARD = "toward"
    AWAY = "away"

    def label(self) -> str:
        return {"TOWARD": _("Toward me (out of the screen; default)"), "AWAY": _("Away from me (into the screen)")}[
            self.name
        ]


@parameterNodeWrapper
class SensorlessTrackingParameterNode:
    """
    The parameters of the module, saved with the scene.

    inputBrowser - the ultrasound frames to track (tracking, if any, only for evaluation); the
        estimated trajectory is added to this browser.
    imageToProbe - ImageToProbe calibration (optional): pixel spacing, and the tracked pose of
        recordings whose frames are not placed.
    spacingMm - pixel spacing (mm) of recordings that give none; 0 = from the recording.
    sweepDirection - which way the probe moved out of the image plane (the images cannot show it).
    modelChoice - shipped model, a model file, or the decorrelation baseline.
    modelPath - trained trajectory model (PyTorch checkpoint), used with modelChoice FILE.
    device - where the model runs.
    batchSize - windows given to the model at once.
    mirrorAverage - average a learned model's estimate over the mirrored and backwards sweep
        (4x the time; see the user guide for its effect).
    outputVolume - receives the reconstruction from the estimated trajectory.
    reconstructionSpacingMm - voxel size of that reconstruction, mm.
    trainOutputDirectory - folder of a training run (checkpoints; a second run resumes).
    trainEpochs - passes over the training clips.
    trainFineTune - start from the weights of the selected model (the shipped one, or the model
        file) instead of random weights; its pixel spacing is kept, and its input size unless
        trainFitImage.
    trainFitImage - train on the largest input (multiples of 16 model pixels, at most 160) that
        every checked recording fills, rather than the model's input size.
    adaptFineTune - "Adapt to this probe" also fine-tunes the network (else the out-of-plane
        scale alone).
    """

    inputBrowser: vtkMRMLSequenceBrowserNode
    imageToProbe: vtkMRMLLinearTransformNode
    spacingMm: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    sweepDirection: SweepDirection = SweepDirection.TOWARD
    modelChoice: ModelChoice = ModelChoice.DEFAULT
    modelPath: Path
    device: Device = Device.AUTO
    batchSize: Annotated[int, WithinRange(1, 1024)] = 8
    mirrorAverage: bool = False
    outputVolume: vtkMRMLScalarVolumeNode
    reconstructionSpacingMm: Annotated[float, WithinRange(0.05, 10.0)] = 0.5
    trainOutputDirectory: Path
    trainEpochs: Annotated[int, WithinRange(1, 1000)] = 20
    trainFineTune: bool = True
    trainFitImage: bool = False
    adaptFineTune: bool = False


def _isSet(path: Path) -> bool:
    """A Path parameter left at its default (``Path()``, shown as ".") counts as not set."""
    return str(path) not in ("", ".")


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
        self._trainJob = None

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
        self.ui.estimateButton.connect("clicked(bool)", self.onEstimateButton)
        self.ui.showPlotButton.connect("clicked(bool)", self.onShowPlotButton)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstructButton)
        self.ui.trainButton.connect("clicked(bool)", self.onTrainButton)
        self.ui.adaptButton.connect("clicked(bool)", self.onAdaptButton)
        self.ui.estimateProgressBar.hide()
        self.ui.cancelEstimateButton.hide()
        self.ui.trainProgressBar.hide()
        self.ui.cancelTrainButton.hide()
        self.ui.cancelTrainButton.connect("clicked(bool)", self.onCancelTrainButton)
        self._trainJob = None
        self._trainTimer = qt.QTimer()
        self._trainTimer.setInterval(200)
        self._trainTimer.connect("timeout()", self.onTrainTimer)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._trainTimer.stop()
        if self._trainJob is not None:
            self._trainJob.cancel()  # no training process outlives the application
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
        parameters = self._parameterNode
        hasInput = bool(parameters and parameters.inputBrowser)
        modelReady = bool(
            parameters and (parameters.modelChoice != ModelChoice.FILE or _isSet(parameters.modelPath))
        )
        self.ui.inputInfoButton.enabled = hasInput
        self.ui.modelPathLineEdit.enabled = bool(parameters and parameters.modelChoice == ModelChoice.FILE)
        self.ui.estimateButton.enabled = hasInput and modelReady
        self.ui.estimateButton.toolTip = (
            _("Estimate the probe trajectory of the recording from its images.")
            if hasInput and modelReady
            else _("Select a recording (and a model file when 'Model file' is chosen).")
        )
        self.ui.showPlotButton.enabled = hasInput
        self.ui.reconstructButton.enabled = hasInput
        self.ui.trainButton.enabled = bool(parameters and _isSet(parameters.trainOutputDirectory)) and (
            self._trainJob is None
        )
        self.ui.adaptButton.enabled = self.ui.trainButton.enabled

    def _work(self, what: str, statusLabel):
        """Progress bar + Cancel button around an estimate or reconstruction (FreehandUS.CancellableWork)."""
        import FreehandUS

        return FreehandUS.CancellableWork(self.ui.estimateProgressBar, self.ui.cancelEstimateButton, what, statusLabel)

    def _preparation(self, what: str):
        """The training bar + Cancel button around preparing sweeps before a training/adaptation process."""
        import FreehandUS

        return FreehandUS.CancellableWork(self.ui.trainProgressBar, self.ui.cancelTrainButton, what,
                                          self.ui.trainStatusLabel)

    def onInputInfoButton(self) -> None:
        import FreehandUS

        with slicer.util.tryWithErrorDisplay(_("Failed to read the recording."), waitCursor=True):
            with self._work(_("Reading the recording"), self.ui.inputInfoLabel) as work:
                info = self.logic.sequenceSummary(
                    self._parameterNode.inputBrowser, progress=work.progress, cancel=work.token
                )
                self.ui.inputInfoLabel.text = FreehandUS.summaryText(info)

    def onSetupTorchButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to set up PyTorch."), waitCursor=True):
            self.ui.torchStatusLabel.text = self.logic.setupTorch()

    def onEstimateButton(self) -> None:
        parameters = self._parameterNode
        self.ui.resultsLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("Trajectory estimation failed."), waitCursor=True):
            with self._work(_("Trajectory estimation"), self.ui.resultsLabel) as work:
                summary = self.logic.estimateTrajectory(
                    parameters.inputBrowser,
                    model=self.logic.modelFromParameterNode(parameters),
                    spacingMm=parameters.spacingMm or None,
                    imageToProbeNode=parameters.imageToProbe,
                    device=parameters.device.value,
                    batchSize=parameters.batchSize,
                    mirrorAverage="flip+reverse" if parameters.mirrorAverage else "none",
                    sweepDirection=parameters.sweepDirection.value,
                    progress=work.progress,
                    cancel=work.token,
                )
                self.ui.resultsLabel.text = self.logic.summaryText(summary)
                self.logic.trajectoryPlot(parameters.inputBrowser)

    def onShowPlotButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to plot the trajectory."), waitCursor=True):
            self.logic.trajectoryPlot(self._parameterNode.inputBrowser)

    def onReconstructButton(self) -> None:
        parameters = self._parameterNode
        message = _("Reconstruction from the estimated trajectory failed.")
        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            with self._work(_("Reconstruction"), self.ui.reconstructionStatusLabel) as work:
                if not parameters.outputVolume:
                    parameters.outputVolume = slicer.mrmlScene.AddNewNodeByClass(
                        "vtkMRMLScalarVolumeNode",
                        slicer.mrmlScene.GenerateUniqueName(
                            f"{parameters.inputBrowser.GetName()}EstimatedReconstruction"
                        ),
                    )
                result = self.logic.reconstructEstimated(
                    parameters.inputBrowser,
                    parameters.outputVolume,
                    output_spacing_mm=parameters.reconstructionSpacingMm,
                    progress=work.progress,
                    cancel=work.token,
                )
                self.ui.reconstructionStatusLabel.text = str(result)
                slicer.util.setSliceViewerLayers(background=parameters.outputVolume, fit=True)

    def onTrainButton(self) -> None:
        parameters = self._parameterNode
        # A list of nodes cannot be a parameter bound by connectGui: the checked browsers are
        # read from the selector when the button is pressed.
        browsers = list(self.ui.trainingBrowsersSelector.checkedNodes())
        self.ui.trainStatusLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("Training failed to start."), waitCursor=True):
            initModel = None
            if parameters.trainFineTune and parameters.modelChoice != ModelChoice.DECORRELATION:
                initModel = self.logic.modelFromParameterNode(parameters) or "default"
            # Trains in a separate process: Slicer stays usable; the timer shows its progress.
            # The sweeps are prepared here first, with the same bar and Cancel button.
            job = None
            with self._preparation(_("Preparing the training sweeps")) as work:
                job = self.logic.startTraining(
                    browsers,
                    parameters.trainOutputDirectory,
                    epochs=parameters.trainEpochs,
                    initModel=initModel,
                    image_size="fit" if parameters.trainFitImage else None,
                    device=parameters.device.value,
                    prepareProgress=work.progress,
                    cancel=work.token,
                )
            if job is None:  # cancelled while preparing
                return
            self._trainJob = job
            self.ui.trainProgressBar.maximum = max(int(parameters.trainEpochs), 1)
            self.ui.trainProgressBar.value = 0
            self.ui.trainProgressBar.show()
            self.ui.cancelTrainButton.show()
            self.ui.trainStatusLabel.text = _("Training in process {pid}...").format(pid=self._trainJob.pid)
            self._trainTimer.start()
            self._updateButtons()

    def onAdaptButton(self) -> None:
        parameters = self._parameterNode
        browsers = list(self.ui.trainingBrowsersSelector.checkedNodes())
        self.ui.trainStatusLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("Adaptation failed to start."), waitCursor=True):
            base = self.logic.modelFromParameterNode(parameters)
            # Adapts in a separate process, shown by the training timer (same events).
            job = None
            with self._preparation(_("Reading the recordings")) as work:
                job = self.logic.startAdaptation(
                    browsers,
                    Path(parameters.trainOutputDirectory) / "adapted_probe.pt",
                    base=base if base not in (None, "decorrelation") else "default",
                    fineTune=parameters.adaptFineTune,
                    device=parameters.device.value,
                    prepareProgress=work.progress,
                    cancel=work.token,
                )
            if job is None:  # cancelled while reading
                return
            self._trainJob = job
            self.ui.trainProgressBar.maximum = 3 if parameters.adaptFineTune else 1
            self.ui.trainProgressBar.value = 0
            self.ui.trainProgressBar.show()
            self.ui.cancelTrainButton.show()
            self.ui.trainStatusLabel.text = _("Adapting in process {pid}...").format(pid=self._trainJob.pid)
            self._trainTimer.start()
            self._updateButtons()

    def onTrainTimer(self) -> None:
        """Show the training process's events; finish when it ends."""
        job = self._trainJob
        if job is None:
            self._trainTimer.stop()
            return
        for event in job.poll():
            kind = event.get("event")
            if kind == "progress":
                self.ui.trainProgressBar.maximum = max(int(event["total"]), 1)
                self.ui.trainProgressBar.value = int(event["done"])
                if "message" in event:  # an adaptation step
                    self.ui.trainStatusLabel.text = event["message"]
                else:
                    self.ui.trainStatusLabel.text = _("Epoch {done} of {total} done (loss {loss})").format(
                        done=event["done"], total=event["total"], loss=event.get("train_loss")
                    )
            elif kind == "done":
                parameters = self._parameterNode
                parameters.modelChoice = ModelChoice.FILE
                parameters.modelPath = Path(event["checkpoint"])
                self.ui.trainStatusLabel.text = _("Model written to {path}; it is now the selected model.").format(
                    path=event["checkpoint"]
                ) + ("\n" + event["summary"] if event.get("summary") else "")
            elif kind == "error":
                self.ui.trainStatusLabel.text = _("Training failed: {message}").format(message=event["message"])
                slicer.util.errorDisplay(_("Training failed: {message}").format(message=event["message"]))
        if not job.running:
            if job.returncode not in (0, 2) and not job.cancelled:
                self.ui.trainStatusLabel.text = job.error_text()
            self._finishTraining()

    def onCancelTrainButton(self) -> None:
        if self._trainJob is not None:
            self._trainJob.cancel()
            self.ui.trainStatusLabel.text = _(
                "Training cancelled; the finished epochs stay in the output folder (a new run there resumes them)."
            )
            self._finishTraining()

    def _finishTraining(self) -> None:
        self._trainTimer.stop()
        self._trainJob = None
        self.ui.trainProgressBar.hide()
        self.ui.cancelTrainButton.hide()
        self._updateButtons()


#
# SensorlessTrackingLogic
#


class SensorlessTrackingLogic(ScriptedLoadableModuleLogic):
    """Sensorless tracking from MRML nodes; usable with no widget.

    Recordings are read through the FreehandUS bridge (``FreehandUS.FreehandUSLogic``); the
    estimate, plots, reconstruction and training through ``SensorlessTrackingLib.mrml_tracking``.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self) -> SensorlessTrackingParameterNode:
        return SensorlessTrackingParameterNode(super().getParameterNode())

    def sequenceFromBrowser(self, browserNode, *, progress=None, cancel=None):
        """The tracked sequence held by ``browserNode`` (``FreehandUSLib.TrackedSequence``).

        ``progress(done, total)`` is called every few frames; ``cancel`` (a
        ``FreehandUSLib.jobs.CancelToken``) stops the read within a second.
        """
        import FreehandUS

        return FreehandUS.FreehandUSLogic().sequenceFromBrowser(browserNode, progress=progress, cancel=cancel)

    def sequenceSummary(self, browserNode, *, progress=None, cancel=None) -> dict:
        """What ``freehandus info --json`` reports for the recording held by ``browserNode``
        (``progress``/``cancel`` as for :meth:`sequenceFromBrowser`)."""
        import FreehandUS

        return FreehandUS.FreehandUSLogic().sequenceSummary(browserNode, progress=progress, cancel=cancel)

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

    @staticmethod
    def _ensurePackages(*, torchNeeded: bool) -> None:
        """The extension's requirements and, for learned models, torch of a supported version."""
        installDependencies()
        if torchNeeded and not torchVersionMet():
            ensureTorch()

    def modelFromParameterNode(self, parameterNode=None):
        """The ``model`` argument of :meth:`estimateTrajectory` chosen in the panel.

        Returns ``None`` (the shipped model), ``"decorrelation"`` or the model file path.

        Raises
        ------
        ValueError
            "Model file" is chosen but no file is set.
        """
        parameters = parameterNode or self.getParameterNode()
        if parameters.modelChoice == ModelChoice.DECORRELATION:
            return "decorrelation"
        if parameters.modelChoice == ModelChoice.FILE:
            if not _isSet(parameters.modelPath):
                raise ValueError("'Model file' is selected but no model file is set")
            return str(parameters.modelPath)
        return None

    def estimateTrajectory(
        self,
        browserNode,
        *,
        model=None,
        spacingMm=None,
        imageToProbeNode=None,
        device="cpu",
        batchSize=8,
        mirrorAverage="none",
        sweepDirection="toward",
        progress=None,
        cancel=None,
    ) -> dict:
        """Estimate the trajectory of the recording held by ``browserNode`` and add it to the browser.

        Parameters
        ----------
        browserNode : vtkMRMLSequenceBrowserNode
            Frames to track; a tracked ImageToReference, if recorded, anchors the estimate at the
            first tracked pose and gives the accuracy metrics.
        model : None, str or pathlib.Path
            ``None``: the shipped model; a checkpoint path; ``"decorrelation"``.
        spacingMm : float or (float, float), optional
            Pixel spacing (mm) of a recording that gives none.
        imageToProbeNode : vtkMRMLLinearTransformNode, optional
            ImageToProbe calibration.
        device : {"cpu", "cuda", "auto"}
        batchSize : int
        mirrorAverage : {"none", "flip", "flip+reverse"}
            Learned models: average over the mirrored (and backwards) sweep, 2x (4x) the time.
        sweepDirection : {"toward", "away"}
            Which way the probe moved out of the image plane (``SensorlessTrackingLib.conventions``).
        progress : callable(done, total), optional
        cancel : FreehandUSLib.jobs.CancelToken, optional
            Set it to stop within a second; the browser is left as it was.

        Returns
        -------
        dict
            The summary of ``SensorlessTrackingLib.mrml_tracking.estimate_trajectory_to_browser``
            (frames, frames_per_second, path_length_mm, metrics or None, warnings...). The
            estimate is the browser's ``ImageToEstimatedReference`` transform sequence.
        """
        self._ensurePackages(torchNeeded=model != "decorrelation")
        from SensorlessTrackingLib import mrml_tracking

        imageToProbe = None
        if imageToProbeNode is not None:
            from FreehandUSLib.mrml_reconstruction import image_to_probe_from_node

            imageToProbe = image_to_probe_from_node(imageToProbeNode)
        return mrml_tracking.estimate_trajectory_to_browser(
            browserNode,
            model=model,
            spacing_mm=spacingMm,
            image_to_probe=imageToProbe,
            device=device,
            batch_size=batchSize,
            mirror_average=mirrorAverage,
            sweep_direction=sweepDirection,
            progress=progress,
            cancel=cancel,
        )

    def summaryText(self, summary: dict) -> str:
        """A few readable lines of an estimate summary."""
        installDependencies()
        from SensorlessTrackingLib import mrml_tracking

        return mrml_tracking.summary_text(summary)

    def trajectoryPlot(self, browserNode, *, show=True):
        """Table + plot chart of the estimated (and tracked) image centre per frame.

        Returns
        -------
        vtkMRMLPlotChartNode
            Shown in the layout's plot view when ``show`` is true; its table is the node
            reference ``FreehandUS.SensorlessTracking.TrajectoryTable``.
        """
        installDependencies()
        from SensorlessTrackingLib import mrml_tracking

        chartNode = mrml_tracking.trajectory_plot(browserNode)
        if show:
            slicer.modules.plots.logic().ShowChartInLayout(chartNode)
        return chartNode

    def reconstructEstimated(self, browserNode, outputVolumeNode=None, *, progress=None, cancel=None, **options):
        """Reconstruct a volume from the frames placed by the estimated trajectory.

        Parameters
        ----------
        browserNode : vtkMRMLSequenceBrowserNode
            A browser on which :meth:`estimateTrajectory` ran.
        outputVolumeNode : vtkMRMLScalarVolumeNode, optional
            Default: a new ``<browser>EstimatedReconstruction`` node.
        progress : callable(done, total), optional
        cancel : FreehandUSLib.jobs.CancelToken, optional
            Set it to stop within a second; a new output node is removed.
        **options
            ``roi_node``, ``coverage_volume_node`` and reconstruction options, e.g.
            ``output_spacing_mm=0.5, interpolation="linear", fill_holes=True``.

        Returns
        -------
        FreehandUSLib.reconstruction.ReconstructionResult
        """
        installDependencies()
        from FreehandUSLib.mrml_reconstruction import reconstruct_browser_to_volume_node
        from SensorlessTrackingLib import mrml_tracking

        # the application composes the two capabilities: the estimate places the frames, the
        # reconstruction module's function reconstructs them
        return mrml_tracking.reconstruct_estimated(
            browserNode, outputVolumeNode, reconstruct=reconstruct_browser_to_volume_node, progress=progress,
            cancel=cancel, **options
        )

    def trainFromBrowsers(self, browserNodes, outputDirectory, *, epochs=20, initModel=None, progress=None, **options):
        """Train a model on tracked recordings (sequence browsers); returns the checkpoint path.

        Parameters
        ----------
        browserNodes : list of vtkMRMLSequenceBrowserNode
            Recordings with tracking (a tracked ImageToReference per frame).
        outputDirectory : str or pathlib.Path
            Checkpoints go here; a second call with the same folder resumes.
        epochs : int
        initModel : None, "default", str or pathlib.Path
            Fine-tune this checkpoint (``"default"``: the shipped model) instead of training
            from random weights; its architecture and input geometry are used.
        progress : callable(done, total), optional
            Called after every epoch.
        **options
            ``model_config`` (``SensorlessTrackingLib.models.ModelConfig``), ``image_size``
            ((rows, cols), also when fine-tuning: a larger input sees more of the probe's image;
            ``"fit"``: the largest that every recording fills, at most 160 pixels a side),
            ``config`` (``TrainConfig``), ``clips_per_epoch``, ``batch_size``, ``val_fraction``,
            ``lr``, ``seed``, ``device``, ``image_to_probe``.

        Returns
        -------
        pathlib.Path
            The best checkpoint (use it as ``model=`` of :meth:`estimateTrajectory`).
        """
        self._ensurePackages(torchNeeded=True)
        from SensorlessTrackingLib import mrml_tracking

        return mrml_tracking.train_from_browsers(
            browserNodes, outputDirectory, epochs=epochs, init_model=initModel, progress=progress, **options
        )

    def startTraining(self, browserNodes, outputDirectory, *, epochs=20, initModel=None, prepareProgress=None,
                      cancel=None, **options):
        """Start training in a separate process (Slicer's Python) and return at once.

        Same inputs as :meth:`trainFromBrowsers` (checked here, before the process starts).
        The sweeps are read and resampled here first: ``prepareProgress(done, total)`` shows it
        and ``cancel`` (a ``FreehandUSLib.jobs.CancelToken``) stops it within a second, before
        any process starts.

        Returns
        -------
        FreehandUSLib.jobs.ProcessJob
            ``job.poll()`` returns the new JSON events (``progress`` with ``done``/``total``
            epochs and losses, then ``done`` with ``checkpoint`` or ``error`` with ``message``);
            ``job.cancel()`` kills the process by PID (finished epochs stay in
            ``outputDirectory``).
        """
        self._ensurePackages(torchNeeded=True)
        from SensorlessTrackingLib import mrml_tracking

        return mrml_tracking.start_training_job(
            browserNodes, outputDirectory, epochs=epochs, init_model=initModel, prepare_progress=prepareProgress,
            cancel=cancel, **options,
        )  # fmt: skip

    def startAdaptation(self, browserNodes, outputPath, *, base="default", fineTune=False, device="cpu",
                        imageToProbe=None, prepareProgress=None, cancel=None):
        """Adapt a model to the probe of tracked recordings, in a separate process; returns at once.

        Parameters
        ----------
        browserNodes : list of vtkMRMLSequenceBrowserNode
            At least 2 tracked recordings of the probe (the last is held back to check the result).
        outputPath : str or pathlib.Path
            The adapted model file (``.pt``); use it as ``model=`` of :meth:`estimateTrajectory`.
        base : "default" or a checkpoint path
            The model to adapt.
        fineTune : bool
            Also fine-tune the network (else the out-of-plane scale alone).
        device : {"cpu", "cuda", "auto"}
        imageToProbe : (4, 4) array, optional
            Calibration of recordings with ProbeToReference only.
        prepareProgress, cancel : optional
            As for :meth:`startTraining` (reading the recordings before the process starts).

        Returns
        -------
        FreehandUSLib.jobs.ProcessJob
            ``SensorlessTrackingLib.mrml_tracking.start_adaptation_job``: ``poll()`` gives
            ``progress`` (``message``) and then ``done`` (``checkpoint``, ``summary``) or ``error``.
        """
        self._ensurePackages(torchNeeded=True)
        from SensorlessTrackingLib import mrml_tracking

        return mrml_tracking.start_adaptation_job(
            browserNodes, outputPath, base=base, fine_tune=fineTune, device=device, image_to_probe=imageToProbe,
            prepare_progress=prepareProgress, cancel=cancel,
        )  # fmt: skip


#
# SensorlessTrackingTest
#


class SensorlessTrackingTest(ScriptedLoadableModuleTest):
    """Self-test run by Slicer: a synthetic recording, Logic called directly."""

    def setUp(self):
        slicer.mrmlScene.Clear()
        installDependencies(askConfirmation=False)  # a fresh Slicer lacks numba, OpenCV...

    def runTest(self):
        self.setUp()
        self.test_recordingFromBrowser()
        self.setUp()
        self.test_estimatePlotReconstruct()

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

    def test_estimatePlotReconstruct(self):
        self.delayDisplay("Tracked browser -> estimate (decorrelation) -> plot -> reconstruction")
        import numpy as np
        from FreehandUSLib.mrml import sequence_to_browser

        import FreehandUS

        sweep = FreehandUS.makeTestSequence(nFrames=8, nRows=64, nCols=64, seed=5)
        imageToProbe = np.diag([0.3, 0.3, 1.0, 1.0])
        browserNode = sequence_to_browser(slicer.mrmlScene, sweep, image_to_probe=imageToProbe, browser_name="Sweep")
        nSequences = browserNode.GetNumberOfSynchronizedSequenceNodes()

        logic = SensorlessTrackingLogic()
        summary = logic.estimateTrajectory(browserNode, model="decorrelation")
        self.assertEqual(summary["frames"], sweep.n_frames)
        self.assertIsNotNone(summary["metrics"])
        self.assertEqual(browserNode.GetNumberOfSynchronizedSequenceNodes(), nSequences + 1)
        estimate = slicer.mrmlScene.GetNodeByID(summary["sequence_id"])
        self.assertEqual(estimate.GetNumberOfDataNodes(), sweep.n_frames)
        logic.estimateTrajectory(browserNode, model="decorrelation")  # replaces its own output only
        self.assertEqual(browserNode.GetNumberOfSynchronizedSequenceNodes(), nSequences + 1)

        chartNode = logic.trajectoryPlot(browserNode, show=False)
        self.assertEqual(chartNode.GetNumberOfPlotSeriesNodes(), 8)  # the position columns, the drift and its 95 % band

        outputNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "EstimatedReconstruction")
        result = logic.reconstructEstimated(browserNode, outputNode, output_spacing_mm=1.0)
        self.assertEqual(result.frames_used, sweep.n_frames)
        self.assertGreater(np.count_nonzero(slicer.util.arrayFromVolume(outputNode)), 0)
        self.delayDisplay("Test passed")
