"""IPMNTrainer: fine-tune and cross-validate IPMN classifiers on a local cohort, from Slicer.

Runs ``ipmn cv`` / ``ipmn train`` (the same code as the command line) in a separate process with
``--progress jsonl``; this file binds the panel to :mod:`IPMNTrainerLib.logic`. Requires Slicer 5.10 or later.

Over 500 lines because Slicer's module template keeps the module, its parameter node, widget, logic and
self-test in one file; the logic lives in ``IPMNTrainerLib``.
"""

import enum
import json
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
from slicer import vtkMRMLPlotChartNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

import IPMNClassifierLib
from ipmn.errors import IPMNError
from IPMNClassifierLib import dependencies, panel
from IPMNClassifierLib import engine as eng
from IPMNTrainerLib import presets
from IPMNTrainerLib.logic import LearningCurves, TrainerLogic, TrainingOptions, formatSeconds, parseModels

REQUIREMENTS = Path(IPMNClassifierLib.__file__).resolve().parent.parent / "Resources" / "requirements.txt"


#
# IPMNTrainer
#


class IPMNTrainer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("IPMN Trainer")
        self.parent.categories = [_("IPMN")]
        self.parent.dependencies = ["IPMNClassifier", "Plots", "Tables"]
        self.parent.contributors = ["TODO-CONTRIBUTORS (TODO-ORGANISATION)"]  # placeholder: see CMakeLists.txt
        self.parent.helpText = _("""
Trains IPMN classifiers on a local cohort and estimates their performance with nested cross-validation
(patient-level outer folds; every choice such as the epoch is made on inner folds only).
<ol>
<li>Choose the cohort (a manifest CSV, or a Cyst-X-style folder) and click <i>Check cohort</i>.</li>
<li>Choose architectures, modalities, fusion, k, epochs, learning rate, batch size, folds and an output folder.</li>
<li><i>Start</i>. <i>Stop</i> ends the training process; tick <i>Resume</i> and <i>Start</i> again to continue.</li>
<li>When finished: the results table (mean ± std over outer folds, and per fold), the report, and
<i>Register model</i> to use the trained model or the fold ensemble in IPMN Classifier.</li>
</ol>
The same runs are available on the command line (<tt>ipmn cv</tt>, <tt>ipmn train</tt>) for workstations and clusters.
Requires Slicer 5.10 or later. <b>Research use only.</b>
""")
        self.parent.acknowledgementText = _("""
Nested cross-validation after Bradshaw et al., "A Guide to Cross-Validation for AI in Medical Imaging",
Radiology: AI 2023. Built on 3D Slicer, PyTorch, timm, MONAI and scikit-learn.
""")


#
# IPMNTrainerParameterNode
#


class RunKind(enum.Enum):
    CV = "cv"
    TRAIN = "train"

    def label(self):
        return {"cv": _("Nested cross-validation (ipmn cv)"), "train": _("Train one model (ipmn train)")}[self.value]


class Modalities(enum.Enum):
    T1T2 = "t1t2"
    T1 = "t1"
    T2 = "t2"

    def label(self):
        return {"t1t2": "T1 + T2", "t1": _("T1 only"), "t2": _("T2 only")}[self.value]


class Fusion(enum.Enum):
    EARLY = "early"
    LATE = "late"

    def label(self):
        return {"early": _("Early (2-channel input)"), "late": _("Late (one ViT per series)")}[self.value]


class TrainDevice(enum.Enum):
    AUTO = "auto"
    CPU = "cpu"
    CUDA = "cuda"

    def label(self):
        return {"auto": _("Auto (GPU if available)"), "cpu": "CPU", "cuda": "CUDA GPU"}[self.value]


class Preset(enum.Enum):
    PRACTICAL = "practical"
    PAPER = "paper"
    REFERENCE = "reference"
    DEMO = "demo"
    FILE = "file"

    def label(self):
        return {"practical": _("Practical (workstation / one GPU)"), "paper": _("Paper (ViT-B, 3000 epochs)"),
                "reference": _("Reference code (reproduction only)"), "demo": _("Demo (phantoms, tiny ViT)"),
                "file": _("YAML file...")}[self.value]


class PretrainedSource(enum.Enum):
    PRESET = "preset"
    HUB = "hub"
    FILE = "file"
    NONE = "none"

    def label(self):
        return {"preset": _("As in the preset"), "hub": _("Download from the timm hub (internet)"),
                "file": _("Local file"), "none": _("None (random initialisation)")}[self.value]


# Paths are plain strings, bound by hand: an unset Path parameter shows "." (or Slicer's working folder).
@parameterNodeWrapper
class IPMNTrainerParameterNode:
    cohortPath: str = ""
    configPath: str = ""
    preset: Preset = Preset.PRACTICAL
    presetShown: str = ""  # JSON: the preset's values as shown in the panel (only changes are sent)
    pretrainedSource: PretrainedSource = PretrainedSource.PRESET
    pretrainedFile: str = ""
    runKind: RunKind = RunKind.CV
    models: str = "vit_small"
    modalities: Modalities = Modalities.T1T2
    fusion: Fusion = Fusion.EARLY
    k: Annotated[int, Choice([4, 9, 16, 25])] = 9
    epochs: Annotated[int, WithinRange(1, 100000)] = 40
    learningRate: Annotated[float, WithinRange(1e-6, 1.0)] = 1e-4
    batchSize: Annotated[int, WithinRange(1, 1024)] = 16
    outerFolds: Annotated[int, WithinRange(2, 50)] = 5
    innerFolds: Annotated[int, WithinRange(2, 20)] = 3
    device: TrainDevice = TrainDevice.AUTO
    outputDir: str = ""
    resume: bool = False
    registerName: str = ""
    resultsTable: vtkMRMLTableNode
    curvesChart: vtkMRMLPlotChartNode


def _pathOrNone(path):
    """Unset Path parameters read back as '.'."""
    return Path(path) if path and str(path) not in ("", ".") else None


#
# IPMNTrainerWidget
#


class IPMNTrainerWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.run = None
        self.curves = None
        self.timer = None
        self.lastRun = None  # (output folder, kind) of the last finished run
        self.curvesShown = False
        self.startTime = time.monotonic()
        self._applyingPreset = False

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/IPMNTrainer.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = IPMNTrainerLogic()
        self.timer = qt.QTimer()
        self.timer.setInterval(200)
        self.timer.connect("timeout()", self.onTimer)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.checkCohortButton.connect("clicked(bool)", self.onCheckCohort)
        self.ui.startButton.connect("clicked(bool)", self.onStartButton)
        self.ui.showCurvesButton.connect("clicked(bool)", self.onShowCurves)
        self.ui.showResultsTableButton.connect("clicked(bool)", self.onShowResultsTable)
        self.ui.openReportButton.connect("clicked(bool)", self.onOpenReport)
        self.ui.registerModelButton.connect("clicked(bool)", self.onRegisterModel)
        self.ui.runKindComboBox.connect("currentIndexChanged(int)", self._updateEnabled)
        self.pathWidgets = {"cohortPath": self.ui.cohortPathLineEdit, "configPath": self.ui.configPathLineEdit,
                            "outputDir": self.ui.outputPathLineEdit, "pretrainedFile": self.ui.pretrainedPathLineEdit}
        for name, widget in self.pathWidgets.items():
            widget.connect("currentPathChanged(QString)", lambda path, name=name: self._setPath(name, path))
        self.ui.cohortFolderButton.connect("clicked(bool)", self.onChooseCohortFolder)
        self._setResultButtons(False)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        if self.run is not None:
            self.run.cancel()
        if self.timer:
            self.timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        panel.unbindParameterNode(self, self._updateEnabled)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)
        self.curves = None

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode) -> None:
        panel.bindParameterNode(self, inputParameterNode, self._updateEnabled)

    def _setPath(self, name: str, path: str) -> None:
        if self._parameterNode and getattr(self._parameterNode, name) != path:
            setattr(self._parameterNode, name, path)

    def onChooseCohortFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Cyst-X-style cohort folder"))
        if folder and self._parameterNode:
            self._parameterNode.cohortPath = folder

    def _showPresetValues(self) -> None:
        """Show the chosen preset's values in the fields (once per preset choice)."""
        p = self._parameterNode
        source = presets.presetSource(p.preset.value, p.configPath)
        shown = json.loads(p.presetShown) if p.presetShown else {}
        if not source or shown.get("_source") == source or self._applyingPreset:
            return
        try:
            values = presets.panelValues(presets.loadConfig(source))
        except IPMNError as exc:
            self._showStatus(str(exc), error=True)
            return
        fields = {"epochs": "epochs", "lr": "learningRate", "batchSize": "batchSize", "k": "k",
                  "outer": "outerFolds", "inner": "innerFolds"}
        enums = {"modalities": Modalities, "fusion": Fusion}
        self._applyingPreset = True  # each field change calls _updateEnabled again
        try:
            for key, value in values.items():
                if key in fields:
                    setattr(p, fields[key], type(getattr(p, fields[key]))(value))
                elif key in enums:
                    setattr(p, key, enums[key](value))
            values = {k: v for k, v in values.items() if k in fields or k in enums}
            p.presetShown = json.dumps({"_source": source, "_preset": values})
        finally:
            self._applyingPreset = False

    def _panelValues(self) -> dict:
        p = self._parameterNode
        return {"epochs": int(p.epochs), "lr": float(p.learningRate), "batchSize": int(p.batchSize), "k": int(p.k),
                "modalities": p.modalities.value, "fusion": p.fusion.value, "outer": int(p.outerFolds),
                "inner": int(p.innerFolds)}

    def _updateEnabled(self, *args) -> None:
        running = self.run is not None
        p = self._parameterNode
        self.ui.startButton.text = _("Stop") if running else _("Start")
        self.ui.startButton.toolTip = (_("Stop the training process (resume later with 'Resume')") if running
                                       else _("Start training in a separate process"))
        blockers = []
        if p:
            self._showPresetValues()
            for name, widget in self.pathWidgets.items():
                if widget.currentPath != getattr(p, name):
                    widget.currentPath = getattr(p, name)
            self.ui.configPathLineEdit.enabled = p.preset == Preset.FILE
            self.ui.pretrainedPathLineEdit.enabled = p.pretrainedSource == PretrainedSource.FILE
            blockers = presets.startBlockers(p.cohortPath, p.outputDir, p.preset.value, p.configPath,
                                             presets.pretrainedValue(p.pretrainedSource.value, p.pretrainedFile))
        ready = bool(p) and not blockers
        self.ui.startHintLabel.text = "" if running or ready else _("To start: {items}.").format(items="; ".join(blockers))
        if not running and blockers:
            self.ui.startButton.toolTip = self.ui.startHintLabel.text
        self.ui.startButton.enabled = running or ready
        isCV = not p or p.runKind == RunKind.CV
        for widget in (self.ui.outerFoldsSpinBox, self.ui.innerFoldsSpinBox):
            widget.enabled = isCV and not running
        self.ui.trainingCollapsibleButton.enabled = not running
        self.ui.cohortCollapsibleButton.enabled = not running

    def _options(self) -> TrainingOptions:
        """The run's options: the preset, plus only the values the user changed from what it showed."""
        p = self._parameterNode
        base = TrainingOptions(
            cohort=_pathOrNone(p.cohortPath), output=_pathOrNone(p.outputDir), kind=p.runKind.value,
            config=presets.presetPath(presets.presetSource(p.preset.value, p.configPath)),
            models=parseModels(p.models), device=p.device.value, resume=bool(p.resume),
            pretrained=presets.pretrainedValue(p.pretrainedSource.value, p.pretrainedFile))
        shown = json.loads(p.presetShown) if p.presetShown else {}
        return presets.optionsFromPanel(base, shown.get("_preset", {}), self._panelValues())

    # ------------------------------------------------------------------------------------- cohort
    def onCheckCohort(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to check the cohort."), waitCursor=True):
            try:
                _summary, text = self.logic.cohortSummary(_pathOrNone(self._parameterNode.cohortPath),
                                                          self._parameterNode.modalities.value)
            except IPMNError as exc:
                self.ui.cohortSummaryLabel.text = ""
                self._showStatus(_("Cohort problems: {problems}").format(problems=exc), error=True)
                return
            self.ui.cohortSummaryLabel.text = text
            self._showStatus(_("Cohort OK."))

    # ------------------------------------------------------------------------------------- run
    def onStartButton(self) -> None:
        if self.run is not None:
            self.run.cancel()
            self._showStatus(_("Stopping..."))
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to start training."), waitCursor=True):
            try:
                self._start()
            except IPMNError as exc:
                self._showStatus(str(exc), error=True)

    def _start(self) -> None:
        options = self._options()
        problems = self.logic.checkOptions(options)
        if problems:
            self._showStatus("<br>".join(problems), error=True)
            return
        dependencies.ensureDependencies(REQUIREMENTS, requester="IPMN Trainer")
        if self.curves is None:
            self.curves = LearningCurves()
        self.run = self.logic.start(options, self.curves)
        self._parameterNode.curvesChart = self.curves.chartNode()
        sent = {k: getattr(options, k) for k in presets.PANEL_KEYS if getattr(options, k) is not None}
        self._appendLog(f"--- preset {presets.presetSource(self._parameterNode.preset.value, self._parameterNode.configPath)}"
                        f"; changed by you: {sent or 'nothing'}")
        self.startTime = time.monotonic()
        for note in self.run.notes:
            self._appendLog(note)
        self._appendLog(f"--- ipmn {options.kind}: {' '.join(self.run.run.proc.args[3:])}")
        self.curvesShown = False
        self.ui.foldProgressBar.value = 0
        self.ui.overallProgressBar.value = 0
        self.ui.etaLabel.text = ""
        self._showStatus(_("Training started (preprocessing the cohort first; the first epoch can take a while)."))
        self._setResultButtons(False)
        self.ui.showCurvesButton.enabled = True
        self._updateEnabled()
        self.timer.start()

    def onTimer(self) -> None:
        if self.run is None:
            self.timer.stop()
            return
        for kind, payload in self.run.poll():
            if kind == "progress":
                if not self.curvesShown:
                    self.curvesShown = True
                    self.onShowCurves()  # the live learning curves, from the first epoch on
                self.ui.foldProgressBar.value = int(round(100 * payload["foldFraction"]))
                self.ui.overallProgressBar.value = int(round(100 * payload["overallFraction"]))
                self.ui.etaLabel.text = _("{text} | folds done {done}/{total} | fold ETA {fold} | overall ETA {overall}").format(
                    text=payload["text"], done=payload["foldsDone"], total=payload["totalFolds"],
                    fold=formatSeconds(payload["foldEta"]), overall=formatSeconds(payload["overallEta"]))
            elif kind == "fold_done":
                metrics = payload.get("metrics") or {}
                text = ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if isinstance(v, (int, float)))
                self._appendLog(f"fold {payload.get('fold')} done: {text}")
            elif kind == "log":
                self._appendLog(payload)
            elif kind == "finished":
                self._onFinished(payload)
            elif kind == "failed":
                self._onFailed(payload)
        if self.run is not None and self.run.finished:
            self.run.cleanup()
            self.run = None
            self.timer.stop()
            self._updateEnabled()

    def _params(self):
        """The parameter node, fetched again if the scene was closed while the run went on (module not shown)."""
        if self._parameterNode is None:
            self.initializeParameterNode()
        return self._parameterNode

    def _onFinished(self, done) -> None:
        p = self._params()
        options = self.run.options
        self.lastRun = (Path(done.get("out") or options.output), options.kind)
        self.ui.overallProgressBar.value = 100
        self._showStatus(_("Finished in {t}.").format(t=formatSeconds(time.monotonic() - self.startTime)))
        if not p.registerName:
            p.registerName = Path(self.lastRun[0]).name
        if options.kind == "cv":
            try:
                table = self.logic.resultsTable(self.lastRun[0], p.resultsTable)
            except IPMNError as exc:
                self._showStatus(str(exc), error=True)
            else:
                p.resultsTable = table
                self.ui.resultsLabel.text = self.logic.resultsText(table).replace("\n", "<br>")
        self._setResultButtons(True)

    def _onFailed(self, error) -> None:
        if getattr(error, "cancelled", False):
            self._showStatus(_("Stopped. Tick 'Resume' and click Start to continue from the last checkpoint."))
            self._params().resume = True
            return
        details = error.details() if isinstance(error, eng.EngineError) else ""
        if details:
            self._appendLog(details)
            self.ui.logCollapsibleButton.collapsed = False
        self._showStatus(presets.explainFailure(str(error)), error=True)

    # ------------------------------------------------------------------------------------- results
    def _setResultButtons(self, enabled: bool) -> None:
        isCV = bool(self.lastRun and self.lastRun[1] == "cv")
        self.ui.showResultsTableButton.enabled = enabled and isCV
        self.ui.openReportButton.enabled = enabled and bool(self.lastRun and (self.lastRun[0] / "report.html").is_file())
        self.ui.registerModelButton.enabled = enabled
        self.ui.showCurvesButton.enabled = self.curves is not None

    def onShowCurves(self) -> None:
        chart = self.curves.chartNode() if self.curves else self._params().curvesChart
        if chart is None:
            return
        slicer.modules.plots.logic().ShowChartInLayout(chart)

    def onShowResultsTable(self) -> None:
        table = self._parameterNode.resultsTable
        if table is None:
            return
        slicer.app.layoutManager().setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
        appLogic = slicer.app.applicationLogic()
        appLogic.GetSelectionNode().SetActiveTableID(table.GetID())
        appLogic.PropagateTableSelection()

    def onOpenReport(self) -> None:
        if self.lastRun:
            report = self.lastRun[0] / "report.html"
            if report.is_file():
                qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(report)))

    def onRegisterModel(self) -> None:
        if not self.lastRun:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to register the model."), waitCursor=True):
            try:
                infos = self.logic.registerTrainedModel(self.lastRun[0], self.lastRun[1],
                                                        self._parameterNode.registerName)
            except IPMNError as exc:
                self._showStatus(str(exc), error=True)
                return
            names = ", ".join(info.label() for info in infos)
            self._showStatus(_("Registered: {names}. Select it in IPMN Classifier (Refresh the model list).").format(
                names=names))

    # ------------------------------------------------------------------------------------- panel text
    def _showStatus(self, text: str, error: bool = False) -> None:
        panel.showStatus(self.ui, "IPMNTrainer", text, error)

    def _appendLog(self, text: str) -> None:
        panel.appendLog(self.ui, text)


#
# IPMNTrainerLogic
#


class IPMNTrainerLogic(ScriptedLoadableModuleLogic, TrainerLogic):
    """The module logic: :class:`TrainerLogic` with Slicer's parameter node and PythonSlicer as the engine's Python."""

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        engineDir = Path(IPMNClassifierLib.__file__).resolve().parent.parent
        try:
            baseEnv = slicer.util.startupEnvironment()
        except Exception:  # not in the application
            baseEnv = None
        launcher = eng.EngineLauncher(python=eng.python_slicer_executable(), module_dir=engineDir, base_env=baseEnv)
        TrainerLogic.__init__(self, launcher=launcher, classifierDir=engineDir)

    def getParameterNode(self):
        return IPMNTrainerParameterNode(super().getParameterNode())


#
# IPMNTrainerTest
#


class IPMNTrainerTest(ScriptedLoadableModuleTest):
    """Light checks inside Slicer (training itself is tested on the command line and with slicer-core in
    ``Testing/test_slicer_logic.py``)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_IPMNTrainer_commands_and_results_table()

    def test_IPMNTrainer_commands_and_results_table(self):
        import json
        import tempfile

        logic = IPMNTrainerLogic()
        with tempfile.TemporaryDirectory() as tmp:
            options = TrainingOptions(cohort=Path(tmp) / "cohort.csv", output=Path(tmp) / "run", outer=3, inner=2,
                                      models=["vit_tiny"])
            args = logic.buildArgs(options, Path(tmp) / "config.yaml")
            self.assertEqual(args[0], "cv")
            self.assertEqual(args[-2:], ["--progress", "jsonl"])
            metrics = {"summary": {"accuracy": {"mean": 0.7, "std": 0.1, "ddof": 1}},
                       "folds": [{"fold": i, "metrics": {"accuracy": 0.6 + 0.1 * i}} for i in range(3)]}
            (Path(tmp) / "metrics.json").write_text(json.dumps(metrics))
            table = logic.resultsTable(tmp)
            self.assertEqual(table.GetNumberOfRows(), 1)
            self.assertAlmostEqual(table.GetTable().GetColumn(1).GetValue(0), 0.7)
            curves = LearningCurves()
            curves.add({"event": "epoch", "fold": 0, "epoch": 1, "epochs": 2, "train_loss": 1.0, "val_loss": 1.1})
            self.assertEqual(curves.chartNode().GetNumberOfPlotSeriesNodes(), 2)
        self.delayDisplay("Test passed")
