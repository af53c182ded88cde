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
import logging
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import numpy as np
import qt
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
.seq.nrrd) and TUS-REC scans (.h5) into a sequence browser, inspect them, save them in another
format, and reconstruct 3D volumes from them, offline or live from a PlusServer stream.</p>
<p>Everything the panel does is available from the Python console:</p>
<pre>
import FreehandUS
logic = FreehandUS.FreehandUSLogic()
browser = logic.loadSequence("/data/SpinePhantomFreehand.igs.mha")
sequence = logic.sequenceFromBrowser(browser)   # numpy frames + named transforms
print(sequence.n_frames, sequence.transform_names)
logic.saveSequence(browser, "/data/spine.seq.nrrd")

# Volume reconstruction (options: FreehandUSLib.reconstruction.ReconstructionOptions fields)
calibration = slicer.util.getNode("ImageToProbe")   # ImageToProbe, mm per pixel included
volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Spine")
result = logic.reconstructFromSequence(browser, volume, imageToProbeNode=calibration,
    output_spacing_mm=0.5, interpolation="linear", compounding="max", fill_holes=True)
print(result)   # frames used/skipped, grid, coverage, seconds
# ... or take the options and ImageToProbe from a PLUS device-set config:
result = logic.reconstructFromSequence(browser, volume,
    plusConfig="/data/PlusDeviceSet_VolumeReconstructionOnly_SpinePhantom_NN_MEAN.xml")
</pre>
<p>Live reconstruction from PlusServer (or <code>freehandus serve</code>) through SlicerOpenIGTLink:
the connector creates an <code>Image_Reference</code> volume node (ImageToReference in its IJKToRAS)
and updates it with every frame.</p>
<pre>
cnode = slicer.vtkMRMLIGTLConnectorNode()
slicer.mrmlScene.AddNode(cnode)
cnode.SetTypeClient("localhost", 18944)
cnode.Start()
# once the first frame has arrived:
image = slicer.util.getNode("Image_Reference")
live = logic.startLiveReconstruction(image, None, updateIntervalS=2.0, output_spacing_mm=0.5)
print(live.status())      # frames used, skipped (and why), dropped, missed
result = logic.stopLiveReconstruction()   # last frames, hole filling, final volume
</pre>
<p>Sample data: <i>Sample Data &gt; FreehandUS</i> downloads the PLUS toolkit's spine phantom sweep
and fCal N-wire recordings (with their PLUS configs) and loads them as sequence browsers.</p>
<p>Runs on 3D Slicer 5.10 and later (their bundled Python 3.12). The Python packages it needs
beyond Slicer's own (numba, OpenCV, pynrrd, h5py; listed with version bounds in the extension's
<code>Resources/requirements.txt</code>) are installed on first use, after asking.</p>
<p>Documentation: the extension's README and user guide, at the
<a href="https://github.com/freehandus/SlicerFreehandUS#readme">FreehandUS repository</a> once it is
published there (an assumed address, not yet confirmed).</p>
"""
        )
        self.parent.acknowledgementText = _(
            """
FreehandUS follows the coordinate conventions and file formats of the PLUS toolkit
(www.plustoolkit.org) and works alongside SlicerIGT and SlicerOpenIGTLink.
"""
        )
        # The PLUS sample recordings in the Sample Data module, once Slicer has started.
        slicer.app.connect("startupCompleted()", registerSampleData)
        # PLUS's INVALID tracking of recordings Slicer's own reader loads, kept from then on.
        slicer.app.connect("startupCompleted()", observeLoadedRecordings)


#
# Sample data (the PLUS toolkit's recordings, downloaded on request; see FreehandUSLib.sample_data)
#


def registerSampleData():
    """Offer the PLUS sample recordings in the Sample Data module (category "FreehandUS").

    Called when Slicer has started. The files are not in the extension: the Sample Data button
    downloads them from the PLUS toolkit's test data (fixed commit, SHA-256 checked) into
    Slicer's cache and loads the recordings as sequence browsers (:meth:`FreehandUSLogic.loadSampleData`).
    """
    import SampleData
    from FreehandUSLib.sample_data import SAMPLES

    icon = str(Path(__file__).resolve().parent / "Resources" / "Icons" / "FreehandUS.png")
    for sample in SAMPLES:
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category="FreehandUS",
            sampleName=sample.name,
            uris=[f.url for f in sample.files],
            fileNames=[f.name for f in sample.files],
            nodeNames=[None for _f in sample.files],
            checksums=[f.checksum for f in sample.files],
            loadFiles=[False for _f in sample.files],
            thumbnailFileName=icon,
            customDownloader=lambda source: FreehandUSLogic().loadSampleData(source.sampleName),
        )


def observeLoadedRecordings():
    """Keep PLUS's INVALID tracking of every recording Slicer's reader loads into the scene.

    Called when Slicer has started (and when the panel opens, for a module loaded later): a
    ``FreehandUSLib.plus_status_observer`` on ``slicer.mrmlScene`` (one per scene) marks the
    frames a PLUS file lists as ``TransformStatus = INVALID`` as soon as File > Add Data (or
    File > Open) has read it, so they stay invalid through File > Save even when no FreehandUS
    module was opened before. It imports only what Slicer bundles: no dependency check needed.
    """
    from FreehandUSLib.plus_status_observer import observe

    observe(slicer.mrmlScene)


#
# Python dependencies (installed into Slicer's Python on first use)
#

#: The packages all three FreehandUS modules need beyond what Slicer bundles (numpy, scipy, vtk,
#: packaging), with version bounds. One file for the three modules: they install into one
#: qt-scripted-modules folder. torch comes from the PyTorch extension (SensorlessTracking.ensureTorch).
REQUIREMENTS_FILE = Path(__file__).resolve().parent / "Resources" / "requirements.txt"


def _slicerPackaging():
    """``slicer.packaging`` where this Slicer has it (5.12 and later), else None."""
    try:
        packagingApi = importlib.import_module("slicer.packaging")
    except ImportError:
        return None
    return packagingApi if hasattr(packagingApi, "pip_ensure") else None


def ensureRequirements(*, askConfirmation=True, requester="FreehandUS") -> list:
    """Install what Slicer's Python lacks of :data:`REQUIREMENTS_FILE`; call before any Lib import.

    Every Logic method (and self-test) of the three modules calls this first: the Libs import
    numba, OpenCV, pynrrd and h5py, which a fresh Slicer does not have. Installed versions are
    checked against the bounds of the file (``importlib.metadata``), not just imported, and
    pip is constrained to keep Slicer's own numpy and scipy. On Slicer 5.12 and later the
    installation goes through ``slicer.packaging.pip_ensure`` (progress dialog, restart prompt),
    before through ``slicer.util.pip_install``.

    Parameters
    ----------
    askConfirmation : bool
        Ask the user before downloading (never asked while Slicer runs tests).
    requester : str
        Module name shown in Slicer's dialogs.

    Returns
    -------
    list of str
        The requirements that were installed (empty when all were met).

    Raises
    ------
    RuntimeError
        If the user declines, if a requirement is still unmet after the installation, or if an
        upgraded package was already imported in an older version (restart Slicer then).
    """
    from FreehandUSLib.dependencies import core_constraints, import_name, read_requirements, unmet_requirements

    requirements = read_requirements(REQUIREMENTS_FILE)
    unmet = unmet_requirements(requirements)
    if not unmet:
        return []
    specs = [str(item.requirement) for item in unmet]
    interactive = askConfirmation and not slicer.app.testingEnabled()
    logging.info("%s: installing Python packages: %s", requester, ", ".join(str(item) for item in unmet))
    with tempfile.TemporaryDirectory(prefix="FreehandUS-") as folder:
        constraints = Path(folder) / "constraints.txt"
        constraints.write_text("\n".join(core_constraints()) + "\n", encoding="utf-8")
        packagingApi = _slicerPackaging()
        if packagingApi is not None:
            packagingApi.pip_ensure(
                specs, constraints=constraints, requester=requester,
                prompt_install=interactive, prompt_restart=interactive, skip_in_testing=False,
            )  # fmt: skip
        else:
            if interactive:
                message = _("{requester} needs these Python packages, which will be downloaded and installed now:")
                message = message.format(requester=requester) + "\n\n" + "\n".join(specs)
                if not slicer.util.confirmOkCancelDisplay(message):
                    raise RuntimeError(f"{requester} needs {', '.join(specs)}; the installation was cancelled")
            slicer.util.pip_install([*specs, "-c", str(constraints)])
    importlib.invalidate_caches()
    still = unmet_requirements(requirements)
    if still:
        raise RuntimeError(
            f"{requester}: still unmet after the installation: {'; '.join(str(item) for item in still)}"
        )
    stale = [
        str(item.requirement)
        for item in unmet
        if item.installed is not None and import_name(item.requirement.name) in sys.modules
    ]
    if stale:
        raise RuntimeError(f"{requester}: {', '.join(stale)} updated while an older version is loaded; restart Slicer")
    return specs


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


class CancellableWork:
    """A progress bar and a Cancel button around one long Logic call made on the GUI thread.

    Used by the three modules' Widgets (issue 22: long work does not freeze Slicer and can be
    cancelled)::

        with slicer.util.tryWithErrorDisplay(message, waitCursor=True):
            with CancellableWork(self.ui.progressBar, self.ui.cancelButton, _("Reconstruction")) as work:
                self.logic.reconstructFromSequence(..., progress=work.progress, cancel=work.token)

    ``work.progress`` sets the bar, lets Qt handle events (the panel and its Cancel button stay
    responsive; the Lib reports every batch of frames) and checks the token, which the Cancel
    button sets. Nodes added to the scene inside the block are removed when it raises
    (``FreehandUSLib.jobs.scene_rollback``), so a cancel leaves the scene as it was; the
    ``Cancelled`` exception ends here with a status message instead of an error box. The rules
    live in ``FreehandUSLib.jobs`` (tested headless); this class is only the Qt side.
    """

    def __init__(self, progressBar, cancelButton, what: str, statusLabel=None):
        ensureRequirements()  # the work needs the Lib: install what it lacks first (as the Logic does)
        from FreehandUSLib import jobs

        self._jobs = jobs
        self.progressBar = progressBar
        self.cancelButton = cancelButton
        self.statusLabel = statusLabel
        self.token = jobs.CancelToken(what)
        self.progress = jobs.cancellable_progress(self._report, self.token, tick=slicer.app.processEvents)
        self._rollback = None
        self._slot = lambda *args: self.token.cancel()  # one object: connected, then disconnected

    def _report(self, done, total) -> None:
        self.progressBar.maximum = max(int(total), 1)
        self.progressBar.value = int(done)

    def __enter__(self) -> "CancellableWork":
        self.progressBar.value = 0
        self.progressBar.show()
        self.cancelButton.enabled = True
        self.cancelButton.show()
        self.cancelButton.clicked.connect(self._slot)
        self._rollback = self._jobs.scene_rollback(slicer.mrmlScene)
        self._rollback.__enter__()
        return self

    def __exit__(self, excType, exc, tb) -> bool:
        try:
            self._rollback.__exit__(excType, exc, tb)
        finally:
            self.cancelButton.clicked.disconnect(self._slot)
            self.cancelButton.hide()
            self.progressBar.hide()
        if isinstance(exc, self._jobs.Cancelled):
            if self.statusLabel is not None:
                self.statusLabel.text = str(exc)
            slicer.util.showStatusMessage(str(exc), 5000)
            return True
        return False


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
    imageToProbe - ImageToProbe calibration used to place the loaded frames and, when set, to
        reconstruct (optional).
    inputBrowser - the tracked recording (sequence browser) the panel works on.
    outputSequencePath - file the recording is saved to; the format follows the name.
    roi - box to reconstruct, in the Reference frame (None: enclose all frames).
    outputSpacingMm - voxel size of the reconstruction, mm.
    interpolation - how a pixel is spread into voxels.
    compounding - how overlapping frames are combined.
    fillHoles - fill voxels no frame reached from their neighbours.
    plusArithmetic - reproduce PLUS's arithmetic (the volume PLUS makes, voxel for voxel) instead
        of the exact default (``emulate_plus``).
    plusConfigPath - PLUS device-set config: ImageToProbe and hole-filling kernels for the
        reconstruction; "Use config settings" copies its <VolumeReconstruction> into the panel.
    clipEnabled, clipOriginXPx, clipOriginYPx, clipWidthPx, clipHeightPx - PLUS clip rectangle,
        pixels (a zero size keeps the whole image).
    fanEnabled, fanAngleMinDeg, fanAngleMaxDeg, fanOriginXPx, fanOriginYPx, fanRadiusStartPx,
        fanRadiusStopPx - PLUS fan mask (angles from the image's depth axis, apex and radii in
        pixels).
    outputVolume - scalar volume that receives the reconstruction.
    coverageVolume - scalar volume that receives the coverage map (weight per voxel).
    showCoverage - show the coverage map over the reconstruction in the slice views.
    liveImage - live image node updated by SlicerOpenIGTLink (e.g. Image_Reference).
    liveUpdateIntervalS - seconds between refreshes of the output during live reconstruction.
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
    plusArithmetic: bool = False
    plusConfigPath: Path
    clipEnabled: bool = False
    clipOriginXPx: Annotated[int, WithinRange(0, 100000)] = 0
    clipOriginYPx: Annotated[int, WithinRange(0, 100000)] = 0
    clipWidthPx: Annotated[int, WithinRange(0, 100000)] = 0
    clipHeightPx: Annotated[int, WithinRange(0, 100000)] = 0
    fanEnabled: bool = False
    fanAngleMinDeg: Annotated[float, WithinRange(-89.9, 89.9)] = -30.0
    fanAngleMaxDeg: Annotated[float, WithinRange(-89.9, 89.9)] = 30.0
    fanOriginXPx: Annotated[float, WithinRange(-100000.0, 100000.0)] = 0.0
    fanOriginYPx: Annotated[float, WithinRange(-100000.0, 100000.0)] = 0.0
    fanRadiusStartPx: Annotated[float, WithinRange(0.0, 100000.0)] = 0.0
    fanRadiusStopPx: Annotated[float, WithinRange(0.0, 100000.0)] = 500.0
    outputVolume: vtkMRMLScalarVolumeNode
    coverageVolume: vtkMRMLScalarVolumeNode
    showCoverage: bool = True
    liveImage: vtkMRMLScalarVolumeNode
    liveUpdateIntervalS: Annotated[float, WithinRange(0.2, 60.0)] = 2.0


def _isSet(path: Path) -> bool:
    """A Path parameter left at its default (``Path()``, shown as ".") counts as not set."""
    return str(path) not in ("", ".")


#
# FreehandUSWidget
#


class FreehandUSWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: loads the .ui, binds it to the parameter node, one Logic call per button.

    Live reconstruction: the Logic observes the live image node and refreshes the output while
    frames arrive (it stays free of Qt); this widget owns a ``qt.QTimer`` that also refreshes
    it every ``liveUpdateIntervalS`` seconds, so the last frames show when the stream pauses,
    and shows the live status.
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._warmJob = None
        self._liveTimer = None
        self._liveShown = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/FreehandUS.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top-level mrmlSceneChanged signal to every node selector.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = FreehandUSLogic()
        observeLoadedRecordings()  # already done at start-up unless the module was loaded later

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.loadButton.connect("clicked(bool)", self.onLoadButton)
        self.ui.infoButton.connect("clicked(bool)", self.onInfoButton)
        self.ui.saveButton.connect("clicked(bool)", self.onSaveButton)
        self.ui.loadConfigButton.connect("clicked(bool)", self.onLoadConfigButton)
        self.ui.reconstructButton.connect("clicked(bool)", self.onReconstructButton)
        self.ui.liveButton.connect("toggled(bool)", self.onLiveButton)
        self.ui.reconstructionProgressBar.hide()
        self.ui.cancelReconstructionButton.hide()
        self.ui.recordingProgressBar.hide()
        self.ui.cancelRecordingButton.hide()

        self._liveTimer = qt.QTimer()
        self._liveTimer.connect("timeout()", self.onLiveTimer)
        self._warmJob = None
        self._warmTimer = qt.QTimer()
        self._warmTimer.setInterval(500)
        self._warmTimer.connect("timeout()", self.onWarmTimer)

        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._stopLive()
        self._warmTimer.stop()
        if self._warmJob is not None:
            self._warmJob.cancel()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        if not FreehandUSWidget._kernelsWarmUpStarted:  # once per Slicer session
            FreehandUSWidget._kernelsWarmUpStarted = True
            self._warmJob = self.logic.startKernelWarmUp()
            if self._warmJob is not None:
                self._warmTimer.start()

    #: Whether this Slicer session started the kernels' warm-up (FreehandUSLib.warm_kernels).
    _kernelsWarmUpStarted = False

    def onWarmTimer(self) -> None:
        """Reap the kernels' warm-up process when it ends (it runs beside Slicer, see FreehandUSLib.warm_kernels)."""
        job = self._warmJob
        if job is None or not job.running:
            if job is not None:
                for event in job.poll():
                    if event.get("event") == "error":
                        logging.warning("FreehandUS: compiling the reconstruction kernels failed: %s", event["message"])
            self._warmTimer.stop()
            self._warmJob = None

    def _waitForKernels(self, work) -> None:
        """While the warm-up compiles the kernels, show its progress (Cancel works) instead of compiling here too."""
        job = self._warmJob
        if job is None or not job.running:
            return
        self.ui.reconstructionStatusLabel.text = _("Compiling the reconstruction kernels (once after installing)...")
        while job.running:
            for event in job.poll():
                if event.get("event") == "progress":
                    work.progress(event["done"], event["total"])
            work.progress(self.ui.reconstructionProgressBar.value, self.ui.reconstructionProgressBar.maximum)
            try:
                job.process.wait(0.1)
            except subprocess.TimeoutExpired:
                pass
        self.ui.reconstructionStatusLabel.text = ""

    def exit(self) -> None:
        """Called each time the user opens a different module (live reconstruction goes on)."""
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
        """Reload this file and FreehandUSLib (cached FreehandUSLib modules are dropped first)."""
        self._stopLive()
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
        live = bool(self.logic and self.logic.isLiveReconstructionRunning())
        self.ui.loadButton.enabled = bool(parameters and parameters.sequencePath.is_file())
        self.ui.infoButton.enabled = bool(parameters and parameters.inputBrowser)
        self.ui.saveButton.enabled = bool(
            parameters and parameters.inputBrowser and _isSet(parameters.outputSequencePath)
        )
        self.ui.loadConfigButton.enabled = bool(parameters and parameters.plusConfigPath.is_file())
        canReconstruct = bool(parameters and parameters.inputBrowser) and not live
        self.ui.reconstructButton.enabled = canReconstruct
        self.ui.reconstructButton.toolTip = (
            _("Reconstruct a volume from the selected recording into the output volume.")
            if canReconstruct
            else _("Select a sequence browser (and stop live reconstruction) first.")
        )
        self.ui.liveButton.enabled = live or bool(parameters and parameters.liveImage)
        if self.ui.liveButton.checked != live:
            wasBlocked = self.ui.liveButton.blockSignals(True)
            self.ui.liveButton.checked = live
            self.ui.liveButton.blockSignals(wasBlocked)
        self.ui.liveButton.text = _("Stop live reconstruction") if live else _("Live")

    def _recordingWork(self, what: str) -> CancellableWork:
        """Progress bar + Cancel button of the recording section (load, info, save)."""
        return CancellableWork(self.ui.recordingProgressBar, self.ui.cancelRecordingButton, what, self.ui.infoLabel)

    def onLoadButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to load the tracked sequence."), waitCursor=True):
            with self._recordingWork(_("Loading")) as work:
                parameters = self._parameterNode
                parameters.inputBrowser = self.logic.loadSequence(
                    parameters.sequencePath, parameters.imageToProbe, progress=work.progress, cancel=work.token
                )

    def onInfoButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to read the tracked sequence."), waitCursor=True):
            with self._recordingWork(_("Reading the recording")) as work:
                info = self.logic.sequenceSummary(
                    self._parameterNode.inputBrowser, progress=work.progress, cancel=work.token
                )
                self.ui.infoLabel.text = summaryText(info)

    def onSaveButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to save the tracked sequence."), waitCursor=True):
            with self._recordingWork(_("Saving")) as work:
                parameters = self._parameterNode
                written = self.logic.saveSequence(
                    parameters.inputBrowser, parameters.outputSequencePath, progress=work.progress, cancel=work.token
                )
                slicer.util.showStatusMessage(_("Saved {path}").format(path=written), 3000)

    def onLoadConfigButton(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to read the PLUS configuration."), waitCursor=True):
            parameters = self._parameterNode
            self.logic.parametersFromPlusConfig(parameters.plusConfigPath, parameters)

    def _ensureOutputNodes(self, baseName: str) -> None:
        """Create the output (and, when the coverage is shown, coverage) volume if none is selected."""
        parameters = self._parameterNode
        if not parameters.outputVolume:
            parameters.outputVolume = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(f"{baseName}Reconstruction")
            )
        if parameters.showCoverage and not parameters.coverageVolume:
            parameters.coverageVolume = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(f"{baseName}Coverage")
            )

    def onReconstructButton(self) -> None:
        parameters = self._parameterNode
        self.ui.reconstructionStatusLabel.text = ""
        with slicer.util.tryWithErrorDisplay(_("Volume reconstruction failed."), waitCursor=True):
            with CancellableWork(
                self.ui.reconstructionProgressBar, self.ui.cancelReconstructionButton, _("Reconstruction"),
                self.ui.reconstructionStatusLabel,
            ) as work:  # fmt: skip
                self._waitForKernels(work)
                self._ensureOutputNodes(parameters.inputBrowser.GetName())
                result = self.logic.reconstructFromSequence(
                    parameters.inputBrowser,
                    parameters.outputVolume,
                    imageToProbeNode=parameters.imageToProbe,
                    roiNode=parameters.roi,
                    coverageVolumeNode=parameters.coverageVolume,
                    plusConfig=parameters.plusConfigPath if _isSet(parameters.plusConfigPath) else None,
                    progress=work.progress,
                    cancel=work.token,
                    **self.logic.optionsFromParameterNode(parameters),
                )
                self.ui.reconstructionStatusLabel.text = str(result)
                self.logic.showReconstruction(
                    parameters.outputVolume, parameters.coverageVolume if parameters.showCoverage else None
                )

    def onLiveButton(self, checked) -> None:
        if not checked:
            self._stopLive()
            return
        parameters = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start live reconstruction."), waitCursor=True):
            self._ensureOutputNodes(parameters.liveImage.GetName())
            self.logic.startLiveReconstruction(
                parameters.liveImage,
                parameters.outputVolume,
                roiNode=parameters.roi,
                coverageVolumeNode=parameters.coverageVolume,
                updateIntervalS=parameters.liveUpdateIntervalS,
                **self.logic.optionsFromParameterNode(parameters),
            )
            self._liveShown = False
            self._liveTimer.start(int(1000 * parameters.liveUpdateIntervalS))
            self.ui.liveStatusLabel.text = _("Waiting for frames from {node}...").format(
                node=parameters.liveImage.GetName()
            )
        self._updateButtons()

    def onLiveTimer(self) -> None:
        parameters = self._parameterNode
        try:
            result = self.logic.updateLiveReconstruction()
        except Exception as exc:  # a modal box every interval would lock the GUI: stop refreshing
            self._liveTimer.stop()
            logging.exception("Live reconstruction refresh failed")
            slicer.util.errorDisplay(
                _("Live reconstruction stopped refreshing the output (stop and restart it): {error}").format(error=exc)
            )
            return
        self.ui.liveStatusLabel.text = self.logic.liveReconstructionText()
        if result is not None and not self._liveShown and parameters:
            self.logic.showReconstruction(
                parameters.outputVolume, parameters.coverageVolume if parameters.showCoverage else None
            )
            self._liveShown = True

    def _stopLive(self) -> None:
        if self._liveTimer is not None:
            self._liveTimer.stop()
        if self.logic is None or not self.logic.isLiveReconstructionRunning():
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to finish live reconstruction."), waitCursor=True):
            text = self.logic.liveReconstructionText()
            result = self.logic.stopLiveReconstruction()
            self.ui.liveStatusLabel.text = text if result is None else str(result)
        self._updateButtons()


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
        result = logic.reconstructFromSequence(browser, None, imageToProbeNode=calibrationNode,
                                               output_spacing_mm=0.5, compounding="max")

    Reconstruction is glue over ``FreehandUSLib.mrml_reconstruction`` (tested headless with
    slicer-core). Live reconstruction: :meth:`startLiveReconstruction` observes the live image
    node with VTK observers and refreshes the output volume from the frame callbacks whenever
    ``updateIntervalS`` has passed; the Logic holds no Qt timer (it stays usable from the
    console and from tests), so the module's Widget runs one that calls
    :meth:`updateLiveReconstruction` to show the last frames when the stream pauses.
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        self._live = None

    def getParameterNode(self) -> FreehandUSParameterNode:
        return FreehandUSParameterNode(super().getParameterNode())

    def loadSequence(self, path, imageToProbeNode=None, *, name=None, progress=None, cancel=None):
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
        progress : callable(done, total), optional
            Reading the file, then making the nodes.
        cancel : FreehandUSLib.jobs.CancelToken, optional
            Stops the load within a fraction of a second; no node stays in the scene.

        Returns
        -------
        vtkMRMLSequenceBrowserNode
            The new browser; its ``FreehandUS.SourceFile`` attribute holds ``path``.
        """
        path = Path(path)
        ensureRequirements()
        from FreehandUSLib.mrml import load_sequence_file

        imageToProbe = None
        if imageToProbeNode is not None:
            imageToProbe = np.array(slicer.util.arrayFromTransformMatrix(imageToProbeNode))
        browserNode = load_sequence_file(
            slicer.mrmlScene,
            path,
            image_to_probe=imageToProbe,
            browser_name=name or _browserNameFromPath(path),
            progress=progress,
            cancel=cancel,
        )
        browserNode.SetAttribute(SOURCE_FILE_ATTRIBUTE, str(path))
        if imageToProbeNode is not None:
            browserNode.SetNodeReferenceID(IMAGE_TO_PROBE_REFERENCE, imageToProbeNode.GetID())
        return browserNode

    def loadSampleData(self, sampleName) -> dict:
        """Download a PLUS sample (Sample Data module) into Slicer's cache and load its recordings.

        Parameters
        ----------
        sampleName : str
            A ``FreehandUSLib.sample_data.SAMPLES`` name, e.g. ``"FreehandUSSpinePhantom"``.

        Returns
        -------
        dict
            ``{"browsers": [vtkMRMLSequenceBrowserNode, ...], "config": path of the PLUS config or None}``;
            use the config as ``plusConfig`` / ``configPath`` of the modules.

        Raises
        ------
        RuntimeError
            A file could not be downloaded or failed its SHA-256 check.
        """
        ensureRequirements()
        import SampleData
        from FreehandUSLib.sample_data import sample_named

        sample = sample_named(sampleName)
        downloader = SampleData.SampleDataLogic()
        loaded = {"browsers": [], "config": None}
        for sampleFile in sample.files:
            path = downloader.downloadFileIntoCache(sampleFile.url, sampleFile.name, sampleFile.checksum)
            if not path or not Path(path).is_file():
                raise RuntimeError(f"{sample.name}: could not download {sampleFile.url}")
            if sampleFile.is_recording:
                loaded["browsers"].append(self.loadSequence(path))
            else:
                loaded["config"] = str(path)
        return loaded

    def sequenceFromBrowser(self, browserNode, *, progress=None, cancel=None):
        """The tracked sequence held by a browser (frames in MF, named transforms, timestamps).

        Parameters
        ----------
        browserNode : vtkMRMLSequenceBrowserNode
        progress : callable(done, total), optional
        cancel : FreehandUSLib.jobs.CancelToken, optional

        Returns
        -------
        FreehandUSLib.TrackedSequence
        """
        if browserNode is None:
            raise ValueError("sequenceFromBrowser: browserNode is None; select a sequence browser")
        ensureRequirements()
        from FreehandUSLib.mrml import browser_to_sequence

        return browser_to_sequence(browserNode, progress=progress, cancel=cancel)

    def saveSequence(self, browserNode, path, *, progress=None, cancel=None) -> Path:
        """Write the recording held by ``browserNode`` to ``path`` (format from the file name).

        ``progress``/``cancel`` as for :meth:`loadSequence`: a cancelled save writes no file
        and leaves an existing ``path`` as it was.

        Returns
        -------
        pathlib.Path
            The file written; also stored in the browser's ``FreehandUS.SavedFile`` attribute.
        """
        if browserNode is None:
            raise ValueError("saveSequence: browserNode is None; select a sequence browser")
        path = Path(path)
        ensureRequirements()
        from FreehandUSLib.mrml import save_browser_sequence

        written = save_browser_sequence(browserNode, path, progress=progress, cancel=cancel)
        browserNode.SetAttribute(SAVED_FILE_ATTRIBUTE, str(written))
        return written

    def sequenceSummary(self, browserNode, *, progress=None, cancel=None) -> dict:
        """What ``freehandus info --json`` reports for the recording held by ``browserNode``."""
        ensureRequirements()
        from FreehandUSLib.sequence import sequence_info

        sequence = self.sequenceFromBrowser(browserNode, progress=progress, cancel=cancel)
        return sequence_info(sequence, path=browserNode.GetAttribute(SOURCE_FILE_ATTRIBUTE))

    # -- volume reconstruction ---------------------------------------------------------------
    def optionsFromParameterNode(self, parameterNode=None) -> dict:
        """Reconstruction options (``ReconstructionOptions`` field names) set in the panel.

        Clip and fan are always given (a disabled mask as a zero-size clip / zero fan angles),
        so the panel, not a PLUS config, decides which mask applies.
        """
        p = parameterNode or self.getParameterNode()
        options = {
            "output_spacing_mm": float(p.outputSpacingMm),
            "interpolation": p.interpolation.value,
            "compounding": p.compounding.value,
            "fill_holes": bool(p.fillHoles),
            "emulate_plus": bool(p.plusArithmetic),
        }
        if p.clipEnabled:
            options["clip_rectangle_origin_px"] = (int(p.clipOriginXPx), int(p.clipOriginYPx))
            options["clip_rectangle_size_px"] = (int(p.clipWidthPx), int(p.clipHeightPx))
        else:
            options["clip_rectangle_origin_px"] = (0, 0)
            options["clip_rectangle_size_px"] = (0, 0)
        if p.fanEnabled:
            options["fan_angles_deg"] = (float(p.fanAngleMinDeg), float(p.fanAngleMaxDeg))
            options["fan_origin_px"] = (float(p.fanOriginXPx), float(p.fanOriginYPx))
            options["fan_radius_start_px"] = float(p.fanRadiusStartPx)
            options["fan_radius_stop_px"] = float(p.fanRadiusStopPx)
        else:
            options["fan_angles_deg"] = (0.0, 0.0)
            options["fan_angles_auto_detect"] = False
        return options

    def parametersFromPlusConfig(self, path, parameterNode=None):
        """Copy a PLUS config's ``<VolumeReconstruction>`` settings into the panel's parameters.

        Returns
        -------
        FreehandUSLib.reconstruction.ReconstructionOptions
            The config's options (spacing, interpolation, compounding, hole filling, clip, fan).
        """
        ensureRequirements()
        from FreehandUSLib.io.plus_config import read_plus_config
        from FreehandUSLib.reconstruction import options_from_plus_config

        p = parameterNode or self.getParameterNode()
        options = options_from_plus_config(read_plus_config(Path(path)))
        spacing = options.output_spacing_mm
        if max(spacing) - min(spacing) > 1e-9:
            logging.warning("%s: anisotropic OutputSpacing %s; the panel uses %g mm", path, spacing, min(spacing))
        wasModified = p.parameterNode.StartModify()
        try:
            self._copyOptionsToParameters(options, p, path)
        finally:
            p.parameterNode.EndModify(wasModified)
        return options

    @staticmethod
    def _copyOptionsToParameters(options, p, path) -> None:
        spacing = options.output_spacing_mm
        p.outputSpacingMm = float(min(spacing))
        p.interpolation = Interpolation(options.interpolation)
        if options.compounding in {c.value for c in Compounding}:
            p.compounding = Compounding(options.compounding)
        else:
            logging.warning("%s: compounding %r is not offered by the panel", path, options.compounding)
        p.fillHoles = options.fill_holes
        clipSize = options.clip_rectangle_size_px or (0, 0)
        p.clipEnabled = any(v > 0 for v in clipSize)
        if p.clipEnabled:
            p.clipOriginXPx, p.clipOriginYPx = (int(v) for v in (options.clip_rectangle_origin_px or (0, 0)))
            p.clipWidthPx, p.clipHeightPx = (int(v) for v in clipSize)
        p.fanEnabled = options.fan_enabled
        if options.fan_enabled:
            p.fanAngleMinDeg, p.fanAngleMaxDeg = (float(v) for v in options.fan_angles_deg)
            p.fanOriginXPx, p.fanOriginYPx = (float(v) for v in options.fan_origin_px)
            p.fanRadiusStartPx = float(options.fan_radius_start_px)
            p.fanRadiusStopPx = float(options.fan_radius_stop_px)

    def reconstructFromSequence(
        self,
        browserNode,
        outputVolumeNode=None,
        *,
        imageToProbeNode=None,
        roiNode=None,
        coverageVolumeNode=None,
        plusConfig=None,
        progress=None,
        cancel=None,
        **options,
    ):
        """Reconstruct the recording held by ``browserNode`` into ``outputVolumeNode``.

        Parameters
        ----------
        browserNode : vtkMRMLSequenceBrowserNode
            Tracked recording (image sequence + transform sequences).
        outputVolumeNode : vtkMRMLScalarVolumeNode, optional
            Receives the volume (default: a new ``<browser>Reconstruction`` node).
        imageToProbeNode : vtkMRMLLinearTransformNode, optional
            ImageToProbe calibration; needed when the frames were loaded without one.
        roiNode : vtkMRMLMarkupsROINode, optional
            Box to reconstruct (default: enclose all frames).
        coverageVolumeNode : vtkMRMLScalarVolumeNode, optional
            Receives the coverage map (weight per voxel).
        plusConfig : str or pathlib.Path, optional
            PLUS device-set config: default options and fixed transforms (ImageToProbe).
        progress : callable(done, total), optional
        cancel : FreehandUSLib.jobs.CancelToken, optional
            Set it (e.g. from a Cancel button) to stop within a second; raises
            ``FreehandUSLib.jobs.Cancelled`` and leaves the scene as it was.
        **options
            ``FreehandUSLib.reconstruction.ReconstructionOptions`` fields, e.g.
            ``output_spacing_mm=0.5, interpolation="linear", compounding="max",
            fill_holes=True, fan_angles_deg=(-30, 30), clip_rectangle_origin_px=(10, 20),
            clip_rectangle_size_px=(400, 500), image_to_reference_transform="ImageToTracker"``.

        Returns
        -------
        FreehandUSLib.reconstruction.ReconstructionResult
            Frames used/skipped (with reasons), grid, coverage, timings; the same summary is
            stored in the output node's ``FreehandUS.Reconstruction.*`` attributes.
        """
        ensureRequirements()
        from FreehandUSLib.mrml_reconstruction import reconstruct_browser_to_volume_node

        return reconstruct_browser_to_volume_node(
            browserNode,
            outputVolumeNode,
            image_to_probe_node=imageToProbeNode,
            roi_node=roiNode,
            coverage_volume_node=coverageVolumeNode,
            config=plusConfig,
            progress=progress,
            cancel=cancel,
            **options,
        )

    def startKernelWarmUp(self):
        """Compile the reconstruction kernels in a separate process (``FreehandUSLib.warm_kernels``).

        numba compiles them on their first run after an installation; done here, beside Slicer,
        the first reconstruction finds them in numba's cache instead of blocking the GUI while
        they compile. Nothing is installed: when the packages are not there yet (the first
        reconstruction installs them) this returns None.

        Returns
        -------
        FreehandUSLib.jobs.ProcessJob or None
            ``poll()`` gives ``progress`` events over the option variants, then ``done``.
        """
        from FreehandUSLib.dependencies import read_requirements, unmet_requirements

        if unmet_requirements(read_requirements(REQUIREMENTS_FILE)):
            return None
        from FreehandUSLib.jobs import ProcessJob

        return ProcessJob.python_module("FreehandUSLib.warm_kernels", pythonpath=[Path(__file__).resolve().parent])

    def showReconstruction(self, outputVolumeNode, coverageVolumeNode=None) -> None:
        """Show the volume in the slice views, the coverage map (if given) over it in colour."""
        slicer.util.setSliceViewerLayers(
            background=outputVolumeNode,
            foreground=coverageVolumeNode,
            foregroundOpacity=0.4 if coverageVolumeNode is not None else 0.0,
            fit=True,
        )

    def startLiveReconstruction(
        self,
        imageNode,
        outputVolumeNode=None,
        *,
        roiNode=None,
        coverageVolumeNode=None,
        updateIntervalS=2.0,
        **options,
    ):
        """Reconstruct from a live image node (e.g. SlicerOpenIGTLink's ``Image_Reference``).

        Every update of ``imageNode`` with new pixels is a frame: its ImageToReference is the
        node's IJKToRAS composed with its parent transforms. The output volume is refreshed
        whenever ``updateIntervalS`` has passed when a frame arrives, and by
        :meth:`updateLiveReconstruction`. A running live reconstruction is stopped first.

        Parameters
        ----------
        imageNode : vtkMRMLScalarVolumeNode
        outputVolumeNode : vtkMRMLScalarVolumeNode, optional
            Default: a new ``<image>Reconstruction`` node.
        roiNode : vtkMRMLMarkupsROINode, optional
            Fixed box; default: a grid that grows with the sweep.
        coverageVolumeNode : vtkMRMLScalarVolumeNode, optional
        updateIntervalS : float
            Seconds between output refreshes.
        **options
            ``ReconstructionOptions`` fields (as in :meth:`reconstructFromSequence`).

        Returns
        -------
        FreehandUSLib.mrml_reconstruction.LiveReconstruction
            Its ``status()`` reports frames used, skipped (with reasons), dropped and missed.
        """
        if imageNode is None:
            raise ValueError("startLiveReconstruction: imageNode is None; select the live image (e.g. Image_Reference)")
        self.stopLiveReconstruction()
        ensureRequirements()
        from FreehandUSLib.mrml_reconstruction import LiveReconstruction

        if outputVolumeNode is None:
            outputVolumeNode = slicer.mrmlScene.AddNewNodeByClass(
                "vtkMRMLScalarVolumeNode", slicer.mrmlScene.GenerateUniqueName(f"{imageNode.GetName()}Reconstruction")
            )
        live = LiveReconstruction(
            outputVolumeNode,
            roi_node=roiNode,
            coverage_volume_node=coverageVolumeNode,
            update_interval_s=updateIntervalS,
            **options,
        )
        self._live = live.observe(imageNode)
        return self._live

    def updateLiveReconstruction(self):
        """Insert the frames received so far and refresh the output (None: nothing yet)."""
        return None if self._live is None else self._live.update_output()

    def stopLiveReconstruction(self):
        """Stop observing, insert the last frames, fill holes (if enabled), write the final volume.

        Returns
        -------
        FreehandUSLib.reconstruction.ReconstructionResult or None
            None when no live reconstruction ran or no frame was used.
        """
        live, self._live = self._live, None
        return None if live is None else live.stop()

    def isLiveReconstructionRunning(self) -> bool:
        return self._live is not None

    def liveReconstructionStatus(self) -> dict:
        """Counters of the running live reconstruction (empty when none runs)."""
        return {} if self._live is None else self._live.status()

    def liveReconstructionText(self) -> str:
        """One line for the panel: frames used, skipped, dropped, missed, coverage."""
        return "" if self._live is None else str(self._live)


#
# FreehandUSTest
#


def makeTestSequence(nFrames=6, nRows=24, nCols=32, seed=0):
    """A small synthetic TrackedSequence (uint8 frames, ProbeToTracker + ReferenceToTracker).

    Used by the self-tests of all three modules; downloads nothing.
    """
    ensureRequirements()
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
        ensureRequirements()  # a fresh Slicer lacks numba, pynrrd...: before any Lib import

    def runTest(self):
        self.setUp()
        self.test_sequenceFromBrowser()
        self.setUp()
        self.test_loadAndSave()
        self.setUp()
        self.test_reconstructFromSequence()
        self.setUp()
        self.test_liveReconstruction()
        self.setUp()
        self.test_cancelReconstruction()

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

    def test_cancelReconstruction(self):
        self.delayDisplay("Logic.reconstructFromSequence cancelled from another thread: stops, no new node")
        import threading

        from FreehandUSLib.jobs import Cancelled, CancelToken
        from FreehandUSLib.mrml import sequence_to_browser, transform_to_node

        sequence = makeTestSequence(nFrames=96, seed=3)
        browserNode = sequence_to_browser(slicer.mrmlScene, sequence, browser_name="ToCancel")
        calibrationNode = transform_to_node(slicer.mrmlScene, np.diag([0.3, 0.3, 1.0, 1.0]), name="ImageToProbe")
        before = {slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())}
        token = CancelToken("reconstruction")
        reports = []

        def progress(done, total):  # the Cancel button of the panel, pressed during the first batch
            reports.append(done)
            if len(reports) == 1:
                canceller = threading.Thread(target=token.cancel)
                canceller.start()
                canceller.join()

        with self.assertRaises(Cancelled):
            FreehandUSLogic().reconstructFromSequence(
                browserNode, imageToProbeNode=calibrationNode, output_spacing_mm=1.0, progress=progress,
                cancel=token,
            )  # fmt: skip
        after = {slicer.mrmlScene.GetNthNode(i).GetID() for i in range(slicer.mrmlScene.GetNumberOfNodes())}
        self.assertEqual(after, before)  # the new <browser>Reconstruction node was removed
        self.assertEqual(len(reports), 1)
        self.delayDisplay("Test passed")

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

    def test_reconstructFromSequence(self):
        self.delayDisplay("Synthetic browser -> Logic.reconstructFromSequence -> volume + coverage nodes")
        from FreehandUSLib.mrml import sequence_to_browser, transform_to_node
        from FreehandUSLib.mrml_reconstruction import ATTR_RECON_FRAMES_USED
        from FreehandUSLib.reconstruction import ReconstructionError, ReconstructionOptions, reconstruct_volume

        sequence = makeTestSequence(nFrames=8, seed=2)
        imageToProbe = np.diag([0.3, 0.3, 1.0, 1.0])
        browserNode = sequence_to_browser(slicer.mrmlScene, sequence, browser_name="Uncalibrated")
        calibrationNode = transform_to_node(slicer.mrmlScene, imageToProbe, name="ImageToProbe")
        outputNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Reconstruction")
        coverageNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Coverage")
        logic = FreehandUSLogic()

        result = logic.reconstructFromSequence(
            browserNode, outputNode, imageToProbeNode=calibrationNode, coverageVolumeNode=coverageNode,
            output_spacing_mm=1.0, compounding="max",
        )  # fmt: skip

        expected = reconstruct_volume(
            sequence, imageToProbe, ReconstructionOptions(output_spacing_mm=1.0, compounding="max")
        )
        self.assertEqual(result.frames_used, sequence.n_frames)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(outputNode), expected.volume.voxels)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(coverageNode), expected.weight.voxels)
        self.assertEqual(outputNode.GetAttribute(ATTR_RECON_FRAMES_USED), str(sequence.n_frames))
        # the panel's parameters give the same options
        parameters = logic.getParameterNode()
        parameters.outputSpacingMm = 1.0
        parameters.compounding = Compounding.MAX
        options = logic.optionsFromParameterNode(parameters)
        self.assertEqual((options["output_spacing_mm"], options["compounding"]), (1.0, "max"))
        self.assertFalse(options["emulate_plus"])  # exact arithmetic unless asked
        # "PLUS arithmetic" gives PLUS's volume (here: its mean, truncated at every insertion)
        parameters.compounding = Compounding.MEAN
        parameters.plusArithmetic = True
        options = logic.optionsFromParameterNode(parameters)
        self.assertTrue(options["emulate_plus"])
        logic.reconstructFromSequence(browserNode, outputNode, imageToProbeNode=calibrationNode, **options)
        plus = reconstruct_volume(sequence, imageToProbe, ReconstructionOptions(**options))
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(outputNode), plus.volume.voxels)
        exact = reconstruct_volume(sequence, imageToProbe, ReconstructionOptions(**{**options, "emulate_plus": False}))
        self.assertFalse(np.array_equal(plus.volume.voxels, exact.volume.voxels))
        parameters.plusArithmetic = False
        with self.assertRaises(ReconstructionError):
            logic.reconstructFromSequence(None, outputNode)
        self.delayDisplay("Test passed")

    def test_liveReconstruction(self):
        self.delayDisplay("Frames through a live image node -> Logic.startLiveReconstruction")
        from FreehandUSLib import TrackedSequence
        from FreehandUSLib.mrml import matrix_to_vtk, vtk_to_matrix
        from FreehandUSLib.reconstruction import ReconstructionOptions, reconstruct_volume
        from vtk.util import numpy_support

        sequence = makeTestSequence(nFrames=8, seed=3)
        imageToProbe = np.diag([0.3, 0.3, 1.0, 1.0])
        imageToReference = sequence.repository(fixed={"ImageToProbe": imageToProbe}).get("ImageToReference")
        # A volume node keeps IJKToRAS as spacing, origin and directions: the matrix it gives back
        # may differ in the last bit, which moves pixels that sit exactly between two voxels.
        scratchNode = slicer.vtkMRMLScalarVolumeNode()
        asStored = []
        for matrix in imageToReference:
            scratchNode.SetIJKToRASMatrix(matrix_to_vtk(matrix))
            stored = vtk.vtkMatrix4x4()
            scratchNode.GetIJKToRASMatrix(stored)
            asStored.append(vtk_to_matrix(stored))
        storedSequence = TrackedSequence(
            frames=sequence.frames,
            transforms={"ImageToReference": (np.stack(asStored), np.ones(sequence.n_frames, dtype=bool))},
        )
        grid = reconstruct_volume(storedSequence, None, ReconstructionOptions(output_spacing_mm=1.0)).grid
        fixedGrid = {
            "output_spacing_mm": 1.0,
            "compounding": "max",
            "output_origin_mm": grid.origin_mm,
            "output_extent": tuple(v for d in grid.dims for v in (0, d - 1)),
        }
        expected = reconstruct_volume(storedSequence, None, ReconstructionOptions(**fixedGrid))
        imageNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "Image_Reference")
        outputNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "LiveReconstruction")
        logic = FreehandUSLogic()
        logic.startLiveReconstruction(imageNode, outputNode, updateIntervalS=0.5, **fixedGrid)
        self.assertTrue(logic.isLiveReconstructionRunning())

        for index in range(sequence.n_frames):  # as SlicerOpenIGTLink updates Image_Reference
            image = vtk.vtkImageData()
            image.SetDimensions(sequence.n_cols, sequence.n_rows, 1)
            image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
            numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = sequence.frames[index].ravel()
            wasModified = imageNode.StartModify()
            imageNode.SetIJKToRASMatrix(matrix_to_vtk(imageToReference[index]))
            imageNode.SetAndObserveImageData(image)
            imageNode.EndModify(wasModified)

        status = logic.liveReconstructionStatus()
        self.assertEqual(status["frames_captured"], sequence.n_frames)
        result = logic.stopLiveReconstruction()
        self.assertFalse(logic.isLiveReconstructionRunning())
        self.assertEqual(result.frames_used, sequence.n_frames)
        np.testing.assert_array_equal(slicer.util.arrayFromVolume(outputNode), expected.volume.voxels)
        self.delayDisplay("Test passed")
