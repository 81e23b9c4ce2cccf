"""MRML side of the IPMN classifier: scene nodes to engine inputs, engine outputs back into the scene.

:class:`ClassifierLogic` checks inputs, writes them for the engine and runs it (here); it creates ROIs
(:mod:`IPMNClassifierLib.roitools`) and loads results into the scene (:mod:`IPMNClassifierLib.results`).

Uses only what works both inside Slicer and with ``slicer-core`` (MRML without the application): storage
nodes for reading and writing files, the subject hierarchy node, markups ROI and segmentation nodes. The
engine itself (torch, timm ...) runs in a child process; see :mod:`IPMNClassifierLib.engine`.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import slicer

from ipmn import registry
from ipmn.errors import IPMNError
from ipmn.vocab import (
    CONFIG_FILE,
)
from IPMNClassifierLib import dicomout
from IPMNClassifierLib import engine as eng
from IPMNClassifierLib.results import PredictResult, ResultLoader, asciiTempPath
from IPMNClassifierLib.roitools import RoiTools, _boxesOverlap, _transformID, roiSliceCount

DEFAULT_K = 9


# ------------------------------------------------------------------------------------------- data
@dataclass
class PredictOptions:
    device: str = "auto"  # auto | cpu | cuda
    windows: str = "central"  # central | all
    tta: bool = False
    precision: str = "auto"  # auto (bf16 where the hardware computes it natively) | fp32
    # Fold ensemble: ALL model folders to average (the main one included); the engine then uses these
    # instead of --model. Empty: the single model.
    ensemble: list = field(default_factory=list)
    # DICOM out: a folder for the SEG + SR (T1 must come from the DICOM database); "" = none
    dicomOutDir: str = ""


@dataclass
class PredictTask:
    """One case prepared for the engine: input files written, output folder chosen."""

    key: str
    workDir: Path
    t1Path: Path
    t2Path: Path
    roiPath: Path
    outDir: Path
    model: Path
    options: PredictOptions
    t1NodeID: str
    t2NodeID: str
    roiNodeID: str
    modelName: str = ""
    t1Series: str = ""  # with DICOM out: T1 is the staged DICOM series (t1Path a folder) with this UID
    dicomOut: Path | None = None
    started: float = field(default_factory=time.monotonic)

    def predictArgs(self) -> list:
        """Arguments of ``ipmn predict`` (after ``-m ipmn``)."""
        args = ["predict", "--t1", str(self.t1Path), "--t2", str(self.t2Path), "--roi", str(self.roiPath),
                "--model", str(self.model), "--out", str(self.outDir), "--device", self.options.device,
                "--windows", self.options.windows, "--precision", self.options.precision]
        if self.options.tta:
            args.append("--tta")
        if self.options.ensemble:
            args += ["--ensemble", *[str(p) for p in self.options.ensemble]]
        if self.t1Series:
            args += ["--t1-series", self.t1Series]
        if self.dicomOut is not None:
            args += ["--dicom-out", str(self.dicomOut)]
        return args + ["--progress", "jsonl"]

    def workerRequest(self) -> dict:
        """The same request for ``ipmn worker`` (``cmd`` is added by the worker client)."""
        request = {"t1": str(self.t1Path), "t2": str(self.t2Path), "roi": str(self.roiPath), "model": str(self.model),
                   "out": str(self.outDir), "device": self.options.device, "windows": self.options.windows,
                   "tta": bool(self.options.tta), "ensemble": [str(p) for p in self.options.ensemble],
                   "precision": self.options.precision}
        if self.t1Series:
            request["t1_series"] = self.t1Series
        if self.dicomOut is not None:  # only for a T1 from DICOM (see prepare)
            request["dicom_out"] = str(self.dicomOut)
        return request


# ------------------------------------------------------------------------------------------- sample data
SAMPLE_FILES = (
    ("sample_t1.nii.gz", "IPMN phantom T1", "VolumeFile"),
    ("sample_t2.nii.gz", "IPMN phantom T2", "VolumeFile"),
    ("sample_roi.mrk.json", "IPMN phantom ROI", "MarkupsFile"),
    ("sample_pancreas.nii.gz", "IPMN phantom pancreas", "SegmentationFile"),
)
CHECKSUMS_FILE = "SHA256SUMS"


def sampleDataFolder(moduleDir) -> Path | None:
    """The bundled phantom case: in the installed module, or at the repository root when run from sources."""
    moduleDir = Path(moduleDir)
    for candidate in (moduleDir / "Resources" / "SampleData", moduleDir.parent / "Resources" / "SampleData"):
        if all((candidate / name).is_file() for name, _, _ in SAMPLE_FILES):
            return candidate
    return None


def fileSha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sampleDataSpec(moduleDir) -> dict | None:
    """Arguments for SampleData's ``registerCustomSampleDataSource`` (None when the case is not bundled).

    Checksums come from ``SHA256SUMS`` next to the files when present (so a damaged copy is detected),
    otherwise they are computed from the files.
    """
    folder = sampleDataFolder(moduleDir)
    if folder is None:
        return None
    known = {}
    sums = folder / CHECKSUMS_FILE
    if sums.is_file():
        for line in sums.read_text(encoding="utf-8").splitlines():
            parts = line.split()
            if len(parts) == 2:
                known[parts[1].lstrip("*")] = parts[0].lower()
    spec = {"uris": [], "fileNames": [], "nodeNames": [], "checksums": [], "loadFileTypes": []}
    for name, nodeName, fileType in SAMPLE_FILES:
        path = folder / name
        spec["uris"].append(path.resolve().as_uri())
        spec["fileNames"].append(f"IPMNPhantom-{name.removeprefix('sample_')}")
        spec["nodeNames"].append(nodeName)
        spec["checksums"].append("SHA256:" + (known.get(name) or fileSha256(path)))
        spec["loadFileTypes"].append(fileType)
    return spec


# ------------------------------------------------------------------------------------------- logic
class ClassifierLogic(RoiTools, ResultLoader):
    """Everything the IPMNClassifier module does, without Qt: usable from tests, scripts and the widget."""

    def __init__(self, launcher: eng.EngineLauncher | None = None, moduleDir=None, workRoot=None, resultsRoot=None):
        self.moduleDir = Path(moduleDir) if moduleDir else Path(__file__).resolve().parent.parent
        self.launcher = launcher or eng.EngineLauncher(module_dir=self.moduleDir)
        self.workRoot = Path(workRoot) if workRoot else None
        self.resultsRoot = Path(resultsRoot) if resultsRoot else None
        self.modelsDir = None  # None: registry.user_models_dir()
        self.keepWorkDirs = False  # for debugging: leave the temporary inputs/outputs in place
        self.worker: eng.EngineWorker | None = None
        self.fileForInstance = None  # DICOM SOPInstanceUID -> file; None: slicer.dicomDatabase.fileForInstance

    @property
    def scene(self):
        return slicer.mrmlScene

    # --------------------------------------------------------------------------------- models
    def bundledModelDirs(self) -> list:
        """The demo model: inside the installed module, or at the repository root when run from sources."""
        candidates = [self.moduleDir / "Resources" / "DemoModel", self.moduleDir.parent / "Resources" / "DemoModel"]
        return [p for p in candidates if p.is_dir()][:1]

    def listModels(self, includeInvalid: bool = True) -> list:
        return registry.list_models(self.bundledModelDirs(), self.modelsDir, include_invalid=includeInvalid)

    def addModelFolder(self, folder, copy: bool = True) -> registry.ModelInfo:
        return registry.register_model(folder, copy=copy, models_dir=self.modelsDir)

    @staticmethod
    def modelK(modelDir) -> int:
        """k (slices per window) from a package's config.json (default 9)."""
        try:
            config = registry.read_config_json(Path(modelDir) / CONFIG_FILE)
        except IPMNError:
            return DEFAULT_K
        for section in (config, config.get("model") or {}, config.get("preprocess") or {}, config.get("data") or {}):
            if isinstance(section, dict) and isinstance(section.get("k"), int) and section["k"] > 0:
                return int(section["k"])
        return DEFAULT_K

    # --------------------------------------------------------------------------------- checks
    def checkInputs(self, t1, t2, roi, model=None, k: int | None = None) -> list:
        """Every problem with the inputs, in words for the panel (empty list: ready to run)."""
        problems = []
        for name, node in (("T1", t1), ("T2", t2)):
            if node is None:
                problems.append(f"Select the {name} volume.")
            elif node.GetImageData() is None:
                problems.append(f"The {name} volume '{node.GetName()}' has no image data.")
            elif min(node.GetImageData().GetDimensions()) < 2:
                problems.append(f"The {name} volume '{node.GetName()}' is not a 3-D volume "
                                f"(dimensions {node.GetImageData().GetDimensions()}).")
        if t1 is not None and t2 is not None and t1 is t2:
            problems.append("T1 and T2 are the same volume: select the T2-weighted series as T2.")
        if roi is None:
            problems.append("Select an ROI around the pancreas (Create ROI, or ROI from segmentation).")
        elif roi.GetNumberOfControlPoints() < 1 or min(roi.GetSize()) <= 0:
            problems.append(f"The ROI '{roi.GetName()}' is not placed yet (its size is zero).")
        if problems:
            return problems
        for name, node in (("T2", t2), ("ROI", roi)):
            if _transformID(node) != _transformID(t1):
                problems.append(f"The {name} is under a different transform than T1: harden the transforms "
                                "(Data module, right-click, Harden transform) so that T1, T2 and the ROI share one space.")
        roiBounds = [0.0] * 6
        roi.GetRASBounds(roiBounds)
        for name, node in (("T1", t1), ("T2", t2)):
            bounds = [0.0] * 6
            node.GetRASBounds(bounds)
            if not _boxesOverlap(roiBounds, bounds):
                problems.append(f"The ROI is outside the {name} volume '{node.GetName()}': move it onto the pancreas.")
        if problems:
            return problems
        if k is None:
            k = self.modelK(model) if model else DEFAULT_K
        count, extent, spacing = roiSliceCount(roi, t1)
        if count < k:
            problems.append(f"The ROI is too thin: it covers {count} T1 slice(s) ({extent:.1f} mm at {spacing:.1f} mm "
                            f"per slice) and the model needs {k}. Make it at least {k * spacing:.0f} mm tall (S-I).")
        if model is not None:
            try:
                registry.validate_model_folder(model)
            except IPMNError as exc:
                problems.append(f"Model: {exc}")
        return problems

    # --------------------------------------------------------------------------------- inputs
    def _defaultWorkRoot(self) -> Path:
        override = os.environ.get("IPMN_TMPDIR")
        if override:
            return Path(override)
        base = None
        app = getattr(slicer, "app", None)
        if app is not None:
            base = getattr(app, "temporaryPath", None)
        base = Path(base) if base else Path(tempfile.gettempdir())
        return Path(asciiTempPath(str(base), windows=os.name == "nt"))

    def _defaultResultsRoot(self) -> Path:
        return self.resultsRoot or (self._defaultWorkRoot() / "IPMN-results")

    @staticmethod
    def inputKey(t1, t2, roi) -> str:
        """Outputs of a re-run with the same T1, T2 and ROI nodes replace the previous ones."""
        return f"{t1.GetID()}|{t2.GetID()}|{roi.GetID()}"

    @staticmethod
    def writeVolume(node, path) -> Path:
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        storage.SetUseCompression(0)  # a temporary file: speed over size
        if not storage.WriteData(node):
            raise IPMNError(f"cannot write the volume '{node.GetName()}' to {path}")
        return Path(path)

    @staticmethod
    def writeRoi(roiNode, path) -> Path:
        storage = slicer.vtkMRMLMarkupsROIJsonStorageNode()
        storage.SetFileName(str(path))
        if not storage.WriteData(roiNode):
            raise IPMNError(f"cannot write the ROI '{roiNode.GetName()}' to {path}")
        return Path(path)

    def prepare(self, t1, t2, roi, model, options: PredictOptions | None = None) -> PredictTask:
        """Check inputs, write them to a new temporary folder; returns the task (raises IPMNError).

        With ``options.dicomOutDir``, T1 must come from the DICOM database (:mod:`IPMNClassifierLib.dicomout`
        says why not): its series is staged for the engine, which then also writes the SEG + SR.
        """
        options = options or PredictOptions()
        info = model if isinstance(model, registry.ModelInfo) else None
        modelDir = Path(info.primary if info else model) if (info or model) else None
        if info is not None and not info.valid:
            raise IPMNError(info.problem)
        problems = self.checkInputs(t1, t2, roi, modelDir)
        if modelDir is None:
            problems.append("Select a model.")
        if problems:
            raise IPMNError(" ".join(problems))
        root = Path(self.workRoot or self._defaultWorkRoot()).absolute()  # the engine runs in another folder
        root.mkdir(parents=True, exist_ok=True)
        source = dicomout.dicomSource(t1, self.fileForInstance) if options.dicomOutDir else None
        workDir = Path(tempfile.mkdtemp(prefix="IPMN-", dir=root))
        try:
            # DICOM out: the engine reads T1 from its own series (the SEG lies on those frames)
            t1Path = (dicomout.stageSeries(source, workDir) if source is not None
                      else self.writeVolume(t1, workDir / "t1.nrrd"))
            t2Path = self.writeVolume(t2, workDir / "t2.nrrd")
            roiPath = self.writeRoi(roi, workDir / "roi.mrk.json")
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        outDir = workDir / "out"
        return PredictTask(key=self.inputKey(t1, t2, roi), workDir=workDir, t1Path=t1Path, t2Path=t2Path,
                           roiPath=roiPath, outDir=outDir, model=modelDir, options=options, t1NodeID=t1.GetID(),
                           t2NodeID=t2.GetID(), roiNodeID=roi.GetID(), modelName=info.name if info else modelDir.name,
                           t1Series=source.seriesUID if source is not None else "",
                           dicomOut=dicomout.outputFolder(options.dicomOutDir, t1) if source is not None else None)

    def cleanup(self, task: PredictTask | None) -> None:
        if task is not None and not self.keepWorkDirs:
            shutil.rmtree(task.workDir, ignore_errors=True)

    @staticmethod
    def memoryNeededGB(options: PredictOptions) -> float:
        """A rough upper bound of the RAM one prediction needs (ViT-B on CPU, with rollout)."""
        needed = 2.0
        if options.windows == "all":
            needed += 1.0
        if options.tta:
            needed += 1.0
        return needed + 0.5 * len(options.ensemble)

    # --------------------------------------------------------------------------------- running
    def runBlocking(self, task: PredictTask, onEvent=None, onLog=None, timeout: float | None = None) -> PredictResult:
        """One-shot ``ipmn predict`` to the end, outputs loaded into the scene (batch runs and tests)."""
        eng.run_blocking(self.launcher, task.predictArgs(), device=task.options.device, on_event=onEvent,
                         on_log=onLog, timeout=timeout)
        return self.loadResults(task)

    def process(self, t1, t2, roi, model, options: PredictOptions | None = None, onEvent=None, onLog=None,
                timeout: float | None = None) -> PredictResult:
        """Check, write inputs, run the engine, load the outputs, remove the temporary folder."""
        task = self.prepare(t1, t2, roi, model, options)
        try:
            return self.runBlocking(task, onEvent=onEvent, onLog=onLog, timeout=timeout)
        finally:
            self.cleanup(task)

    def workerFor(self, task: PredictTask) -> eng.EngineWorker:
        """The long-lived worker for this model/device, (re)started when they change or it died."""
        key = (str(task.model), task.options.device, tuple(str(p) for p in task.options.ensemble))
        if self.worker is not None and (self.worker.key != key or not self.worker.alive):
            self.stopWorker()
        if self.worker is None:
            self.worker = eng.EngineWorker(self.launcher, device=task.options.device, key=key)
        return self.worker

    def stopWorker(self, block: bool = False) -> None:
        """Stop the worker; returns at once unless ``block`` (application exit: make sure it is gone)."""
        if self.worker is not None:
            self.worker.stop(block=block)
            self.worker = None

    def startAsync(self, task: PredictTask, keepEngineLoaded: bool = True) -> AsyncPrediction:
        """Start the prediction without waiting; poll the returned object from a timer."""
        if keepEngineLoaded:
            worker = self.workerFor(task)
            worker.submit(task.workerRequest())
            return AsyncPrediction(self, task, worker=worker)
        proc = self.launcher.start(self.launcher.command(*task.predictArgs()), device=task.options.device)
        return AsyncPrediction(self, task, run=eng.EngineRun(proc, description="ipmn predict"))



class AsyncPrediction:
    """A prediction running in the engine (worker or one-shot); ``poll()`` it from a timer.

    ``poll()`` returns ``(kind, payload)`` items: ``("progress", (fraction, text))``, ``("log", line)``,
    and finally ``("finished", PredictResult)`` or ``("failed", EngineError | IPMNError)``.
    The temporary folder is removed when it ends, whatever the outcome.
    """

    def __init__(self, logic: ClassifierLogic, task: PredictTask, worker=None, run=None):
        self.logic = logic
        self.task = task
        self.worker = worker
        self.run = run
        self.finished = False
        self.result = None
        self.error = None
        self.job = eng.EngineJob(run) if run is not None else None  # a worker translates its own requests

    def _finish(self, out: list, result=None, error=None) -> None:
        self.finished = True
        self.result, self.error = result, error
        self.logic.cleanup(self.task)
        out.append(("finished", result) if error is None else ("failed", error))

    def _load(self, out: list) -> None:
        try:
            result = self.logic.loadResults(self.task)
        except IPMNError as exc:
            self._finish(out, error=exc)
        else:
            self._finish(out, result=result)

    @staticmethod
    def _progress(event: dict):
        stage = str(event.get("stage") or event.get("event"))
        fraction = event.get("fraction")
        fraction = float(fraction) if isinstance(fraction, (int, float)) else None
        return "progress", (fraction, stage.replace("_", " "))

    def poll(self) -> list:
        if self.finished:
            return []
        out = []
        items = self.worker.poll() if self.worker is not None else [
            item for raw in self.run.poll() for item in self.job.feed(*raw)]
        for kind, payload in items:
            if self.finished:
                break
            if kind == "event" and payload.get("event") in ("stage", "ready"):
                out.append(self._progress(payload) if payload["event"] == "stage" else ("progress", (None, "engine ready")))
            elif kind == "log":
                out.append(("log", payload))
            elif kind == "finished":
                self._load(out)
            elif kind == "failed":
                self._finish(out, error=payload)
        return out

    def cancel(self) -> None:
        if self.finished:
            return
        if self.worker is not None:
            self.worker.cancel()
            if self.logic.worker is self.worker:
                self.logic.worker = None
        elif self.run is not None:
            self.run.cancel()

    def wait(self, timeout: float | None = None, onItem=None):
        """Block until finished (tests and scripts); returns the PredictResult or raises the error."""
        return eng.wait_items(self.poll, self.cancel, on_item=onItem, timeout=timeout)
