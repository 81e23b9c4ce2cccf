"""IPMNClassifier: grade a pancreatic cyst (IPMN) on T1 + T2 MRI as normal / low / high risk.

A Vision Transformer classifies a grid of k ROI slices of both series; Attention Rollout shows where it looked.
The work runs in a separate engine process (``PythonSlicer -m ipmn``), never in the GUI thread; this file only
binds the panel to :mod:`IPMNClassifierLib.logic`. Requires Slicer 5.10 or later (Python 3.12).

Over 500 lines because Slicer's module template keeps the module, its parameter node, widget, logic and
self-test in one file; every function is short and the logic lives in ``IPMNClassifierLib``.
"""

import enum
import time
import unittest
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLLabelMapVolumeNode, vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from ipmn import registry
from ipmn.errors import IPMNError
from ipmn.vocab import CLASS_TITLES
from IPMNClassifierLib import dependencies, dicomout, panel, sampledata
from IPMNClassifierLib import engine as eng
from IPMNClassifierLib.logic import ClassifierLogic, PredictOptions
from IPMNClassifierLib.slicecompose import resultLayers

MINIMUM_SLICER_VERSION = (5, 10)
RISK_COLORS = {"normal": "#2e7d32", "low": "#ef6c00", "high": "#c62828"}


#
# IPMNClassifier
#


class IPMNClassifier(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("IPMN Classifier")
        self.parent.categories = [_("IPMN")]
        self.parent.dependencies = ["Markups", "Segmentations", "SubjectHierarchy"]
        self.parent.contributors = ["TODO-CONTRIBUTORS (TODO-ORGANISATION)"]  # placeholder: see CMakeLists.txt
        self.parent.helpText = _("""
Grades an intraductal papillary mucinous neoplasm (IPMN) of the pancreas on a T1 and a T2 MRI series as
<b>normal</b>, <b>low risk</b> or <b>high risk</b> with a Vision Transformer, and shows where the model looked
(Attention Rollout heat map and the top 20/10/5 % attention regions as a label map).
<ol>
<li>Select the T1 and T2 volumes and place an ROI around the pancreas (<i>Create ROI</i>, or
<i>ROI from segmentation</i> with a pancreas segment).</li>
<li>Select a model (the bundled demo model is trained on synthetic phantoms only) and click <i>Apply</i>.</li>
</ol>
The first run asks to install PyTorch (through the PyTorch extension, matching your GPU driver) and a few Python
packages; Slicer's own numpy and SimpleITK are never replaced. Models live in a user-level folder shared by all
Slicer versions (<i>Open models folder</i>; set the environment variable IPMN_MODELS_DIR to move it). Without
internet, copy a model folder (model.safetensors + config.json) there or use <i>Add model folder...</i>.
On macOS the CPU is used. Requires Slicer 5.10 or later.
<p><b>Research use only. Not for clinical decisions.</b></p>
See the README of the extension (TODO-REPOSITORY-URL).
""")
        self.parent.acknowledgementText = _("""
Method after Proietto Salanitri et al., "Neural Transformers for Intraductal Papillary Mucosal Neoplasms (IPMN)
Classification in MRI images" (2022). Built on 3D Slicer, PyTorch, timm and MONAI.
""")
        slicer.app.connect("startupCompleted()", registerSampleData)


#
# Sample data
#


def registerSampleData():
    """Register the bundled phantom case (T1, T2, ROI, pancreas mask) with the Sample Data module."""
    try:
        import SampleData
    except ImportError:
        return
    sampledata.registerSampleData(SampleData, Path(__file__).resolve().parent, title=_("IPMN"))


#
# IPMNClassifierParameterNode
#


class Device(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"

    def label(self):
        return {"auto": _("Auto (GPU if available)"), "cpu": _("CPU")}[self.value]


@parameterNodeWrapper
class IPMNClassifierParameterNode:
    """Inputs, options and the latest outputs of the classifier (saved with the scene)."""

    t1Volume: vtkMRMLScalarVolumeNode
    t2Volume: vtkMRMLScalarVolumeNode
    roi: vtkMRMLMarkupsROINode
    roiMarginMm: Annotated[float, WithinRange(0.0, 100.0)] = 10.0
    modelId: str = ""
    device: Device = Device.AUTO
    allWindows: bool = False
    tta: bool = False
    foldEnsemble: bool = True
    keepEngineLoaded: bool = True
    exactFp32: bool = False
    writeDicom: bool = False
    dicomOutDir: str = ""  # a plain string, bound by hand: an unset Path parameter shows "."
    heatmapOpacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    showAttentionLabels: bool = False
    resultTable: vtkMRMLTableNode
    heatmapVolume: vtkMRMLScalarVolumeNode
    labelVolume: vtkMRMLLabelMapVolumeNode


#
# IPMNClassifierWidget
#


class IPMNClassifierWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.pending = None
        self.lastResult = None
        self.timer = None
        self.models = []
        self.startTime = time.monotonic()
        self._dicomReason = (None, "")  # (T1 node ID and modification time, why DICOM out is unavailable)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IPMNClassifier.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = IPMNClassifierLogic()
        self.ui.progressBar.hide()
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.segmentSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onSegmentationChanged)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.createRoiButton.connect("clicked(bool)", self.onCreateRoi)
        self.ui.roiFromSegmentationButton.connect("clicked(bool)", self.onRoiFromSegmentation)
        self.ui.addModelFolderButton.connect("clicked(bool)", self.onAddModelFolder)
        self.ui.openModelsFolderButton.connect("clicked(bool)", self.onOpenModelsFolder)
        self.ui.refreshModelsButton.connect("clicked(bool)", self.refreshModels)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.opacitySliderWidget.connect("valueChanged(double)", self.onOpacityChanged)
        self.ui.showLabelsCheckBox.connect("toggled(bool)", self.onShowLabelsToggled)
        self.ui.showTableButton.connect("clicked(bool)", self.onShowTable)
        self.ui.openGridButton.connect("clicked(bool)", self.onOpenGrid)
        self.ui.openResultFolderButton.connect("clicked(bool)", self.onOpenResultFolder)
        self.ui.dicomOutPathLineEdit.connect("currentPathChanged(QString)", self.onDicomOutDirChanged)
        self._setResultButtonsEnabled(False)

        if tuple(int(v) for v in (slicer.app.majorVersion, slicer.app.minorVersion)) < MINIMUM_SLICER_VERSION:
            self._showStatus(_("This module needs Slicer {v} or later.").format(
                v=".".join(map(str, MINIMUM_SLICER_VERSION))), error=True)
        self.refreshModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self.pending is not None:
            self.pending.cancel()
        if self.timer:
            self.timer.stop()
        if self.logic:
            self.logic.stopWorker(block=True)
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        panel.unbindParameterNode(self, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        if self.pending is not None:
            self.pending.cancel()
        self.logic.stopWorker()
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        self._showResultPanel(None)
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.t1Volume:
            first = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if first and not first.IsA("vtkMRMLLabelMapVolumeNode"):
                self._parameterNode.t1Volume = first
        self._selectModelInCombo(self._parameterNode.modelId)

    def setParameterNode(self, inputParameterNode) -> None:
        panel.bindParameterNode(self, inputParameterNode, self._checkCanApply)

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self.pending is not None:
            self.ui.applyButton.enabled = True
            self.ui.applyButton.text = _("Cancel")
            self.ui.applyButton.toolTip = _("Stop the running classification")
            return
        self.ui.applyButton.text = _("Apply")
        p = self._parameterNode
        missing = []
        if not p or not p.t1Volume:
            missing.append(_("a T1 volume"))
        if not p or not p.t2Volume:
            missing.append(_("a T2 volume"))
        if not p or not p.roi:
            missing.append(_("an ROI"))
        if self._selectedModel() is None:
            missing.append(_("a model"))
        self.ui.applyButton.enabled = not missing
        self.ui.applyButton.toolTip = (_("Classify the case") if not missing
                                       else _("Select {items}").format(items=", ".join(missing)))
        info = self._selectedModel()
        self.ui.ensembleCheckBox.enabled = bool(info and info.is_ensemble)
        self._updateDicomOut()

    # ------------------------------------------------------------------------------------- DICOM out
    def _dicomOutReason(self) -> str:
        """Why DICOM out is unavailable for the selected T1 ('' when it is available); cached per T1 state."""
        t1 = self._parameterNode.t1Volume if self._parameterNode else None
        key = (t1.GetID(), t1.GetMTime()) if t1 else None
        if self._dicomReason[0] != key or key is None:
            self._dicomReason = (key, dicomout.unavailableReason(t1))
        return self._dicomReason[1]

    def _updateDicomOut(self) -> None:
        p = self._parameterNode
        reason = self._dicomOutReason()
        self.ui.dicomOutCheckBox.enabled = not reason
        self.ui.dicomOutPathLineEdit.enabled = not reason and bool(p and p.writeDicom)
        self.ui.dicomOutCheckBox.toolTip = (_("DICOM out is unavailable: {reason}").format(reason=reason) if reason
                                            else _("Also write the attention levels as a DICOM SEG and the grade as "
                                                   "a DICOM SR (TID 1500), referencing the T1 series."))
        if p and self.ui.dicomOutPathLineEdit.currentPath != p.dicomOutDir:
            self.ui.dicomOutPathLineEdit.currentPath = p.dicomOutDir

    def onDicomOutDirChanged(self, path) -> None:
        if self._parameterNode and self._parameterNode.dicomOutDir != path:
            self._parameterNode.dicomOutDir = path

    def _dicomOutDir(self) -> str:
        """The DICOM out folder to request ('' for none); IPMNError when asked for but impossible."""
        p = self._parameterNode
        if not p.writeDicom:
            return ""
        reason = self._dicomOutReason()
        if reason:
            raise IPMNError(_("DICOM out: {reason}. Uncheck 'Write DICOM SEG + SR' or load T1 from DICOM.").format(
                reason=reason))
        if not p.dicomOutDir or p.dicomOutDir == ".":
            raise IPMNError(_("DICOM out: choose the folder for the SEG and SR."))
        return p.dicomOutDir

    # ------------------------------------------------------------------------------------- models
    def refreshModels(self) -> None:
        current = self._parameterNode.modelId if self._parameterNode else ""
        self.models = self.logic.listModels(includeInvalid=True)
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for info in self.models:
            combo.addItem(info.label(), info.id)
        combo.blockSignals(wasBlocked)
        if not self.models:
            self.ui.modelCardLabel.text = _("No model found. Add a model folder, or register one with IPMN Trainer.")
        self._selectModelInCombo(current)

    def _selectModelInCombo(self, modelId: str) -> None:
        combo = self.ui.modelComboBox
        index = combo.findData(modelId) if modelId else -1
        if index < 0 and combo.count:
            index = next((i for i, m in enumerate(self.models) if m.valid), 0)
        if index >= 0:
            combo.setCurrentIndex(index)
            self.onModelSelected(index)

    def _selectedModel(self):
        index = self.ui.modelComboBox.currentIndex
        return self.models[index] if 0 <= index < len(self.models) else None

    def onModelSelected(self, index) -> None:
        info = self._selectedModel()
        self.ui.modelCardLabel.text = info.summary() if info else ""
        if info and self._parameterNode and self._parameterNode.modelId != info.id:
            self._parameterNode.modelId = info.id
        self._checkCanApply()

    def onAddModelFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Model folder (model.safetensors + config.json)"))
        if not folder:
            return
        box = qt.QMessageBox(slicer.util.mainWindow())
        box.setWindowTitle(_("Add model folder"))
        box.setText(_("Copy the model into the IPMN models folder (recommended: it stays available if the original "
                      "folder or drive goes away), or use it where it is?"))
        copyButton = box.addButton(_("Copy"), qt.QMessageBox.AcceptRole)
        box.addButton(_("Use in place"), qt.QMessageBox.ActionRole)
        box.addButton(qt.QMessageBox.Cancel)
        box.exec_()
        clicked = box.clickedButton()
        if clicked is None or box.buttonRole(clicked) == qt.QMessageBox.RejectRole:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to add the model folder."), waitCursor=True):
            try:
                info = self.logic.addModelFolder(folder, copy=(clicked == copyButton))
            except IPMNError as exc:
                self._showStatus(str(exc), error=True)
                return
            self._parameterNode.modelId = info.id
            self.refreshModels()
            self._showStatus(_("Added model {name}.").format(name=info.name))

    def onOpenModelsFolder(self) -> None:
        try:
            path = registry.user_models_dir(create=True)
        except IPMNError as exc:
            self._showStatus(str(exc), error=True)
            return
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))

    # ------------------------------------------------------------------------------------- ROI
    def _sliceViewCenter(self):
        layoutManager = slicer.app.layoutManager()
        if layoutManager is None:
            return None
        sliceWidget = layoutManager.sliceWidget("Red")
        if sliceWidget is None:
            return None
        matrix = sliceWidget.mrmlSliceNode().GetSliceToRAS()
        return [matrix.GetElement(i, 3) for i in range(3)]

    def onCreateRoi(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to create the ROI."), waitCursor=True):
            try:
                roi = self.logic.createRoi(center=self._sliceViewCenter(), referenceVolume=self._parameterNode.t1Volume)
            except IPMNError as exc:
                self._showStatus(str(exc), error=True)
                return
            self._parameterNode.roi = roi
            self._showStatus(_("ROI created at the slice view centre: drag its handles onto the pancreas."))

    def onSegmentationChanged(self, node) -> None:
        """Preselect the pancreas among many segments (a TotalSegmentator result has about 100), by the engine's
        --mask-segment rule: its name or its terminology (SCT^15776009 Pancreas)."""
        segmentID = self.logic.pancreasSegmentID(node)
        if segmentID:
            self.ui.segmentSelector.setCurrentSegmentID(segmentID)

    def onRoiFromSegmentation(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to set the ROI from the segmentation."), waitCursor=True):
            try:
                roi = self.logic.roiFromSegment(self.ui.segmentSelector.currentNode(),
                                                self.ui.segmentSelector.currentSegmentID(),
                                                self._parameterNode.roiMarginMm, roiNode=self._parameterNode.roi,
                                                referenceVolume=self._parameterNode.t1Volume)
            except IPMNError as exc:
                self._showStatus(str(exc), error=True)
                return
            self._parameterNode.roi = roi
            self._showStatus(_("ROI set to the bounding box of segment '{name}' plus {m:.0f} mm.").format(
                name=roi.GetAttribute("IPMN.segment") or "", m=self._parameterNode.roiMarginMm))

    # ------------------------------------------------------------------------------------- run
    def onApplyButton(self) -> None:
        if self.pending is not None:
            self.pending.cancel()
            self._showStatus(_("Cancelling..."))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start the IPMN classifier."), waitCursor=True):
            try:
                self._start()
            except IPMNError as exc:
                self._showStatus(str(exc), error=True)

    def _start(self) -> None:
        p = self._parameterNode
        info = self._selectedModel()
        if info is None:
            raise IPMNError(_("Select a model."))
        problems = [] if info.valid else [info.problem]
        problems += self.logic.checkInputs(p.t1Volume, p.t2Volume, p.roi, info.primary if info.valid else None)
        if problems:
            self._showStatus("<br>".join(problems), error=True)
            return
        dependencies.ensureDependencies(self.resourcePath("requirements.txt"), requester="IPMN")
        options = PredictOptions(
            device=p.device.value,
            windows="all" if p.allWindows else "central",
            tta=p.tta,
            precision="fp32" if p.exactFp32 else "auto",
            ensemble=[str(m) for m in info.ensemble_members] if p.foldEnsemble else [],
            dicomOutDir=self._dicomOutDir(),
        )
        warning = eng.memory_warning(self.logic.memoryNeededGB(options))
        task = self.logic.prepare(p.t1Volume, p.t2Volume, p.roi, info, options)
        if not p.keepEngineLoaded:
            self.logic.stopWorker()
        coldStart = not (p.keepEngineLoaded and self.logic.worker is not None and self.logic.worker.alive)
        try:
            self.pending = self.logic.startAsync(task, keepEngineLoaded=p.keepEngineLoaded)
        except IPMNError:
            self.logic.cleanup(task)
            raise
        self.startTime = time.monotonic()
        self._appendLog(f"--- {p.t1Volume.GetName()} / {p.t2Volume.GetName()} with {info.name}")
        self.ui.progressBar.setRange(0, 0 if coldStart else 100)
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self._showStatus((_("Starting the engine (PyTorch and the model load once; later cases are faster)...")
                          if coldStart else _("Classifying...")) + (f"<br><i>{warning}</i>" if warning else ""))
        self._checkCanApply()
        self.timer.start()

    def onTimer(self) -> None:
        if self.pending is None:
            self.timer.stop()
            return
        for kind, payload in self.pending.poll():
            if kind == "progress":
                fraction, text = payload
                if fraction is not None:
                    self.ui.progressBar.setRange(0, 100)
                    self.ui.progressBar.value = int(round(100 * max(0.0, min(1.0, fraction))))
                self.ui.progressBar.setFormat(f"{text} %p%")
            elif kind == "log":
                self._appendLog(payload)
            elif kind == "finished":
                self._onFinished(payload)
            elif kind == "failed":
                self._onFailed(payload)
        if self.pending is not None and self.pending.finished:
            self.pending = None
            self.timer.stop()
            self.ui.progressBar.hide()
            self._checkCanApply()

    def _onFinished(self, result) -> None:
        p = self._parameterNode
        self.lastResult = result
        p.resultTable, p.heatmapVolume, p.labelVolume = result.tableNode, result.heatmapNode, result.labelNode
        slicer.util.setSliceViewerLayers(**resultLayers(p.t1Volume, result.heatmapNode, result.labelNode,
                                                        p.heatmapOpacity, p.showAttentionLabels, "keep-current"))
        self._showResultPanel(result)
        dicom = result.prediction.get("dicom") or {}
        written = (" " + _("DICOM SEG + SR written to {folder}.").format(folder=dicom["folder"])
                   if dicom.get("folder") else "")
        self._showStatus(_("Done in {s:.1f} s.").format(s=time.monotonic() - self.startTime) + written)

    def _onFailed(self, error) -> None:
        if getattr(error, "cancelled", False):
            self._showStatus(_("Cancelled."))
            return
        details = error.details() if isinstance(error, eng.EngineError) else ""
        if details:
            self._appendLog(details)
            self.ui.logCollapsibleButton.collapsed = False
        message = str(error)
        if getattr(error, "out_of_memory", False) and eng.OOM_ADVICE not in message:
            message += " " + eng.OOM_ADVICE
        self._showStatus(message + ("<br>" + _("The last lines of the engine's log are in the Log section.")
                                    if details else ""), error=True)

    # ------------------------------------------------------------------------------------- results
    def _setResultButtonsEnabled(self, enabled: bool) -> None:
        for button in (self.ui.showTableButton, self.ui.openGridButton, self.ui.openResultFolderButton):
            button.enabled = enabled

    def _showResultPanel(self, result) -> None:
        if result is None:
            self.ui.resultLabel.text = ""
            self.ui.resultDetailsLabel.text = ""
            self.ui.gridImageLabel.clear()
            self._setResultButtonsEnabled(False)
            return
        cls = result.predictedClass
        color = RISK_COLORS.get(cls, "#000000")
        title = CLASS_TITLES.get(cls, cls)
        probability = result.probabilities.get(cls, 0.0)
        self.ui.resultLabel.text = (f"<span style='font-size:22pt; font-weight:bold; color:{color}'>{title}</span>"
                                    f"<br><span style='font-size:11pt'>p = {probability:.2f}</span>")
        prediction = result.prediction
        lines = [" · ".join(f"{k}: {v:.3f}" for k, v in result.probabilities.items())]
        uncertainty = prediction.get("uncertainty") or {}
        if uncertainty.get("entropy") is not None:
            lines.append(_("Uncertainty (entropy): {e:.3f}").format(e=float(uncertainty["entropy"])))
        model = prediction.get("model") or {}
        lines.append(_("Model: {name}").format(name=model.get("name", "")))
        if model.get("card"):
            lines.append(f"<i>{model['card']}</i>")
        lines.append("<b>" + _("Research use only. Not for clinical decisions.") + "</b>")
        self.ui.resultDetailsLabel.text = "<br>".join(lines)
        if result.gridPng:
            pixmap = qt.QPixmap(str(result.gridPng))
            if not pixmap.isNull():
                self.ui.gridImageLabel.setPixmap(pixmap.scaledToWidth(
                    min(400, pixmap.width()), qt.Qt.SmoothTransformation))
        self._setResultButtonsEnabled(True)
        self.ui.openGridButton.enabled = result.gridPng is not None

    def onOpacityChanged(self, value) -> None:
        if self._parameterNode and self._parameterNode.heatmapVolume:
            slicer.util.setSliceViewerLayers(foregroundOpacity=value)

    def onShowLabelsToggled(self, checked) -> None:
        if self._parameterNode and self._parameterNode.labelVolume:
            slicer.util.setSliceViewerLayers(label=self._parameterNode.labelVolume if checked else None)

    def onShowTable(self) -> None:
        table = self._parameterNode.resultTable if self._parameterNode else None
        if table is None:
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        appLogic = slicer.app.applicationLogic()
        appLogic.GetSelectionNode().SetActiveTableID(table.GetID())
        appLogic.PropagateTableSelection()

    def onOpenGrid(self) -> None:
        if self.lastResult is not None and self.lastResult.gridPng:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self.lastResult.gridPng)))

    def onOpenResultFolder(self) -> None:
        if self.lastResult is not None and self.lastResult.resultDir:
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(self.lastResult.resultDir)))

    # ------------------------------------------------------------------------------------- panel text
    def _showStatus(self, text: str, error: bool = False) -> None:
        panel.showStatus(self.ui, "IPMNClassifier", text, error)

    def _appendLog(self, text: str) -> None:
        panel.appendLog(self.ui, text)


#
# IPMNClassifierLogic
#


class IPMNClassifierLogic(ScriptedLoadableModuleLogic, ClassifierLogic):
    """The module logic: :class:`ClassifierLogic` (MRML + engine process) with Slicer's parameter node.

    Batch use (blocking, no GUI)::

        logic = IPMNClassifierLogic()
        model = logic.listModels()[0]
        result = logic.process(t1Node, t2Node, roiNode, model, PredictOptions(device="cpu"))
        print(result.summary())
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        moduleDir = Path(__file__).resolve().parent
        try:
            baseEnv = slicer.util.startupEnvironment()
        except Exception:  # not in the application (e.g. PythonSlicer)
            baseEnv = None
        launcher = eng.EngineLauncher(python=eng.python_slicer_executable(), module_dir=moduleDir, base_env=baseEnv)
        ClassifierLogic.__init__(self, launcher=launcher, moduleDir=moduleDir)

    def getParameterNode(self):
        return IPMNClassifierParameterNode(super().getParameterNode())


#
# IPMNClassifierTest
#


class IPMNClassifierTest(ScriptedLoadableModuleTest):
    """Runs inside Slicer on the bundled phantom case with the demo model on the CPU.

    The same checks run without the application in ``Testing/test_slicer_logic.py`` (slicer-core).
    """

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        # "Reload and Test" calls runTest directly (no unittest runner): a skip must not read as a failure.
        for test in (self.test_IPMNClassifier_sample_case, self.test_IPMNClassifier_roi_from_segmentation):
            self.setUp()
            try:
                test()
            except unittest.SkipTest as exc:
                self.delayDisplay(f"{test.__name__} skipped: {exc}")

    def _sample(self):
        import SampleData

        registerSampleData()
        nodes = sampledata.loadSampleNodes(SampleData)
        if nodes is None:
            self.skipTest("the IPMN sample data is not bundled in this build")
        return nodes["t1"], nodes["t2"], nodes["roi"], nodes["segmentation"]

    def test_IPMNClassifier_sample_case(self):
        self.delayDisplay("Classifying the phantom case with the demo model")
        if dependencies.torchMissing() or dependencies.missingRequirements(
                dependencies.readRequirements(Path(__file__).parent / "Resources" / "requirements.txt")):
            self.skipTest("PyTorch / engine packages are not installed")
        t1, t2, roi, _seg = self._sample()
        logic = IPMNClassifierLogic()
        models = [m for m in logic.listModels() if m.source == "bundled" and m.valid]
        if not models:
            self.skipTest("the demo model is not bundled in this build")
        # all windows, as `ipmn demo` runs the sample case
        result = logic.process(t1, t2, roi, models[0], PredictOptions(device="cpu", windows="all"), timeout=600)
        self.assertAlmostEqual(sum(ClassifierLogic.tableProbabilities(result.tableNode).values()), 1.0, places=3)
        # The module shows the grade the table holds, and the sample's true grade: high, for its mural
        # nodule (the engine's tests check that the grade goes when the nodule is removed).
        probabilities = ClassifierLogic.tableProbabilities(result.tableNode)
        self.assertEqual(max(probabilities, key=probabilities.get), result.predictedClass)
        self.assertLess(probabilities["normal"], 0.1)
        truth = sampledata.expectedSampleClass(Path(__file__).resolve().parent)
        self.assertEqual(result.predictedClass, truth)
        self.delayDisplay(f"Graded {result.predictedClass}; the phantom's true grade is {truth}")
        for node in (result.heatmapNode, result.labelNode):
            self.assertEqual(node.GetImageData().GetDimensions(), t1.GetImageData().GetDimensions())
            a, b = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
            node.GetIJKToRASMatrix(a)
            t1.GetIJKToRASMatrix(b)
            for i in range(4):
                for j in range(4):
                    self.assertEqual(a.GetElement(i, j), b.GetElement(i, j))
        labels = set(slicer.util.arrayFromVolume(result.labelNode).ravel().tolist())
        self.assertTrue(labels <= {0, 1, 2, 3})
        count = slicer.mrmlScene.GetNumberOfNodes()
        again = logic.process(t1, t2, roi, models[0], PredictOptions(device="cpu"), timeout=600)
        self.assertIs(again.heatmapNode, result.heatmapNode)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), count)
        self.delayDisplay("Test passed")

    def test_IPMNClassifier_roi_from_segmentation(self):
        t1, _t2, _roi, seg = self._sample()
        if seg is None:
            self.skipTest("no pancreas segmentation in the sample data")
        logic = IPMNClassifierLogic()
        segmentID = seg.GetSegmentation().GetNthSegmentID(0)
        bounds = logic.segmentBoundsRAS(seg, segmentID)
        roi = logic.roiFromSegment(seg, segmentID, marginMm=10.0, referenceVolume=t1)
        for i in range(3):
            self.assertAlmostEqual(roi.GetSize()[i], bounds[2 * i + 1] - bounds[2 * i] + 20.0, places=3)
        self.delayDisplay("Test passed")

