"""DeepRegistration: deformable registration of a moving volume onto a fixed volume.

A thin 3D Slicer scripted module over the pure-Python library ``DeepRegistrationLib``. The
selected nodes are written to a temporary folder, ``PythonSlicer -m DeepRegistrationLib register
... --progress-json`` runs as a subprocess (so Slicer stays responsive and the command line is the
single tested path), progress lines drive the progress bar, and the outputs are read back through
Slicer's own storage nodes into new nodes or into the output nodes the user chose. The input nodes
are never modified, unless the user asks for the result transform to be applied to (or hardened
on) the moving volume.

Written against the scripted-module template and Python API of 3D Slicer 5.4.0 (tag v5.4.0) and
checked against Slicer main at commit 583e9b37d50ead7daf7b783dce465ccaecec8809 (5.13 development):
Utilities/Templates/Modules/Scripted/TemplateKey.py, Base/Python/slicer/util.py,
Base/Python/slicer/parameterNodeWrapper/, Modules/Scripted/SampleData/SampleData.py,
Libs/MRML/Core/vtkMRMLTransformStorageNode.cxx, Modules/Loadable/Colors/Logic/vtkSlicerColorLogic.h
and Modules/Loadable/Segmentations/Logic/vtkSlicerSegmentationsModuleLogic.h. Works with
Slicer >= 5.4 (Python 3.9). Everything the module does with MRML is tested outside Slicer with
PyPI's ``slicer-core`` (Testing/test_slicer_mrml.py).
"""
import enum
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from typing import Annotated, Optional, Union

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import *  # noqa: F403
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    Choice,
    WithinRange,
)

from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTableNode,
    vtkMRMLTransformNode,
)


def _importBridge():
    """Import ``DeepRegistrationLib.slicer_bridge``.

    In an installed extension the package sits beside this file in qt-scripted-modules (see
    CMakeLists.txt). When the module is used from a source checkout (Application Settings >
    Modules > Additional module paths = <repo>/DeepRegistration) it sits one folder up.
    Importing it loads only numpy: torch is needed by the subprocess alone.
    """
    try:
        import DeepRegistrationLib.slicer_bridge as bridge
    except ImportError:
        repositoryRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        if not os.path.isdir(os.path.join(repositoryRoot, "DeepRegistrationLib")):
            raise
        if repositoryRoot not in sys.path:
            sys.path.insert(0, repositoryRoot)
        import DeepRegistrationLib.slicer_bridge as bridge
    return bridge


bridge = _importBridge()

#: Background of the slice views in the QA section.
COMPARISON_VIEWS = ("Fixed", "Warped", "Checkerboard", "Difference")

#: Slicer's diverging blue-white-red table (Base/Logic/Resources/ColorFiles/DivergingBlueRed.txt).
DIVERGING_COLOR_NODE_ID = "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"

#: Attribute that tags nodes created by this module (value: the node's role).
ROLE_ATTRIBUTE = "DeepRegistration.Role"

#: Name of the short-lived nodes the module adds while it exports or imports (removed at once).
TEMPORARY_NODE_NAME = "__DeepRegistrationTemp"

#: Node reference from a Jacobian map to the folded-voxel mask made with it.
FOLDING_REFERENCE_ROLE = "DeepRegistrationFoldingMask"

#: The result nodes, in the order they are listed to the user.
OUTPUT_ROLES = ("transform", "warped", "jacobian", "warpedLabels", "table")

#: Colour of folded voxels in the folding overlay (a saturated yellow, unlike the blue-red map).
FOLDING_COLOR = (1.0, 0.9, 0.0)

SAMPLE_DATA_FOLDER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "Resources", "SampleData")


def _choiceEnum(name, choices, doc):
    """An Enum of the command-line tokens of a ``bridge.*_CHOICES`` list whose ``label()`` is the
    readable text: Slicer's parameterNodeWrapper fills a QComboBox with ``label()`` and stores the
    member's name (the token), so the combo box shows words and the scene stores the token."""
    labels = dict(choices)
    cls = enum.Enum(name, [(token, token) for token, _label in choices])
    cls.label = lambda member: labels[member.value]
    cls.__doc__ = doc
    return cls


Similarity = _choiceEnum("Similarity", bridge.SIMILARITY_CHOICES,
                         "The similarity measure of the registration (register --similarity).")
Device = _choiceEnum("Device", bridge.DEVICE_CHOICES, "Where the computation runs (register --device).")
Initial = _choiceEnum("Initial", bridge.INITIAL_CHOICES,
                      "The global stage before the deformable one (register --initial).")


#
# DeepRegistration
#


class DeepRegistration(ScriptedLoadableModule):  # noqa: F405
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)  # noqa: F405
        self.parent.title = _("Deep Registration")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []  # PyTorchUtils (PyTorch extension) is used when present
        # No contributor names are recorded in the repository yet (see CMakeLists.txt).
        self.parent.contributors = []
        self.parent.helpText = _("""
Deformable registration of a moving volume onto a fixed volume with deep-learning and
instance-optimisation methods. Outputs: a displacement-field transform, the warped volume and
labels (segmentations keep their segment names and colours), a Jacobian determinant map with a
folded-voxel overlay and a table of quality measures (folding, SDlogJ, similarity, Dice). The QA
section shows a deformation grid, checkerboard and difference views and jumps to the worst
folding. Try it with the "DeepRegistration demo" in the Sample Data module.
See docs/slicer.md in the DeepRegistration repository.
""")
        self.parent.acknowledgementText = _("""
Built on the 3D Slicer scripted-module template by Jean-Christophe Fillion-Robin (Kitware),
Andras Lasso (PerkLab) and Steve Pieper (Isomics). The demo data is derived from the MNI ICBM152
2009a template (Fonov et al., NeuroImage 2011), as shipped by nilearn.
""")
        # Additional initialization step after application startup is complete
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Register sample data sets in Sample Data module
#


def sampleDataSourceArguments():
    """Keyword arguments of ``SampleDataLogic.registerCustomSampleDataSource`` for the demo pair.

    The files ship with the module (Resources/SampleData), so the "download" is a copy from a
    file:// URL into Slicer's cache; the checksums are those the files were made with.
    ``loadFileType`` (one type per file) is the keyword both Slicer 5.4 and later accept.
    """
    import pathlib

    return dict(
        category="DeepRegistration",
        sampleName=bridge.DEMO_SAMPLE_NAME,
        thumbnailFileName=os.path.join(SAMPLE_DATA_FOLDER, bridge.DEMO_SAMPLE_NAME + ".png"),
        uris=[pathlib.Path(os.path.join(SAMPLE_DATA_FOLDER, entry[0])).as_uri() for entry in bridge.DEMO_FILES],
        fileNames=[entry[0] for entry in bridge.DEMO_FILES],
        nodeNames=[entry[1] for entry in bridge.DEMO_FILES],
        loadFileType=[entry[2] for entry in bridge.DEMO_FILES],
        checksums=[entry[3] for entry in bridge.DEMO_FILES],
    )


def registerSampleData():
    """Add the demo pair (MNI152 template and a deformed copy, with grey / white matter
    segmentations) to the Sample Data module: "Load sample, Apply" is then a two-click demo."""
    import SampleData

    if hasattr(SampleData.SampleDataLogic, "registerCustomSampleDataCategory"):  # Slicer >= 5.6
        SampleData.SampleDataLogic.registerCustomSampleDataCategory("DeepRegistration", title=_("Deep Registration"))
    SampleData.SampleDataLogic.registerCustomSampleDataSource(**sampleDataSourceArguments())


#
# DeepRegistrationParameterNode
#


@parameterNodeWrapper
class DeepRegistrationParameterNode:
    """The module's state, saved with the scene.

    Fields bound to widgets carry the same name in the .ui file's ``SlicerParameterName``
    property. The output fields hold the node a run writes into; None means "create a new node",
    and after a run they hold its results. ``resultFixedVolume``, ``foldingVolume``,
    ``comparisonVolume``, ``method``, ``summaryJson`` and ``labelNamesJson`` are set by code.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedLabels: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    movingLabels: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    method: str = "io"
    # refinement steps on the half grid, then on the full grid (``--refine AxB``): a full-grid
    # step costs about eight half-grid ones, and the trade-off plot in the README shows which
    # splits pay (10 + 2 is the cheapest that sharpens a network's result)
    refineHalf: Annotated[int, WithinRange(0, 5000)] = 0
    refineFull: Annotated[int, WithinRange(0, 1000)] = 0
    similarity: Similarity = Similarity.lncc
    initial: Initial = Initial[bridge.DEFAULT_INITIAL]
    device: Device = Device.cpu
    overrideRegularization: bool = False
    regularization: Annotated[float, WithinRange(0.0, 10.0)] = 1.0
    keepOutputFolder: bool = False
    applyToMoving: bool = False
    hardenMoving: bool = False
    # outputs (None: create new nodes on Apply), then the results of the last registration
    outputTransform: vtkMRMLTransformNode
    warpedVolume: vtkMRMLScalarVolumeNode
    jacobianVolume: vtkMRMLScalarVolumeNode
    warpedLabels: Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]
    resultsTable: vtkMRMLTableNode
    resultFixedVolume: vtkMRMLScalarVolumeNode
    foldingVolume: vtkMRMLLabelMapVolumeNode
    comparisonVolume: vtkMRMLScalarVolumeNode
    summaryJson: str = ""
    labelNamesJson: str = ""
    # quality assurance display
    comparisonView: Annotated[str, Choice(list(COMPARISON_VIEWS))] = "Warped"
    showGrid: bool = False
    gridSpacing: Annotated[float, WithinRange(2.0, 50.0)] = 10.0
    showJacobian: bool = False
    jacobianOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showFolding: bool = False


#
# DeepRegistrationWidget
#


class DeepRegistrationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):  # noqa: F405
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)  # noqa: F405
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._updatingGui = False
        self._methodNames = []
        self._methodInfos = {}
        self._methodsJob = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)  # noqa: F405

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepRegistration.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        # The .ui connects the top-level qMRMLWidget's mrmlSceneChanged(vtkMRMLScene*) signal to
        # every node selector's setMRMLScene(vtkMRMLScene*) slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DeepRegistrationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.showLogButton.connect("toggled(bool)", self.onShowLogToggled)
        self.ui.methodComboBox.connect("currentIndexChanged(int)", self.onMethodChanged)
        self.ui.overrideRegularizationCheckBox.connect("toggled(bool)", self.onOverrideRegularizationToggled)
        self.ui.applyToMovingCheckBox.connect("toggled(bool)", self.onApplyToMovingToggled)
        self.ui.jumpToWorstFoldingButton.connect("clicked(bool)", self.onJumpToWorstFolding)
        self.ui.comparisonComboBox.connect("currentIndexChanged(int)", self.onComparisonChanged)
        self.ui.showGridCheckBox.connect("toggled(bool)", self.onGridChanged)
        self.ui.gridSpacingSliderWidget.connect("valueChanged(double)", self.onGridChanged)
        self.ui.showJacobianCheckBox.connect("toggled(bool)", self.onJacobianChanged)
        self.ui.jacobianOpacitySliderWidget.connect("valueChanged(double)", self.onJacobianChanged)
        self.ui.showFoldingCheckBox.connect("toggled(bool)", self.onJacobianChanged)

        self.ui.logTextEdit.setVisible(False)
        self.ui.progressBar.setVisible(False)
        self.ui.resultsTableWidget.setHorizontalHeaderLabels([_("Measure"), _("Value")])
        self.ui.regularizationSliderWidget.enabled = False
        self.ui.hardenMovingCheckBox.enabled = False

        # Until the method list arrives from the library, offer the method every install has.
        self._setMethods([{"name": "io", "title": _("Instance optimisation"),
                           "description": bridge.PLAIN_DESCRIPTIONS["io"]}])

        self.initializeParameterNode()
        self.refreshMethods()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed: stop a running
        registration at once, without spinning the event loop (the application is tearing down)."""
        if self.logic:
            self.logic.abort()
        if self._methodsJob:
            self._methodsJob.cancel()
            self._methodsJob = None
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        # The scene is being cleared: the run's nodes are going away, so stop it now and load
        # nothing (no event processing, no message box).
        if self.logic:
            self.logic.abort()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    # -- parameter node
    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.fixedVolume or not p.movingVolume:
            volumes = [node for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                       if node.GetClassName() == "vtkMRMLScalarVolumeNode"
                       and not node.GetAttribute(ROLE_ATTRIBUTE)]
            fixedIndex, movingIndex = bridge.pick_inputs([node.GetName() for node in volumes])
            if not p.fixedVolume and fixedIndex is not None:
                p.fixedVolume = volumes[fixedIndex]
            if not p.movingVolume and movingIndex is not None:
                p.movingVolume = volumes[movingIndex]
            # the demo pair comes with its segmentations: select them too
            labels = [node for node in slicer.util.getNodesByClass("vtkMRMLSegmentationNode")
                      if not node.GetAttribute(ROLE_ATTRIBUTE)]
            labelNames = [node.GetName() for node in labels]
            for volumeField, labelsField in (("fixedVolume", "fixedLabels"), ("movingVolume", "movingLabels")):
                volume = getattr(p, volumeField)
                if volume and not getattr(p, labelsField):
                    index = bridge.pick_labels(labelNames, volume.GetName())
                    if index is not None:
                        setattr(p, labelsField, labels[index])

    def setParameterNode(self, inputParameterNode: Optional[DeepRegistrationParameterNode]) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets with a "SlicerParameterName" dynamic property in the .ui are bound here.
            self._updatingGui = True
            try:
                self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            finally:
                self._updatingGui = False
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._selectMethod(self._parameterNode.method)
            self.ui.regularizationSliderWidget.enabled = self._parameterNode.overrideRegularization
            self.ui.hardenMovingCheckBox.enabled = self._parameterNode.applyToMoving
            self._updateResults()
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        p = self._parameterNode
        running = self.logic is not None and self.logic.isRunning()
        # e.g. a network with mutual information and no refinement steps, or MIND with no global
        # alignment either (the library's lists)
        similarityProblem = p and bridge.similarity_problem(self._methodInfos.get(p.method, {}),
                                                            p.similarity.value, p.refineHalf + p.refineFull,
                                                            p.initial.value)
        if running:
            self.ui.applyButton.enabled = False
            self.ui.applyButton.toolTip = _("A registration is running.")
        elif not p or not p.fixedVolume or not p.movingVolume:
            self.ui.applyButton.enabled = False
            self.ui.applyButton.toolTip = _("Select the fixed and the moving volume.")
        elif similarityProblem:
            self.ui.applyButton.enabled = False
            self.ui.applyButton.toolTip = similarityProblem
        else:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.toolTip = _("Register the moving volume onto the fixed volume.")
        self.ui.cancelButton.enabled = running
        self.ui.jumpToWorstFoldingButton.enabled = bool(p and p.summaryJson and bridge.worst_folding_ras(self._summary()))
        self.ui.qaCollapsibleButton.enabled = bool(p and p.warpedVolume and p.summaryJson)

    def _summary(self) -> dict:
        if not self._parameterNode or not self._parameterNode.summaryJson:
            return {}
        try:
            return json.loads(self._parameterNode.summaryJson)
        except ValueError:
            return {}

    # -- methods
    def refreshMethods(self) -> None:
        """Ask the library for its methods in the background (only if it can run)."""
        if self._methodsJob or bridge.missing_modules():
            return
        self._methodsJob = self.logic.queryMethods(self._onMethodsArrived)

    def _onMethodsArrived(self, methods, errorMessage) -> None:
        self._methodsJob = None
        if methods:
            self._setMethods(methods)
            if self._parameterNode:
                self._selectMethod(self._parameterNode.method)
            self._checkCanApply()  # the similarities each method accepts are known now
        elif errorMessage:
            logging.warning(f"DeepRegistration: could not list the methods: {errorMessage}")

    def _setMethods(self, methods) -> None:
        wasBlocked = self.ui.methodComboBox.blockSignals(True)
        try:
            self.ui.methodComboBox.clear()
            self._methodNames = []
            self._methodInfos = {}
            for info in methods:
                name = str(info["name"])
                text = bridge.method_short_name(info)
                if info.get("available") is False:
                    text += " " + _("(not installed)")
                self.ui.methodComboBox.addItem(text)
                self.ui.methodComboBox.setItemData(len(self._methodNames), bridge.method_tooltip(info), qt.Qt.ToolTipRole)
                self._methodNames.append(name)
                self._methodInfos[name] = info
        finally:
            self.ui.methodComboBox.blockSignals(wasBlocked)
        self._showMethodDescription()

    def _selectMethod(self, name) -> None:
        if name not in self._methodNames:
            self._setMethods(list(self._methodInfos.values()) + [{"name": name}])
        wasBlocked = self.ui.methodComboBox.blockSignals(True)
        self.ui.methodComboBox.currentIndex = self._methodNames.index(name)
        self.ui.methodComboBox.blockSignals(wasBlocked)
        self._showMethodDescription()

    def _showMethodDescription(self) -> None:
        index = self.ui.methodComboBox.currentIndex
        if 0 <= index < len(self._methodNames):
            info = self._methodInfos.get(self._methodNames[index], {})
            self.ui.methodDescriptionLabel.text = bridge.method_description_html(info)
            self.ui.methodComboBox.toolTip = bridge.method_tooltip(info)
        else:
            self.ui.methodDescriptionLabel.text = ""

    def onMethodChanged(self, index) -> None:
        if 0 <= index < len(self._methodNames) and self._parameterNode:
            self._parameterNode.method = self._methodNames[index]
        self._showMethodDescription()

    def onOverrideRegularizationToggled(self, checked) -> None:
        self.ui.regularizationSliderWidget.enabled = checked

    def onApplyToMovingToggled(self, checked) -> None:
        self.ui.hardenMovingCheckBox.enabled = checked

    # -- run
    def _outputNodesToUse(self):
        """The output nodes of the next run, or None when the user cancels.

        A selector that holds a node (the user's choice, or the previous run's result) is written
        into; that replaces its content, so the user is asked first and may keep the earlier
        results by creating new nodes instead."""
        p = self._parameterNode
        outputs = {"transform": p.outputTransform, "warped": p.warpedVolume, "jacobian": p.jacobianVolume,
                   "warpedLabels": p.warpedLabels, "table": p.resultsTable}
        existing = [node.GetName() for node in outputs.values() if node is not None]
        if not existing or slicer.app.testingEnabled():
            return outputs
        box = qt.QMessageBox(qt.QMessageBox.Question, _("Replace the results?"),
                             _("The result will be written into these existing nodes, replacing their "
                               "content:\n\n{names}\n\nReplace them, or keep them and create new nodes?").format(
                                 names="\n".join(existing)),
                             qt.QMessageBox.Yes | qt.QMessageBox.No | qt.QMessageBox.Cancel)
        box.button(qt.QMessageBox.Yes).text = _("Replace")
        box.button(qt.QMessageBox.No).text = _("Create new")
        box.setDefaultButton(qt.QMessageBox.No)
        answer = box.exec_()
        if answer == qt.QMessageBox.Cancel:
            return None
        if answer == qt.QMessageBox.No:
            return {role: None for role in outputs}
        return outputs

    def onApplyButton(self) -> None:
        if self.logic.isRunning():
            return
        p = self._parameterNode
        outputNodes = self._outputNodesToUse()  # may ask the user: before the wait cursor
        if outputNodes is None:
            self.ui.statusLabel.text = _("Not started.")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the registration."), waitCursor=True):
            if not self.logic.ensureDependencies(askConfirmation=True):
                self.ui.statusLabel.text = _("Not started: the required Python packages are not installed.")
                return
            self.ui.logTextEdit.clear()
            self.ui.progressBar.value = 0
            self.ui.progressBar.setVisible(True)
            self.ui.statusLabel.text = _("Writing the inputs...")
            try:
                self.logic.startRegistration(
                    p.fixedVolume, p.movingVolume,
                    method=p.method, refine=(p.refineHalf, p.refineFull), similarity=p.similarity.value, device=p.device.value,
                    initial=p.initial.value,
                    regularization=p.regularization if p.overrideRegularization else None,
                    fixedLabels=p.fixedLabels, movingLabels=p.movingLabels,
                    keepOutputFolder=p.keepOutputFolder, outputNodes=outputNodes,
                    applyToMoving=p.applyToMoving, hardenMoving=p.hardenMoving,
                    progressCallback=self._onProgress, logCallback=self._onLog,
                    completedCallback=self._onCompleted)
            except Exception as error:
                self.ui.progressBar.setVisible(False)
                self.ui.statusLabel.text = _("Not started: {message}").format(message=error)
                raise
            self.ui.statusLabel.text = _("Running...")
            self._checkCanApply()

    def onCancelButton(self) -> None:
        self.ui.statusLabel.text = _("Cancelling...")
        self.logic.cancel()

    def _onProgress(self, fraction, stage, message) -> None:
        self.ui.progressBar.value = int(round(100 * fraction))
        self.ui.statusLabel.text = stage + (f": {message}" if message else "")

    def _onLog(self, line) -> None:
        self.ui.logTextEdit.appendPlainText(line)

    def _onCompleted(self, result) -> None:
        self.ui.progressBar.setVisible(False)
        status = result["status"]
        p = self._parameterNode
        if status == "success":
            if p:
                nodes = result["nodes"]
                with slicer.util.NodeModify(p):
                    # the previous run's comparison image belongs to results that are gone
                    self.logic.removeComparisonVolume(p)
                    p.outputTransform = nodes["transform"]
                    p.warpedVolume = nodes["warped"]
                    p.jacobianVolume = nodes["jacobian"]
                    p.warpedLabels = nodes.get("warpedLabels")
                    p.resultsTable = nodes["table"]
                    p.foldingVolume = nodes["folding"]
                    p.resultFixedVolume = result["fixedVolume"]
                    p.summaryJson = json.dumps(result["summary"])
                    p.labelNamesJson = json.dumps(result.get("labelNames") or {})
                self._updateResults()
                self.updateQADisplay(fit=True)
            if len(self._methodInfos) <= 1:
                self.refreshMethods()  # the packages may have been installed at Apply
            self.ui.statusLabel.text = _("Done.")
        elif status == "cancelled":
            self.ui.statusLabel.text = _("Cancelled.")
        else:
            self.ui.statusLabel.text = _("Failed: {message}").format(message=result["message"])
            slicer.util.errorDisplay(
                _("Registration failed: {message}").format(message=result["message"]),
                detailedText=result.get("log", ""))
        self._checkCanApply()

    def onShowLogToggled(self, checked) -> None:
        self.ui.logTextEdit.setVisible(checked)
        self.ui.showLogButton.text = _("Hide log") if checked else _("Show log")

    # -- results
    def _labelNames(self) -> dict:
        if not self._parameterNode or not self._parameterNode.labelNamesJson:
            return {}
        try:
            return json.loads(self._parameterNode.labelNamesJson)
        except ValueError:
            return {}

    def _updateResults(self) -> None:
        """The key figures at the top of the results and the full table below them."""
        summary = self._summary()
        self.ui.keyFiguresLabel.text = bridge.key_figures_html(summary) if summary else ""
        self.ui.keyFiguresLabel.setVisible(bool(summary))
        rows = bridge.results_table_rows(summary, self._labelNames()) if summary else []
        table = self.ui.resultsTableWidget
        table.setRowCount(len(rows))
        for row, (name, value) in enumerate(rows):
            nameItem = qt.QTableWidgetItem(name)
            nameItem.setToolTip(name)
            valueItem = qt.QTableWidgetItem(value)
            valueItem.setToolTip(value)
            table.setItem(row, 0, nameItem)
            table.setItem(row, 1, valueItem)
        table.resizeColumnToContents(0)

    # -- quality assurance
    def _qaSettings(self) -> dict:
        """QA settings read from the widgets: a widget's signal can reach this class before the
        parameter node was updated from it."""
        index = self.ui.comparisonComboBox.currentIndex
        return {
            "comparisonView": COMPARISON_VIEWS[index] if 0 <= index < len(COMPARISON_VIEWS) else "Warped",
            "showGrid": self.ui.showGridCheckBox.checked,
            "gridSpacing": self.ui.gridSpacingSliderWidget.value,
            "showJacobian": self.ui.showJacobianCheckBox.checked,
            "jacobianOpacity": self.ui.jacobianOpacitySliderWidget.value,
            "showFolding": self.ui.showFoldingCheckBox.checked,
        }

    def updateQADisplay(self, fit=False) -> None:
        if self._updatingGui or not self._parameterNode or not self._parameterNode.warpedVolume:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to update the QA display.")):
            self.logic.showQA(self._parameterNode, fit=fit, **self._qaSettings())

    def onComparisonChanged(self, index=None) -> None:
        self.updateQADisplay()

    def onGridChanged(self, value=None) -> None:
        if self._updatingGui or not self._parameterNode or not self._parameterNode.outputTransform:
            return
        settings = self._qaSettings()
        p = self._parameterNode
        self.logic.showGrid(p.outputTransform, p.resultFixedVolume or p.fixedVolume,
                            settings["showGrid"], settings["gridSpacing"])

    def onJacobianChanged(self, value=None) -> None:
        self.updateQADisplay()

    def onJumpToWorstFolding(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to jump to the worst folding.")):
            self.logic.jumpToWorstFolding(self._summary())


#
# DeepRegistrationLogic
#


class DeepRegistrationLogic(ScriptedLoadableModuleLogic):  # noqa: F405
    """Everything that does not need the module's widget: export of the inputs, the subprocess,
    loading of the outputs and the QA display. Usable from the Python console, e.g.::

        logic = slicer.util.getModuleLogic("DeepRegistration")
        result = logic.run(fixedNode, movingNode, method="io")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)  # noqa: F405
        self._job = None

    def getParameterNode(self):
        return DeepRegistrationParameterNode(super().getParameterNode())

    # -- dependencies (checked at Apply time, never at import or module start)
    @staticmethod
    def missingPackages():
        return bridge.missing_modules()

    def ensureDependencies(self, askConfirmation=True) -> bool:
        """Install missing Python packages after the user agreed; False if the user declined."""
        missing = self.missingPackages()
        if not missing:
            return True
        requirements = [bridge.REQUIRED_MODULES[name] for name in missing]
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _("DeepRegistration needs Python packages that are not installed: {packages}.\n\n"
                  "Install them now? This needs a network connection and may take several minutes "
                  "(PyTorch is large).").format(packages=", ".join(missing)),
                _("Install Python packages"),
                detailedText=_("Requirements: {requirements}").format(requirements=" ".join(requirements))):
            return False
        self.installPackages(missing)
        import importlib
        importlib.invalidate_caches()
        stillMissing = self.missingPackages()
        if stillMissing:
            raise RuntimeError(_("These Python packages could not be installed: {packages}").format(
                packages=", ".join(stillMissing)))
        return True

    @staticmethod
    def installPackages(missing) -> None:
        missing = list(missing)
        if "torch" in missing:
            missing.remove("torch")
            try:
                import PyTorchUtils  # from the PyTorch extension (SlicerPyTorch)
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                # light-the-torch picks the build that matches the installed GPU driver
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=">=2.0")
                if torch is None:
                    raise RuntimeError(_("PyTorch was not installed."))
            else:
                slicer.util.pip_install([bridge.REQUIRED_MODULES["torch"]])
        if missing:
            slicer.util.pip_install([bridge.REQUIRED_MODULES[name] for name in missing])

    # -- running
    def isRunning(self) -> bool:
        return self._job is not None and not self._job.finished

    @staticmethod
    def _checkRunNodes(fixedVolume, movingVolume, fixedLabels, movingLabels, outputNodes) -> None:
        """Refuse, before anything is written, outputs that would destroy an input or a result
        the inputs depend on."""
        inputs = [node for node in (fixedVolume, movingVolume, fixedLabels, movingLabels) if node]
        for role, node in outputNodes.items():
            if node is not None and any(node is other for other in inputs):
                raise ValueError(_("The output '{name}' is also an input; choose another output node "
                                   "or 'Create new'.").format(name=node.GetName()))
        transform = outputNodes.get("transform")
        if transform is not None:
            for node in inputs:
                parent = node.GetParentTransformNode()
                while parent is not None:
                    if parent is transform:
                        raise ValueError(_("'{name}' is under the output transform '{transform}', which the "
                                           "registration would replace; remove that transform from it "
                                           "(Transforms module) or choose 'Create new' as output transform.").format(
                                               name=node.GetName(), transform=transform.GetName()))
                    parent = parent.GetParentTransformNode()

    def startRegistration(self, fixedVolume, movingVolume, method="io", refine=0, similarity=None,
                          device=None, regularization=None, fixedLabels=None, movingLabels=None,
                          keepOutputFolder=False, progressCallback=None, logCallback=None,
                          completedCallback=None, initial=None, outputNodes=None,
                          applyToMoving=False, hardenMoving=False):
        """Start a registration in the background and return its job.

        ``refine`` is a total number of refinement steps or a (half grid, full grid) pair.
        ``outputNodes`` maps roles (transform, warped, jacobian, warpedLabels, table) to existing
        nodes to write into; a missing or None entry creates a new node. ``applyToMoving`` puts the
        moving volume under the result transform when the run succeeds, ``hardenMoving`` then
        hardens it (this changes the moving volume: only on the user's explicit request).

        ``completedCallback(result)`` receives a dict: ``status`` ("success", "cancelled" or
        "failed"), ``message``, ``log``, ``outputFolder``, ``fixedVolume``, and on success
        ``summary``, ``nodes`` (transform, warped, jacobian, folding, warpedLabels, table) and
        ``labelNames``.
        """
        if self.isRunning():
            raise RuntimeError(_("A registration is already running."))
        if not fixedVolume or not movingVolume:
            raise ValueError(_("Select the fixed and the moving volume."))
        outputNodes = {role: (outputNodes or {}).get(role) for role in OUTPUT_ROLES}
        self._checkRunNodes(fixedVolume, movingVolume, fixedLabels, movingLabels, outputNodes)
        if fixedLabels and not movingLabels:
            # the command line refuses fixed labels alone (there is nothing to compare them with)
            logging.info("DeepRegistration: fixed labels are used for Dice only together with moving "
                         "labels; without moving labels they are left out.")
            fixedLabels = None
        workFolder = tempfile.mkdtemp(prefix="DeepRegistration-", dir=slicer.app.temporaryPath)
        try:
            inputFolder = os.path.join(workFolder, "inputs")
            outputFolder = os.path.join(workFolder, "outputs")
            os.makedirs(inputFolder)
            fixedPath = os.path.join(inputFolder, "fixed.nii.gz")
            movingPath = os.path.join(inputFolder, "moving.nii.gz")
            self.exportVolume(fixedVolume, fixedPath)
            self.exportVolume(movingVolume, movingPath)
            labelNames = {}
            fixedLabelsPath = movingLabelsPath = None
            segmentValues = self._segmentValues(fixedLabels, movingLabels)
            if fixedLabels:
                fixedLabelsPath = os.path.join(inputFolder, "fixed_labels.nii.gz")
                labelNames.update(self.exportLabels(fixedLabels, fixedVolume, fixedLabelsPath, segmentValues,
                                                    referencePath=fixedPath))
            if movingLabels:
                movingLabelsPath = os.path.join(inputFolder, "moving_labels.nii.gz")
                labelNames.update(self.exportLabels(movingLabels, movingVolume, movingLabelsPath, segmentValues,
                                                    referencePath=movingPath))
            command = bridge.build_register_command(
                bridge.python_executable(), fixedPath, movingPath, outputFolder, method, refine,
                similarity=similarity, device=device, regularization=regularization,
                fixed_labels=fixedLabelsPath, moving_labels=movingLabelsPath, initial=initial,
                # qa.png is only worth drawing when the folder is kept (Slicer shows the QA views)
                figure=bool(keepOutputFolder) and not bridge.missing_modules(["matplotlib"]))
            process = bridge.RegistrationProcess(command, env=self._environment())
            logging.info("DeepRegistration: " + " ".join(command))
            process.start()
        except Exception:
            shutil.rmtree(workFolder, ignore_errors=True)
            raise
        context = {"fixedVolume": fixedVolume, "movingVolume": movingVolume, "movingLabels": movingLabels,
                   "method": method, "labelNames": labelNames, "segmentValues": segmentValues,
                   "workFolder": workFolder, "outputFolder": outputFolder,
                   "keepOutputFolder": keepOutputFolder, "outputNodes": outputNodes,
                   "applyToMoving": applyToMoving, "hardenMoving": hardenMoving}
        self._job = _RegistrationJob(self, process, context, progressCallback, logCallback, completedCallback)
        return self._job

    def run(self, fixedVolume, movingVolume, timeoutSeconds=3600, **kwargs):
        """Register and wait for the result (keeps the application responsive); returns the
        result dict of :meth:`startRegistration`. A run still going after ``timeoutSeconds`` is
        stopped and reported as failed (timed out), not as cancelled."""
        results = []
        userCallback = kwargs.pop("completedCallback", None)

        def completed(result):
            results.append(result)
            if userCallback:
                userCallback(result)

        job = self.startRegistration(fixedVolume, movingVolume, completedCallback=completed, **kwargs)
        job.waitForCompletion(timeoutSeconds)
        return results[0]

    def cancel(self, wait=False) -> None:
        """Ask the running registration to stop (from the Cancel button); ``wait`` keeps the
        application responsive until it has stopped."""
        if self._job is not None and not self._job.finished:
            self._job.cancel()
            if wait:
                self._job.waitForCompletion(30)

    def abort(self) -> None:
        """Stop a running registration now, without processing events and without loading
        anything: for scene close and application exit."""
        if self._job is not None and not self._job.finished:
            self._job.abort()

    @staticmethod
    def _environment():
        """The environment Slicer was started with (what ``slicer.util.launchConsoleProcess``
        uses: PythonSlicer sets up Slicer's paths itself), with the folder holding
        DeepRegistrationLib first on PYTHONPATH so a module loaded from a source checkout works."""
        try:
            base = slicer.util.startupEnvironment()
        except Exception:
            base = dict(os.environ)
        return bridge.subprocess_environment(base, bridge.library_root())

    def queryMethods(self, callback, timeoutSeconds=120):
        """Run ``methods --json`` in the background; ``callback(methods or None, error or None)``."""
        process = bridge.RegistrationProcess(bridge.build_methods_command(bridge.python_executable()),
                                             env=self._environment())
        process.start()
        return _MethodsJob(process, callback, timeoutSeconds)

    # -- inputs
    @staticmethod
    def _addTemporaryNode(className):
        node = slicer.mrmlScene.AddNewNodeByClass(className, TEMPORARY_NODE_NAME)
        node.SetHideFromEditors(True)
        return node

    @staticmethod
    def _removeNode(node) -> None:
        """Remove a node with the display and storage nodes it alone uses."""
        if node is None or node.GetScene() is None:
            return
        scene = node.GetScene()
        helpers = []
        if node.IsA("vtkMRMLDisplayableNode"):
            helpers += [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]
        if node.IsA("vtkMRMLStorableNode"):
            helpers += [node.GetNthStorageNode(i) for i in range(node.GetNumberOfStorageNodes())]
        scene.RemoveNode(node)
        for helper in helpers:
            if helper is not None and helper.GetScene() is not None:
                scene.RemoveNode(helper)

    def exportVolume(self, volumeNode, path, imageData=None) -> None:
        """Write a volume in world coordinates (parent transforms hardened) without touching the
        node or its storage node.

        A temporary copy of the node is hardened and written by a storage node made for it, which
        is what Slicer's "export" does. ``imageData`` replaces the node's voxels in the copy
        (used to write label maps made here on a volume's grid)."""
        copy = self._addTemporaryNode(volumeNode.GetClassName())
        try:
            copy.CopyOrientation(volumeNode)
            parent = volumeNode.GetParentTransformNode()
            voxels = imageData if imageData is not None else volumeNode.GetImageData()
            if parent is not None and not parent.IsTransformToWorldLinear():
                # hardening a non-linear transform resamples the voxels: give it its own copy
                own = vtk.vtkImageData()
                own.DeepCopy(voxels)
                voxels = own
            copy.SetAndObserveImageData(voxels)
            if parent is not None:
                copy.SetAndObserveTransformNodeID(parent.GetID())
                if not slicer.vtkSlicerTransformLogic.hardenTransform(copy):
                    raise RuntimeError(_("Could not apply the transform '{transform}' to {name}.").format(
                        transform=parent.GetName(), name=volumeNode.GetName()))
            writer = copy.CreateDefaultStorageNode()
            writer.SetFileName(path)
            writer.SetUseCompression(1)
            if not writer.WriteData(copy):
                raise RuntimeError(_("Could not write {name} to {path}: {details}").format(
                    name=volumeNode.GetName(), path=path, details=writer.GetUserMessages().GetAllMessagesAsString()))
        finally:
            self._removeNode(copy)

    @staticmethod
    def _segmentNames(node):
        if not node or not node.IsA("vtkMRMLSegmentationNode"):
            return []
        segmentation = node.GetSegmentation()
        return [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())]

    def _segmentValues(self, fixedLabels, movingLabels):
        """Label value of each segment name, shared by both segmentations (Dice compares equal names)."""
        return bridge.segment_label_values(self._segmentNames(fixedLabels), self._segmentNames(movingLabels))

    def exportLabels(self, labelsNode, referenceVolume, path, segmentValues=None, referencePath=None) -> dict:
        """Write a label map on ``referenceVolume``'s grid (in world coordinates); return
        {label value: name}. ``referencePath`` is the file the reference volume was exported to
        (needed when a label map volume is on another grid and must be resampled)."""
        import numpy as np

        if labelsNode.IsA("vtkMRMLSegmentationNode"):
            segmentation = labelsNode.GetSegmentation()
            values = segmentValues or bridge.segment_label_values(self._segmentNames(labelsNode))
            labels = None
            names = {}
            for i in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(i)
                name = segmentation.GetNthSegment(i).GetName()
                mask = slicer.util.arrayFromSegmentBinaryLabelmap(labelsNode, segmentId, referenceVolume)
                if labels is None:
                    labels = np.zeros(mask.shape, dtype=np.int16)
                labels[mask > 0] = values[name]
                names[str(values[name])] = name
            if labels is None:
                raise ValueError(_("The segmentation {name} has no segments.").format(name=labelsNode.GetName()))
            grid = self._addTemporaryNode("vtkMRMLLabelMapVolumeNode")
            try:
                grid.CopyOrientation(referenceVolume)
                slicer.util.updateVolumeFromArray(grid, labels)
                grid.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())
                self.exportVolume(grid, path)
            finally:
                self._removeNode(grid)
            return names

        # a label map volume: written in world coordinates, resampled onto the volume's grid when
        # it is on another one (nearest neighbour, in the library)
        sameGrid = bridge.same_geometry(
            labelsNode.GetImageData().GetDimensions(), self._ijkToRas(labelsNode),
            referenceVolume.GetImageData().GetDimensions(), self._ijkToRas(referenceVolume)) \
            and labelsNode.GetTransformNodeID() == referenceVolume.GetTransformNodeID()
        if sameGrid:
            self.exportVolume(labelsNode, path)
        else:
            if referencePath is None:
                raise ValueError(_("The label map {labels} is not on the grid of {volume}.").format(
                    labels=labelsNode.GetName(), volume=referenceVolume.GetName()))
            nativePath = path.replace(".nii.gz", "_native.nii.gz")
            self.exportVolume(labelsNode, nativePath)
            bridge.resample_labels_onto(nativePath, referencePath, path)
        names = {}
        colorNode = labelsNode.GetDisplayNode().GetColorNode() if labelsNode.GetDisplayNode() else None
        for value in np.unique(slicer.util.arrayFromVolume(labelsNode)):
            if value == 0:
                continue
            name = colorNode.GetColorName(int(value)) if colorNode and 0 <= value < colorNode.GetNumberOfColors() else None
            names[str(int(value))] = name if name and name != "(none)" else f"label {int(value)}"
        return names

    @staticmethod
    def _ijkToRas(volumeNode):
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        return bridge.numpy_from_vtk_matrix(matrix)

    # -- outputs
    @staticmethod
    def _readInto(storageNode, path, node, what) -> None:
        """Read ``path`` into ``node`` with a storage node of Slicer's own (the reader Slicer uses
        when it loads such a file); the storage node is not attached to the node."""
        storageNode.SetFileName(path)
        # ReadData attaches the reader to the node as its storage node: put the node's own back
        # (who owns the node's storage is decided in _keepOrDropStorage)
        previousStorageNodeID = node.GetStorageNodeID()
        success = storageNode.ReadData(node)
        node.SetAndObserveStorageNodeID(previousStorageNodeID)
        if not success:
            raise RuntimeError(_("Could not read the {what} from {path}: {details}").format(
                what=what, path=path, details=storageNode.GetUserMessages().GetAllMessagesAsString()))
        messages = storageNode.GetUserMessages()
        if messages.GetNumberOfMessages():
            logging.warning(f"DeepRegistration: reading {path}: {messages.GetAllMessagesAsString()}")

    def _outputNode(self, existing, className, name, role, created):
        """The node a result goes into: ``existing`` (the user's choice), or a new node."""
        if existing is not None:
            return existing
        node = slicer.mrmlScene.AddNewNodeByClass(className, slicer.mrmlScene.GenerateUniqueName(name))
        node.SetAttribute(ROLE_ATTRIBUTE, role)
        created.append(node)
        return node

    def _keepOrDropStorage(self, node, path, keepFiles) -> None:
        """After a node's data was read from ``path``: with kept files, a node this module made
        points its storage node at the file; otherwise no storage node of this module remains (the
        files are deleted, and Save then asks where to write). A node the user chose keeps the
        storage node it had, marked as modified, so nothing of the user's is re-pointed."""
        if node.GetAttribute(ROLE_ATTRIBUTE):
            oldStorage = node.GetStorageNode()
            if keepFiles:
                storage = node.CreateDefaultStorageNode()
                if storage is not None:
                    slicer.mrmlScene.AddNode(storage)
                    storage.SetFileName(path)
                    node.SetAndObserveStorageNodeID(storage.GetID())
            else:
                node.SetAndObserveStorageNodeID(None)
            if oldStorage is not None and oldStorage is not node.GetStorageNode():
                slicer.mrmlScene.RemoveNode(oldStorage)
        node.StorableModified()

    def loadResults(self, outputFolder, summary, context) -> dict:
        """Read the files of ``outputFolder`` into the output nodes (new ones named after the
        moving volume, or those the user chose) and set their display. On failure the nodes made
        here are removed again."""
        files = dict(summary.get("outputs") or {})

        def path(key, default):
            return os.path.join(outputFolder, files.get(key, default))

        fixedVolume, movingVolume = context["fixedVolume"], context["movingVolume"]
        movingLabels, method = context.get("movingLabels"), context.get("method") or ""
        outputs = context.get("outputNodes") or {}
        keepFiles = bool(context.get("keepOutputFolder"))
        baseName = f"{movingVolume.GetName()} to {fixedVolume.GetName()}"
        created = []
        nodes = {}
        try:
            transform = self._outputNode(outputs.get("transform"), "vtkMRMLTransformNode",
                                         f"{baseName} ({method})" if method else baseName, "transform", created)
            displacementPath = path("displacement", "displacement.nii.gz")
            self._readInto(slicer.vtkMRMLTransformStorageNode(), displacementPath, transform, _("displacement field"))
            self._keepOrDropStorage(transform, displacementPath, keepFiles)
            nodes["transform"] = transform

            warped = self._outputNode(outputs.get("warped"), "vtkMRMLScalarVolumeNode",
                                      f"{movingVolume.GetName()} warped", "warped", created)
            warpedPath = path("warped", "warped.nii.gz")
            self._readVolume(warpedPath, warped, _("warped volume"))
            self._keepOrDropStorage(warped, warpedPath, keepFiles)
            self._displayLike(warped, movingVolume)
            nodes["warped"] = warped

            jacobian = self._outputNode(outputs.get("jacobian"), "vtkMRMLScalarVolumeNode",
                                        f"{baseName} Jacobian", "jacobian", created)
            jacobianPath = path("jacobian", "jacobian.nii.gz")
            self._readVolume(jacobianPath, jacobian, _("Jacobian map"))
            self._keepOrDropStorage(jacobian, jacobianPath, keepFiles)
            self.setDivergingDisplay(jacobian, center=1.0, maximumHalfWidth=1.0)
            self._addJacobianLegend(jacobian)
            nodes["jacobian"] = jacobian

            nodes["folding"] = self._loadFolding(path("folding", "folding.nii.gz"), jacobian, baseName,
                                                 keepFiles, created)

            labelsPath = path("warped_labels", "warped_labels.nii.gz")
            if os.path.isfile(labelsPath):
                nodes["warpedLabels"] = self._loadWarpedLabels(labelsPath, outputs.get("warpedLabels"),
                                                               movingLabels, context, keepFiles, created)

            table = self._outputNode(outputs.get("table"), "vtkMRMLTableNode", f"{baseName} measures",
                                     "table", created)
            self.fillResultsTable(table, summary, context.get("labelNames"))
            nodes["table"] = table
        except Exception:
            for node in created:
                self._removeNode(node)
            raise

        if context.get("applyToMoving"):
            self.applyTransform(movingVolume, transform, harden=bool(context.get("hardenMoving")))
        return nodes

    def _readVolume(self, path, node, what) -> None:
        reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
        reader.SetSingleFile(1)  # the file alone, not a numbered series of its neighbours
        self._readInto(reader, path, node, what)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()

    @staticmethod
    def _displayLike(node, reference) -> None:
        """Show ``node`` with the colours and window/level of ``reference``."""
        referenceDisplay = reference.GetDisplayNode()
        display = node.GetDisplayNode()
        if referenceDisplay is None or display is None:
            return
        display.SetAndObserveColorNodeID(referenceDisplay.GetColorNodeID())
        display.SetAutoWindowLevel(referenceDisplay.GetAutoWindowLevel())
        if not referenceDisplay.GetAutoWindowLevel():
            display.SetWindowLevel(referenceDisplay.GetWindow(), referenceDisplay.GetLevel())

    def _addJacobianLegend(self, jacobian) -> None:
        """A colour legend for the Jacobian map (shown with the overlay)."""
        legend = slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(jacobian)
        if legend is None:
            legend = slicer.vtkSlicerColorLogic.AddDefaultColorLegendDisplayNode(jacobian)
        if legend is None:
            return
        legend.SetTitleText(_("Jacobian determinant"))
        legend.SetLabelFormat("%.2f")
        legend.SetVisibility(False)

    @staticmethod
    def jacobianLegend(jacobian):
        return slicer.vtkSlicerColorLogic.GetColorLegendDisplayNode(jacobian) if jacobian else None

    def foldingColorNodeID(self) -> str:
        """A two-entry table: 0 transparent, 1 the folding colour (one node, reused)."""
        for node in slicer.util.getNodesByClass("vtkMRMLColorTableNode"):
            if node.GetAttribute(ROLE_ATTRIBUTE) == "foldingColors":
                return node.GetID()
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", "DeepRegistration folding")
        node.SetAttribute(ROLE_ATTRIBUTE, "foldingColors")
        node.SetAttribute("Category", "DeepRegistration")
        node.SetTypeToUser()
        node.SetNumberOfColors(2)
        node.SetColor(0, "not folded", 0.0, 0.0, 0.0, 0.0)
        node.SetColor(1, "folded voxel", *FOLDING_COLOR, 1.0)
        return node.GetID()

    def _loadFolding(self, foldingPath, jacobian, baseName, keepFiles, created):
        """The folded-voxel mask as a label map: folding.nii.gz (strict folding) when the command
        line wrote it, else det J <= 0 of the Jacobian map (older outputs). One mask per
        Jacobian node, reused with it."""
        folding = jacobian.GetNodeReference(FOLDING_REFERENCE_ROLE)
        if folding is None:
            folding = self._outputNode(None, "vtkMRMLLabelMapVolumeNode", f"{baseName} folded voxels",
                                       "folding", created)
            jacobian.SetNodeReferenceID(FOLDING_REFERENCE_ROLE, folding.GetID())
        if os.path.isfile(foldingPath):
            self._readVolume(foldingPath, folding, _("folded-voxel mask"))
            folding.SetAttribute("DeepRegistration.FoldingMeasure", "strict")
            self._keepOrDropStorage(folding, foldingPath, keepFiles)
        else:
            folding.CopyOrientation(jacobian)
            slicer.util.updateVolumeFromArray(
                folding, bridge.folding_mask_from_jacobian(slicer.util.arrayFromVolume(jacobian)))
            folding.SetAttribute("DeepRegistration.FoldingMeasure", "central")
            folding.SetAndObserveStorageNodeID(None)
            folding.StorableModified()
        if folding.GetDisplayNode() is None:
            folding.CreateDefaultDisplayNodes()
        folding.GetDisplayNode().SetAndObserveColorNodeID(self.foldingColorNodeID())
        return folding

    def _loadWarpedLabels(self, labelsPath, existing, movingLabels, context, keepFiles, created):
        """The warped labels as the kind of node the user gave (or chose as output): a
        segmentation keeps the original segment names and colours, a label map gets a colour
        table (the moving label map's own, or one made from the segments)."""
        wantSegmentation = existing.IsA("vtkMRMLSegmentationNode") if existing is not None else \
            bool(movingLabels is not None and movingLabels.IsA("vtkMRMLSegmentationNode"))
        baseName = movingLabels.GetName() if movingLabels is not None else context["movingVolume"].GetName() + " labels"
        entries = self._labelEntries(movingLabels, context)
        if wantSegmentation:
            node = self._outputNode(existing, "vtkMRMLSegmentationNode", f"{baseName} warped", "warpedLabels", created)
            self._importLabelsIntoSegmentation(labelsPath, node, entries, context["fixedVolume"])
            node.StorableModified()  # made here, never read from a file: Save asks where to write
            return node
        node = self._outputNode(existing, "vtkMRMLLabelMapVolumeNode", f"{baseName} warped", "warpedLabels", created)
        self._readVolume(labelsPath, node, _("warped labels"))
        self._keepOrDropStorage(node, labelsPath, keepFiles)
        if movingLabels is not None and movingLabels.IsA("vtkMRMLLabelMapVolumeNode") and movingLabels.GetDisplayNode():
            colorNodeID = movingLabels.GetDisplayNode().GetColorNodeID()
        else:
            colorNodeID = self._labelColorTable(entries, f"{node.GetName()} colours", node).GetID()
        if colorNodeID:
            node.GetDisplayNode().SetAndObserveColorNodeID(colorNodeID)
        return node

    def _labelEntries(self, movingLabels, context):
        """{label value: (name, (r, g, b))} of the moving labels as they were exported."""
        entries = {}
        if movingLabels is not None and movingLabels.IsA("vtkMRMLSegmentationNode"):
            values = context.get("segmentValues") or {}
            segmentation = movingLabels.GetSegmentation()
            for i in range(segmentation.GetNumberOfSegments()):
                segment = segmentation.GetNthSegment(i)
                if segment.GetName() in values:
                    entries[int(values[segment.GetName()])] = (segment.GetName(), tuple(segment.GetColor()))
        elif movingLabels is not None:
            colorNode = movingLabels.GetDisplayNode().GetColorNode() if movingLabels.GetDisplayNode() else None
            for value, name in (context.get("labelNames") or {}).items():
                color = [0.5, 0.5, 0.5, 1.0]
                if colorNode is not None and int(value) < colorNode.GetNumberOfColors():
                    colorNode.GetColor(int(value), color)
                entries[int(value)] = (name, tuple(color[:3]))
        return entries

    def _labelColorTable(self, entries, name, owner=None):
        """A colour table with the given entries (reused when ``owner`` already has one of ours)."""
        table = None
        if owner is not None and owner.GetDisplayNode() is not None:
            current = owner.GetDisplayNode().GetColorNode()
            if current is not None and current.GetAttribute(ROLE_ATTRIBUTE) == "labelColors":
                table = current
        if table is None:
            table = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLColorTableNode", slicer.mrmlScene.GenerateUniqueName(name))
            table.SetAttribute(ROLE_ATTRIBUTE, "labelColors")
            table.SetAttribute("Category", "DeepRegistration")
            table.SetTypeToUser()
        size = max(list(entries) + [1]) + 1
        table.SetNumberOfColors(size)
        table.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for value in range(1, size):
            label, color = entries.get(value, (f"label {value}", (0.5, 0.5, 0.5)))
            table.SetColor(value, label, color[0], color[1], color[2], 1.0)
        return table

    def _importLabelsIntoSegmentation(self, labelsPath, segmentationNode, entries, fixedVolume) -> None:
        """Replace the segments of ``segmentationNode`` with the labels of ``labelsPath``, named
        and coloured as the moving segments were."""
        labelmap = self._addTemporaryNode("vtkMRMLLabelMapVolumeNode")
        colors = None
        try:
            self._readVolume(labelsPath, labelmap, _("warped labels"))
            colors = self._labelColorTable(entries, TEMPORARY_NODE_NAME)
            colors.SetHideFromEditors(True)
            labelmap.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
            segmentation = segmentationNode.GetSegmentation()
            with slicer.util.NodeModify(segmentationNode):
                segmentation.RemoveAllSegments()
                if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentationNode):
                    raise RuntimeError(_("Could not turn the warped labels into segments."))
                # exact colours (the colour table stores them in 8 bits)
                byName = {name: color for name, color in entries.values()}
                for i in range(segmentation.GetNumberOfSegments()):
                    segment = segmentation.GetNthSegment(i)
                    if segment.GetName() in byName:
                        segment.SetColor(*byName[segment.GetName()])
            segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(fixedVolume)
            if segmentationNode.GetDisplayNode() is None:
                segmentationNode.CreateDefaultDisplayNodes()
        finally:
            self._removeNode(labelmap)
            if colors is not None:
                slicer.mrmlScene.RemoveNode(colors)

    def fillResultsTable(self, tableNode, summary, labelNames=None) -> None:
        """The measures of the results table (the panel's rows) in a table node."""
        with slicer.util.NodeModify(tableNode):
            tableNode.RemoveAllColumns()
            for title in (_("Measure"), _("Value")):
                column = vtk.vtkStringArray()
                column.SetName(title)
                tableNode.AddColumn(column)
            for name, value in bridge.results_table_rows(summary, labelNames):
                row = tableNode.AddEmptyRow()
                tableNode.SetCellText(row, 0, name)
                tableNode.SetCellText(row, 1, value)
            tableNode.SetAttribute("DeepRegistration.Summary", json.dumps(summary))

    @staticmethod
    def applyTransform(node, transformNode, harden=False) -> None:
        """Put ``node`` under ``transformNode`` (it then shows in the fixed volume's space);
        ``harden`` resamples it permanently."""
        node.SetAndObserveTransformNodeID(transformNode.GetID())
        if harden and not slicer.vtkSlicerTransformLogic.hardenTransform(node):
            raise RuntimeError(_("Could not harden the transform on {name}.").format(name=node.GetName()))

    @staticmethod
    def divergingColorNodeID() -> str:
        if slicer.mrmlScene.GetNodeByID(DIVERGING_COLOR_NODE_ID):
            return DIVERGING_COLOR_NODE_ID
        # fall back to a procedural blue-white-red table
        for node in slicer.util.getNodesByClass("vtkMRMLProceduralColorNode"):
            if node.GetAttribute(ROLE_ATTRIBUTE) == "divergingColors":
                return node.GetID()
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLProceduralColorNode", "DeepRegistration diverging")
        node.SetAttribute(ROLE_ATTRIBUTE, "divergingColors")
        node.SetAttribute("Category", "DeepRegistration")
        function = node.GetColorTransferFunction()
        function.AddRGBPoint(0.0, 0.02, 0.19, 0.38)
        function.AddRGBPoint(0.5, 0.97, 0.97, 0.97)
        function.AddRGBPoint(1.0, 0.40, 0.0, 0.05)
        return node.GetID()

    def setDivergingDisplay(self, volumeNode, center=1.0, maximumHalfWidth=None) -> None:
        """Blue-white-red display centred on ``center`` (1 for a Jacobian map: no volume change)."""
        displayNode = volumeNode.GetDisplayNode()
        if displayNode is None:
            volumeNode.CreateDefaultDisplayNodes()
            displayNode = volumeNode.GetDisplayNode()
        window, level = bridge.diverging_window_level(slicer.util.arrayFromVolume(volumeNode), center=center,
                                                      maximum_half_width=maximumHalfWidth)
        displayNode.SetAndObserveColorNodeID(self.divergingColorNodeID())
        displayNode.AutoWindowLevelOff()
        displayNode.SetWindowLevel(window, level)

    # -- quality assurance
    @staticmethod
    def runFixedVolume(parameterNode):
        """The fixed volume the displayed results were computed with (the selector may have
        changed since)."""
        return parameterNode.resultFixedVolume or parameterNode.fixedVolume

    def showQA(self, parameterNode, comparisonView="Warped", showGrid=False, gridSpacing=10.0,
               showJacobian=False, jacobianOpacity=0.5, showFolding=False, fit=False) -> None:
        p = parameterNode
        fixedVolume = self.runFixedVolume(p)
        if comparisonView == "Fixed":
            background = fixedVolume
        elif comparisonView in ("Checkerboard", "Difference"):
            background = self.comparisonVolume(p, comparisonView)
        else:
            background = p.warpedVolume
        foreground = p.jacobianVolume if showJacobian and p.jacobianVolume else None
        if showFolding and p.foldingVolume:
            label = p.foldingVolume
        elif p.warpedLabels and p.warpedLabels.IsA("vtkMRMLLabelMapVolumeNode"):
            label = p.warpedLabels
        else:
            label = None
        slicer.util.setSliceViewerLayers(
            background=background, foreground=foreground,
            foregroundOpacity=jacobianOpacity if foreground else 0.0,
            label=label, labelOpacity=1.0 if label is p.foldingVolume and label else None, fit=fit)
        legend = self.jacobianLegend(p.jacobianVolume)
        if legend is not None:
            legend.SetVisibility(bool(foreground))
        if p.warpedLabels and p.warpedLabels.IsA("vtkMRMLSegmentationNode") and p.warpedLabels.GetDisplayNode():
            p.warpedLabels.GetDisplayNode().SetVisibility(True)
        if p.outputTransform:
            self.showGrid(p.outputTransform, fixedVolume, showGrid, gridSpacing)

    def removeComparisonVolume(self, parameterNode) -> None:
        node = parameterNode.comparisonVolume
        if node is not None:
            parameterNode.comparisonVolume = None
            self._removeNode(node)

    def comparisonVolume(self, parameterNode, mode):
        """The checkerboard or difference of the run's fixed volume and the warped volume (one
        node, reused, removed when new results arrive)."""
        p = parameterNode
        fixedVolume = self.runFixedVolume(p)
        fixed = slicer.util.arrayFromVolume(fixedVolume)
        warped = slicer.util.arrayFromVolume(p.warpedVolume)
        if fixed.shape != warped.shape:
            raise ValueError(_("The fixed volume of the registration changed its grid since the "
                               "registration; run the registration again."))
        spacing = p.warpedVolume.GetSpacing()  # (i, j, k)
        if mode == "Checkerboard":
            tiles = bridge.checkerboard_tile_voxels(warped.shape, spacing[::-1], tiles=8)
            array = bridge.checkerboard(fixed, warped, tiles)
        else:
            array = bridge.difference(fixed, warped)
        node = p.comparisonVolume
        if node is None:
            node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
            node.SetAttribute(ROLE_ATTRIBUTE, "comparison")
            p.comparisonVolume = node
        node.SetName(f"{p.warpedVolume.GetName()} {mode.lower()}")
        node.SetIJKToRASMatrix(bridge.vtk_matrix_from_numpy(self._ijkToRas(p.warpedVolume)))
        node.SetAndObserveTransformNodeID(p.warpedVolume.GetTransformNodeID())
        slicer.util.updateVolumeFromArray(node, array)
        if node.GetDisplayNode() is None:
            node.CreateDefaultDisplayNodes()
        displayNode = node.GetDisplayNode()
        if mode == "Difference":
            self.setDivergingDisplay(node, center=0.0)
        else:
            displayNode.SetAndObserveColorNodeID("vtkMRMLColorTableNodeGrey")
            displayNode.AutoWindowLevelOff()
            displayNode.SetWindowLevel(1.0, 0.5)
        return node

    @staticmethod
    def showGrid(transformNode, regionNode, show=True, spacingMm=10.0) -> None:
        """Show the deformation as a warped grid in the slice views."""
        if transformNode is None:
            return
        if transformNode.GetDisplayNode() is None:
            transformNode.CreateDefaultDisplayNodes()
        displayNode = transformNode.GetDisplayNode()
        with slicer.util.NodeModify(displayNode):
            displayNode.SetVisualizationMode(slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
            displayNode.SetGridSpacingMm(float(spacingMm))
            if regionNode is not None:
                displayNode.SetAndObserveRegionNode(regionNode)
            displayNode.SetVisibility2D(bool(show))
            displayNode.SetVisibility3D(False)
            displayNode.SetVisibility(bool(show))

    @staticmethod
    def jumpToWorstFolding(summary) -> list:
        """Centre the slice views on the voxel with the smallest (strict) Jacobian determinant and
        mark it."""
        ras = bridge.worst_folding_ras(summary)
        if ras is None:
            raise ValueError(_("The registration summary has no worst-folding location."))
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, ras[0], ras[1], ras[2],
                                              slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        markup = None
        for node in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode"):
            if node.GetAttribute(ROLE_ATTRIBUTE) == "worstFolding":
                markup = node
        if markup is None:
            markup = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "Worst folding")
            markup.SetAttribute(ROLE_ATTRIBUTE, "worstFolding")
        markup.RemoveAllControlPoints()
        determinant = (summary.get("worst_folding") or {}).get("determinant")
        markup.AddControlPoint(ras[0], ras[1], ras[2], f"det J {bridge._fmt(determinant)}")
        return ras


class _RegistrationJob:
    """One running registration: polls the subprocess from a Qt timer (the GUI stays responsive)
    and loads the outputs when it ends."""

    POLL_INTERVAL_MS = 200

    def __init__(self, logic, process, context, progressCallback, logCallback, completedCallback):
        self.logic = logic
        self.process = process
        self.context = context
        self.progressCallback = progressCallback
        self.logCallback = logCallback
        self.completedCallback = completedCallback
        self.finished = False
        self.timedOut = None  # seconds, when waitForCompletion gave up
        self.result = None
        self.startTime = time.time()
        self.timer = qt.QTimer()
        self.timer.setInterval(self.POLL_INTERVAL_MS)
        self.timer.connect("timeout()", self._poll)
        self.timer.start()

    def cancel(self) -> None:
        self.process.cancel()

    def abort(self) -> None:
        """Stop the process tree and clean up here and now: no events are processed, nothing is
        loaded and no callback runs (scene close, application exit)."""
        if self.finished:
            return
        self.timer.stop()
        self.process.stop_now()
        shutil.rmtree(self.context["workFolder"], ignore_errors=True)
        self.result = {"status": "cancelled", "message": _("Stopped: the scene was closed."),
                       "outputFolder": self.context["outputFolder"], "returnCode": self.process.returncode,
                       "fixedVolume": self.context["fixedVolume"], "log": self.process.log_text(),
                       "seconds": time.time() - self.startTime}
        self.finished = True

    def waitForCompletion(self, timeoutSeconds=None) -> None:
        """Process events until the job ends; after ``timeoutSeconds`` stop it and report a
        failure (a timeout is not the user's cancel)."""
        start = time.time()
        while not self.finished:
            slicer.app.processEvents()
            time.sleep(0.05)
            if timeoutSeconds is not None and time.time() - start > timeoutSeconds and not self.finished:
                self.timedOut = timeoutSeconds
                self.process.stop_now()
                self._poll()
                if not self.finished:
                    raise TimeoutError(f"registration still running after {timeoutSeconds} s")

    def _log(self, line) -> None:
        if self.logCallback:
            self.logCallback(line)

    def _poll(self) -> None:
        if self.finished:
            return
        for event in self.process.poll():
            kind = event.get("type")
            if kind == "progress":
                if self.progressCallback:
                    self.progressCallback(event["fraction"], event["stage"], event["message"])
                text = event["stage"] + (f": {event['message']}" if event["message"] else "")
                self._log(text)
            elif kind in ("log", "error"):
                self._log(event["message"])
            elif kind == "output":
                self._log(event["message"] if event.get("stream") == "stdout" else f"[stderr] {event['message']}")
        if self.process.is_finished():
            self.timer.stop()
            self._finish()

    def _finish(self) -> None:
        context = self.context
        result = {"status": "failed", "message": "", "outputFolder": context["outputFolder"],
                  "returnCode": self.process.returncode, "fixedVolume": context["fixedVolume"]}
        done = self.process.done_event()
        try:
            if self.timedOut is not None:
                result["message"] = _("Timed out: the registration was still running after {seconds} s "
                                      "and was stopped.").format(seconds=self.timedOut)
            elif self.process.cancel_requested:
                result.update(status="cancelled", message=_("Cancelled by the user."))
            elif self.process.returncode == 0 and done is not None:
                summary = done.get("summary") or {}
                outputFolder = done.get("output") or context["outputFolder"]
                result["outputFolder"] = outputFolder
                nodes = self.logic.loadResults(outputFolder, summary, context)
                result.update(status="success", message="", summary=summary, nodes=nodes,
                              labelNames=context["labelNames"])
            else:
                result["message"] = self.process.error_message()
        except Exception as error:  # loading the outputs failed
            logging.exception("DeepRegistration: loading the results failed")
            result.update(status="failed", message=str(error))
        if context["keepOutputFolder"]:
            self._log(_("Files kept in {folder}").format(folder=context["workFolder"]))
        else:
            shutil.rmtree(context["workFolder"], ignore_errors=True)
        result["log"] = self.process.log_text()
        result["seconds"] = time.time() - self.startTime
        self.result = result
        self.finished = True
        if self.completedCallback:
            self.completedCallback(result)


class _MethodsJob:
    """``methods --json`` in the background."""

    def __init__(self, process, callback, timeoutSeconds):
        self.process = process
        self.callback = callback
        self.deadline = time.time() + timeoutSeconds
        self.timer = qt.QTimer()
        self.timer.setInterval(250)
        self.timer.connect("timeout()", self._poll)
        self.timer.start()

    def cancel(self) -> None:
        self.timer.stop()
        self.process.kill()

    def _poll(self) -> None:
        self.process.poll()
        if time.time() > self.deadline and not self.process.is_finished():
            self.process.kill()
            self.process.wait(timeout=10)
        if not self.process.is_finished():
            return
        self.timer.stop()
        self.process.poll()
        methods, error = None, None
        if self.process.returncode == 0:
            try:
                methods = bridge.parse_methods_json("\n".join(self.process.stdout_lines))
            except ValueError as exception:
                error = str(exception)
        else:
            error = self.process.error_message()
        self.callback(methods, error)


#
# DeepRegistrationTest
#


class DeepRegistrationTest(ScriptedLoadableModuleTest):  # noqa: F405
    """Self-test: synthetic volumes made here and the demo pair shipped with the module (no
    download). It never installs anything: without PyTorch (or the other packages the
    registration needs) the registration tests are skipped with a message."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GeometryRoundTrip()
        missing = bridge.missing_modules()
        if missing:
            self.delayDisplay(_("Skipping the registration tests: these Python packages are not installed: "
                                "{packages}. Press Apply in the module once to install them.").format(
                                    packages=", ".join(missing)))
            return
        self.setUp()
        self.test_RegistrationWithSegmentations()
        self.setUp()
        self.test_NetworkMethodOnDemoPair()
        self.setUp()
        self.test_Cancel()

    # synthetic data: a two-layer blob and a moved, slightly scaled one, on an oblique grid
    @staticmethod
    def _makePair(shape=(36, 40, 44), spacing=(2.0, 2.0, 2.5)):
        import numpy as np

        k, j, i = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in shape], indexing="ij")
        center = [n / 2.0 for n in shape]

        def blob(shift, scale):
            r2 = (((k - center[0] - shift[0]) / (9.0 * scale)) ** 2 + ((j - center[1] - shift[1]) / (11.0 * scale)) ** 2
                  + ((i - center[2] - shift[2]) / (12.0 * scale)) ** 2)
            image = 100.0 * np.exp(-2.0 * r2) + 50.0 * (r2 < 1.0)
            labels = np.where(r2 < 0.3, 1, np.where(r2 < 1.0, 2, 0)).astype(np.int16)  # core, shell
            return image.astype(np.float32), labels

        fixedArray, fixedLabels = blob((0, 0, 0), 1.0)
        movingArray, movingLabels = blob((1.5, -2.0, 2.0), 1.1)
        # oblique, anisotropic geometry: exercises the IJK/RAS/LPS conversions
        angle = np.deg2rad(10.0)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        ijkToRas = np.eye(4)
        ijkToRas[:3, :3] = rotation @ np.diag(spacing)
        ijkToRas[:3, 3] = [-40.0, 25.0, -30.0]
        fixed = slicer.util.addVolumeFromArray(fixedArray, ijkToRas, "fixed")
        moving = slicer.util.addVolumeFromArray(movingArray, ijkToRas, "moving")
        return fixed, moving, fixedLabels, movingLabels, ijkToRas

    @staticmethod
    def _segmentation(labels, ijkToRas, name, segments):
        """A segmentation node from a label array; ``segments`` lists (label value, name, colour)
        in the order the segments are added."""
        labelmap = slicer.util.addVolumeFromArray(labels, ijkToRas, TEMPORARY_NODE_NAME, "vtkMRMLLabelMapVolumeNode")
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        try:
            ids = vtk.vtkStringArray()
            for value in range(1, max(v for v, _n, _c in segments) + 1):
                segmentName, color = [(n, c) for v, n, c in segments if v == value][0]
                segmentation.GetSegmentation().AddEmptySegment(segmentName, segmentName, color)
                ids.InsertNextValue(segmentName)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentation, ids):
                raise RuntimeError("could not make the test segmentation")
        finally:
            DeepRegistrationLogic._removeNode(labelmap)
        return segmentation

    def test_GeometryRoundTrip(self):
        """What the module writes is read back by SimpleITK with the IJK-to-RAS matrix Slicer has,
        in world coordinates when the volume is under a transform."""
        import numpy as np
        import SimpleITK as sitk

        self.delayDisplay("Geometry round trip")
        fixed = self._makePair()[0]
        folder = tempfile.mkdtemp(prefix="DeepRegistrationTest-", dir=slicer.app.temporaryPath)
        try:
            logic = DeepRegistrationLogic()
            path = os.path.join(folder, "fixed.nii.gz")
            logic.exportVolume(fixed, path)
            image = sitk.ReadImage(path)
            expected = DeepRegistrationLogic._ijkToRas(fixed)
            np.testing.assert_allclose(bridge.ijk_to_ras_matrix(image), expected, atol=1e-4)
            corner = bridge.kji_index_to_ras((3, 2, 1), image)
            np.testing.assert_allclose(corner, (expected @ [1, 2, 3, 1])[:3], atol=1e-4)
            # under a linear transform the file is in world coordinates; the node is unchanged
            transform = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
            shift = np.eye(4)
            shift[:3, 3] = [5.0, -7.0, 11.0]
            transform.SetMatrixTransformToParent(bridge.vtk_matrix_from_numpy(shift))
            fixed.SetAndObserveTransformNodeID(transform.GetID())
            logic.exportVolume(fixed, path)
            np.testing.assert_allclose(bridge.ijk_to_ras_matrix(sitk.ReadImage(path)), shift @ expected, atol=1e-4)
            np.testing.assert_allclose(DeepRegistrationLogic._ijkToRas(fixed), expected)
            self.assertIsNone(slicer.mrmlScene.GetFirstNodeByName(TEMPORARY_NODE_NAME))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.delayDisplay("Geometry round trip passed")

    def test_RegistrationWithSegmentations(self):
        """Instance optimisation on segmentation inputs: geometry of the transform in Slicer
        coordinates against the field SimpleITK reads, warped segments, table, QA, jump."""
        import numpy as np
        import SimpleITK as sitk

        self.delayDisplay("Registering a synthetic pair with segmentations (instance optimisation)")
        fixed, moving, fixedArray, movingArray, ijkToRas = self._makePair()
        # the moving segments are added in the other order: they are matched by name
        fixedSegments = self._segmentation(fixedArray, ijkToRas, "fixed tissues",
                                           [(1, "core", (0.9, 0.2, 0.1)), (2, "shell", (0.1, 0.5, 0.9))])
        movingSegments = self._segmentation(np.where(movingArray > 0, 3 - movingArray, 0).astype(np.int16), ijkToRas,
                                            "moving tissues", [(1, "shell", (0.2, 0.6, 0.3)), (2, "core", (0.7, 0.1, 0.7))])
        logic = DeepRegistrationLogic()
        result = logic.run(fixed, moving, method="io", refine=0, fixedLabels=fixedSegments,
                           movingLabels=movingSegments, keepOutputFolder=True, timeoutSeconds=1800)
        workFolder = os.path.dirname(result["outputFolder"])
        try:
            self.assertEqual(result["status"], "success", result.get("message", "") + "\n" + result.get("log", ""))
            nodes, summary = result["nodes"], result["summary"]

            # the inputs are untouched
            self.assertIsNone(moving.GetParentTransformNode())
            self.assertEqual(slicer.util.arrayFromVolume(moving).shape, (36, 40, 44))

            # outputs on the fixed grid
            fixedMatrix = DeepRegistrationLogic._ijkToRas(fixed)
            for key in ("warped", "jacobian", "folding"):
                node = nodes[key]
                self.assertEqual(node.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions(), key)
                np.testing.assert_allclose(DeepRegistrationLogic._ijkToRas(node), fixedMatrix, atol=1e-3, err_msg=key)

            # the transform in Slicer coordinates: FromParent maps a fixed voxel x to x + u(x),
            # u read by SimpleITK (LPS) and turned into RAS here; ToParent maps it back
            field = sitk.ReadImage(os.path.join(result["outputFolder"], "displacement.nii.gz"))
            vectors = sitk.GetArrayFromImage(field)
            fromParent = nodes["transform"].GetTransformFromParent()
            toParent = nodes["transform"].GetTransformToParent()
            generator = np.random.default_rng(0)
            for _index in range(20):
                k, j, i = (int(generator.integers(2, n - 2)) for n in vectors.shape[:3])
                x_ras = (fixedMatrix @ [i, j, k, 1.0])[:3]
                np.testing.assert_allclose(bridge.lps_to_ras(field.TransformIndexToPhysicalPoint((i, j, k))), x_ras, atol=1e-3)
                y_ras = x_ras + np.array(bridge.lps_to_ras(vectors[k, j, i]))
                np.testing.assert_allclose(fromParent.TransformPoint(x_ras.tolist()), y_ras, atol=1e-3)
                np.testing.assert_allclose(toParent.TransformPoint(y_ras.tolist()), x_ras, atol=0.05)
            self.assertGreater(float(np.abs(vectors).max()), 0.5, "the transform should not be the identity")

            # segments come back with the moving segmentation's names and colours
            warpedSegments = nodes["warpedLabels"]
            self.assertTrue(warpedSegments.IsA("vtkMRMLSegmentationNode"))
            segmentation = warpedSegments.GetSegmentation()
            colors = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegment(i).GetColor()
                      for i in range(segmentation.GetNumberOfSegments())}
            self.assertEqual(sorted(colors), ["core", "shell"])
            np.testing.assert_allclose(colors["shell"], (0.2, 0.6, 0.3), atol=1e-6)
            np.testing.assert_allclose(colors["core"], (0.7, 0.1, 0.7), atol=1e-6)

            # the registration helped and did not fold much
            self.assertGreater(summary["similarity_after"], summary["similarity_before"])
            self.assertLess(summary["folding_percent"], 1.0)
            self.assertGreater(summary["mean_dice_after"], summary["mean_dice_before"])
            self.assertEqual(set(result["labelNames"].values()), {"core", "shell"})

            # the measures are in a table node too
            table = nodes["table"]
            measures = [table.GetCellText(row, 0) for row in range(table.GetNumberOfRows())]
            self.assertIn("Mean Dice", measures)
            self.assertIn(bridge.FOLDING_CENTRAL_LABEL, measures)

            # jump to the worst folding: every slice view is centred on the stored point
            ras = logic.jumpToWorstFolding(summary)
            expected = bridge.lps_to_ras(summary["worst_folding"]["point_lps"])
            np.testing.assert_allclose(ras, expected)
            sliceNodes = slicer.util.getNodesByClass("vtkMRMLSliceNode")
            self.assertTrue(sliceNodes)
            for sliceNode in sliceNodes:
                matrix = sliceNode.GetSliceToRAS()
                np.testing.assert_allclose([matrix.GetElement(r, 3) for r in range(3)], expected, atol=1e-6,
                                           err_msg=sliceNode.GetName())
            markup = [n for n in slicer.util.getNodesByClass("vtkMRMLMarkupsFiducialNode")
                      if n.GetAttribute(ROLE_ATTRIBUTE) == "worstFolding"][0]
            point = [0.0, 0.0, 0.0]
            markup.GetNthControlPointPosition(0, point)
            np.testing.assert_allclose(point, expected, atol=1e-6)

            # QA views on the run's fixed volume, through the parameter node
            parameterNode = logic.getParameterNode()
            parameterNode.outputTransform = nodes["transform"]
            parameterNode.warpedVolume = nodes["warped"]
            parameterNode.jacobianVolume = nodes["jacobian"]
            parameterNode.foldingVolume = nodes["folding"]
            parameterNode.warpedLabels = warpedSegments
            parameterNode.resultFixedVolume = fixed
            for view in COMPARISON_VIEWS:
                logic.showQA(parameterNode, comparisonView=view, showGrid=True, showJacobian=True, showFolding=True)
            self.assertEqual(nodes["transform"].GetDisplayNode().GetVisualizationMode(),
                             slicer.vtkMRMLTransformDisplayNode.VIS_MODE_GRID)
            self.assertTrue(logic.jacobianLegend(nodes["jacobian"]).GetVisibility())
            compositeNode = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")[0]
            self.assertEqual(compositeNode.GetLabelVolumeID(), nodes["folding"].GetID())

            # apply the result to the moving volume
            logic.applyTransform(moving, nodes["transform"])
            self.assertIs(moving.GetParentTransformNode(), nodes["transform"])
            moving.SetAndObserveTransformNodeID(None)
        finally:
            shutil.rmtree(workFolder, ignore_errors=True)
        self.delayDisplay("Registration test passed")

    def _availableNetworkMethod(self):
        """The first network method whose trained weights are installed (None if none is)."""
        received = []
        job = DeepRegistrationLogic().queryMethods(lambda methods, error: received.append((methods, error)))
        start = time.time()
        while not received and time.time() - start < 300:
            slicer.app.processEvents()
            time.sleep(0.05)
        if not received:
            job.cancel()
            return None
        methods, error = received[0]
        self.assertIsNone(error, error)
        networks = [m["name"] for m in methods if m.get("checkpoint") and m.get("available") is not False]
        return "vm-diff" if "vm-diff" in networks else (networks[0] if networks else None)

    def _loadDemoPair(self):
        """The demo pair of the Sample Data module, read from the files shipped with the module."""
        nodes = []
        for fileName, nodeName, fileType, checksum in bridge.DEMO_FILES:
            path = os.path.join(SAMPLE_DATA_FOLDER, fileName)
            self.assertEqual(bridge.file_sha256(path), checksum, fileName)
            if fileType == "SegmentationFile":
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", nodeName)
                reader = slicer.vtkMRMLSegmentationStorageNode()
            else:
                node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", nodeName)
                reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
                reader.SetSingleFile(1)
            reader.SetFileName(path)
            self.assertTrue(reader.ReadData(node), path)
            node.CreateDefaultDisplayNodes()
            nodes.append(node)
        return nodes

    def test_NetworkMethodOnDemoPair(self):
        """A trained network on the demo pair, with its segmentations."""
        method = self._availableNetworkMethod()
        if method is None:
            self.delayDisplay("Skipping the network test: no trained network is installed.")
            return
        self.delayDisplay(f"Registering the demo pair with {method}")
        fixed, moving, fixedSegments, movingSegments = self._loadDemoPair()
        result = DeepRegistrationLogic().run(fixed, moving, method=method, fixedLabels=fixedSegments,
                                             movingLabels=movingSegments, timeoutSeconds=1800)
        self.assertEqual(result["status"], "success", result.get("message", "") + "\n" + result.get("log", ""))
        summary = result["summary"]
        self.assertEqual(summary["method"], method)
        self.assertGreater(summary["mean_dice_after"], summary["mean_dice_before"])
        warped = result["nodes"]["warpedLabels"]
        names = sorted(warped.GetSegmentation().GetNthSegment(i).GetName()
                       for i in range(warped.GetSegmentation().GetNumberOfSegments()))
        self.assertEqual(names, ["grey matter", "white matter"])
        self.delayDisplay("Network test passed")

    def test_Cancel(self):
        self.delayDisplay("Cancelling a registration")
        fixed, moving = self._makePair(shape=(60, 64, 64))[:2]
        logic = DeepRegistrationLogic()
        job = logic.startRegistration(fixed, moving, method="io", refine=200)
        logic.cancel(wait=True)
        self.assertTrue(job.finished)
        self.assertEqual(job.result["status"], "cancelled")
        self.assertFalse(logic.isRunning())
        self.assertFalse(os.path.exists(job.context["workFolder"]))
        self.delayDisplay("Cancel test passed")
