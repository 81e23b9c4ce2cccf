"""MRML side of the IPMN classifier: scene nodes to engine inputs, engine outputs back into the scene.

Uses only what works both inside Slicer and with ``slicer-core`` (MRML without the application): storage
nodes for reading and writing files, the subject hierarchy node, markups ROI and segmentation nodes. The
engine itself (torch, timm ...) runs in a child process; see :mod:`IPMNClassifierLib.engine`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import slicer
import vtk

from ipmn import registry
from ipmn.errors import IPMNError
from IPMNClassifierLib import engine as eng

CLASS_NAMES = ("normal", "low", "high")
ATTR_ROLE = "IPMN.Role"
ATTR_KEY = "IPMN.InputKey"
ROLE_TABLE = "result_table"
ROLE_HEATMAP = "attention"
ROLE_LABELS = "attention_labels"
ROLE_LEVELS_COLORS = "attention_levels_colors"
ROLE_SEGMENTS = "attention_segments"
# Terminology of the attention segments: the codes of the engine's DICOM SEG (ipmn.dicom_out), so that
# Slicer's own DICOM export writes the same coded segments.
ATTENTION_TERMINOLOGY = ("Segmentation category and type - IPMN~SCT^309825002^Spatial and Relational Concept"
                         "~99IPMN^ATTN{pct}^Top {pct} % of model attention~^^"
                         "~Anatomic codes - DICOM master list~SCT^15776009^Pancreas~^^")
PREDICTION_SCHEMA = "ipmn.prediction/1"
DEFAULT_K = 9
DEFAULT_ROI_SIZE_MM = (100.0, 70.0, 60.0)  # R-L, A-P, S-I: a pancreas with some margin, >= 9 slices of 6 mm
HEATMAP_COLOR_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeIron",
)
HEATMAP_THRESHOLD = 1e-3  # voxels below this are transparent in the foreground layer
LEVEL_COLORS = {1: (1.0, 0.9, 0.25), 2: (1.0, 0.55, 0.0), 3: (0.85, 0.0, 0.0)}
DEFAULT_LEVEL_NAMES = {1: "top 20%", 2: "top 10%", 3: "top 5%"}
GEOMETRY_TOLERANCE_MM = 1e-3
CLASS_TITLES = {"normal": "Normal", "low": "Low risk", "high": "High risk"}


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
        return args + ["--progress", "jsonl"]

    def workerRequest(self) -> dict:
        """The same request for ``ipmn worker`` (``cmd`` is added by the worker client)."""
        return {"t1": str(self.t1Path), "t2": str(self.t2Path), "roi": str(self.roiPath), "model": str(self.model),
                "out": str(self.outDir), "device": self.options.device, "windows": self.options.windows,
                "tta": bool(self.options.tta), "ensemble": [str(p) for p in self.options.ensemble],
                "precision": self.options.precision}


@dataclass
class PredictResult:
    prediction: dict
    tableNode: object
    heatmapNode: object
    labelNode: object
    gridPng: Path | None
    resultDir: Path | None

    @property
    def predictedClass(self) -> str:
        return str(self.prediction.get("predicted_class", ""))

    @property
    def probabilities(self) -> dict:
        return {str(k): float(v) for k, v in (self.prediction.get("probabilities") or {}).items()}

    def summary(self) -> str:
        probs = ", ".join(f"{k} {v:.2f}" for k, v in self.probabilities.items())
        model = (self.prediction.get("model") or {}).get("name", "")
        return f"{CLASS_TITLES.get(self.predictedClass, self.predictedClass)} ({probs}; model {model})"


# ------------------------------------------------------------------------------------------- helpers
def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(4)] for i in range(4)])


def _copyGeometryExactly(node, reference) -> None:
    """Give ``node`` exactly the reference's origin, spacing and axis directions.

    NIfTI stores the geometry in single precision, and volume nodes ignore direction changes below a
    tolerance: set clearly different directions first, so that the copy below is never skipped.
    """
    directions = _directions(reference)
    placeholder = -np.eye(3) if np.abs(directions - np.eye(3)).max() < 1e-3 else np.eye(3)
    node.SetIJKToRASDirections(*[float(v) for v in placeholder.ravel()])
    node.CopyOrientation(reference)


def _directions(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASDirectionMatrix(m)
    return np.array([[m.GetElement(i, j) for j in range(3)] for i in range(3)])


def _safeName(text: str, limit: int = 40) -> str:
    return (re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "case")[:limit]


def _transformID(node) -> str:
    return (node.GetTransformNodeID() or "") if node is not None else ""


def _transformPoints(points, fromNode, toNode) -> np.ndarray:
    """RAS points from the coordinates under ``fromNode`` into those under ``toNode`` (None = world)."""
    points = np.asarray(points, dtype=float)
    if fromNode is None and toNode is None:
        return points
    transform = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(fromNode, toNode, transform)
    return np.array([transform.TransformPoint(*p) for p in points])


def _boxesOverlap(a, b) -> bool:
    return all(a[2 * i] <= b[2 * i + 1] and b[2 * i] <= a[2 * i + 1] for i in range(3))


def roiSliceCount(roiNode, volumeNode) -> tuple[int, float, float]:
    """How many slices the engine's ROI grid gets: (count, ROI S-I extent mm, slice spacing mm).

    Same rule as the engine: the ROI axis closest to Superior, the volume's voxel axis closest to it,
    ``floor(extent / spacing)``. Both nodes are taken in their own (node) coordinates.
    """
    toNode = roiNode.GetObjectToNodeMatrix()
    axes = np.array([[toNode.GetElement(i, j) for j in range(3)] for i in range(3)])
    size = np.array(roiNode.GetSize(), dtype=float)
    a = int(np.argmax(np.abs(axes[2, :])))
    direction = axes[:, a] / (np.linalg.norm(axes[:, a]) or 1.0)
    ijkToRas = _matrix(volumeNode)[:3, :3]
    spacing = np.linalg.norm(ijkToRas, axis=0)
    unit = ijkToRas / np.where(spacing > 0, spacing, 1.0)
    b = int(np.argmax(np.abs(unit.T @ direction)))
    dz = float(spacing[b]) or 1.0
    return max(0, int(math.floor(size[a] / dz + 1e-6))), float(size[a]), dz


def readPrediction(path) -> dict:
    """prediction.json, checked enough to display it (probabilities present and summing to 1)."""
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as fh:
            prediction = json.load(fh)
    except FileNotFoundError as exc:
        raise IPMNError(f"the engine did not write {path.name}") from exc
    except (OSError, ValueError) as exc:
        raise IPMNError(f"cannot read {path}: {exc}") from exc
    schema = prediction.get("schema")
    if schema and schema != PREDICTION_SCHEMA:
        raise IPMNError(f"{path.name} has schema {schema!r}; this module reads {PREDICTION_SCHEMA!r}")
    probs = prediction.get("probabilities")
    if not isinstance(probs, dict) or not probs:
        raise IPMNError(f"{path.name} has no class probabilities")
    total = sum(float(v) for v in probs.values())
    if not math.isfinite(total) or abs(total - 1.0) > 1e-3:
        raise IPMNError(f"{path.name}: class probabilities sum to {total:.4f}, not 1")
    if not prediction.get("predicted_class"):
        prediction["predicted_class"] = max(probs, key=lambda k: float(probs[k]))
    return prediction


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
class ClassifierLogic:
    """Everything the IPMNClassifier module does, without Qt: usable from tests, scripts and the widget."""

    def __init__(self, launcher: eng.EngineLauncher | None = None, moduleDir=None, workRoot=None, resultsRoot=None):
        self.moduleDir = Path(moduleDir) if moduleDir else Path(__file__).resolve().parent.parent
        self.launcher = launcher or eng.EngineLauncher(module_dir=self.moduleDir)
        self.workRoot = Path(workRoot) if workRoot else None
        self.resultsRoot = Path(resultsRoot) if resultsRoot else None
        self.modelsDir = None  # None: registry.user_models_dir()
        self.keepWorkDirs = False  # for debugging: leave the temporary inputs/outputs in place
        self.worker: eng.EngineWorker | None = None

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
            with open(Path(modelDir) / registry.CONFIG_FILE, encoding="utf-8") as fh:
                config = json.load(fh)
        except (OSError, ValueError):
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
        if os.name == "nt" and not str(base).isascii():
            # Native libraries on Windows may mishandle non-ASCII user names in temporary paths.
            fallback = Path(os.environ.get("ProgramData", r"C:\ProgramData")) / "IPMN" / "tmp"
            try:
                fallback.mkdir(parents=True, exist_ok=True)
                return fallback
            except OSError:
                pass
        return base

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
        """Check inputs, write them to a new temporary folder; returns the task (raises IPMNError)."""
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
        workDir = Path(tempfile.mkdtemp(prefix="IPMN-", dir=root))
        try:
            t1Path = self.writeVolume(t1, workDir / "t1.nrrd")
            t2Path = self.writeVolume(t2, workDir / "t2.nrrd")
            roiPath = self.writeRoi(roi, workDir / "roi.mrk.json")
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise
        outDir = workDir / "out"
        return PredictTask(key=self.inputKey(t1, t2, roi), workDir=workDir, t1Path=t1Path, t2Path=t2Path,
                           roiPath=roiPath, outDir=outDir, model=modelDir, options=options, t1NodeID=t1.GetID(),
                           t2NodeID=t2.GetID(), roiNodeID=roi.GetID(), modelName=info.name if info else modelDir.name)

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

    def stopWorker(self) -> None:
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def startAsync(self, task: PredictTask, keepEngineLoaded: bool = True) -> AsyncPrediction:
        """Start the prediction without waiting; poll the returned object from a timer."""
        if keepEngineLoaded:
            worker = self.workerFor(task)
            worker.submit(task.workerRequest())
            return AsyncPrediction(self, task, worker=worker)
        proc = self.launcher.start(self.launcher.command(*task.predictArgs()), device=task.options.device)
        return AsyncPrediction(self, task, run=eng.EngineRun(proc, description="ipmn predict"))

    # --------------------------------------------------------------------------------- outputs
    def _findOutput(self, role: str, key: str):
        for cls in ("vtkMRMLTableNode", "vtkMRMLScalarVolumeNode", "vtkMRMLSegmentationNode"):
            nodes = self.scene.GetNodesByClass(cls)
            for i in range(nodes.GetNumberOfItems()):
                node = nodes.GetItemAsObject(i)
                if node.GetAttribute(ATTR_ROLE) == role and node.GetAttribute(ATTR_KEY) == key:
                    return node
        return None

    def _outputNode(self, cls: str, role: str, key: str, name: str):
        node = self._findOutput(role, key)
        if node is not None and not node.IsA(cls):
            self.scene.RemoveNode(node)
            node = None
        if node is None:
            node = self.scene.AddNewNodeByClass(cls, self.scene.GenerateUniqueName(name))
            node.SetAttribute(ATTR_ROLE, role)
            node.SetAttribute(ATTR_KEY, key)
        return node

    def _readVolumeInto(self, node, path: Path, reference) -> None:
        """Read ``path`` into ``node`` and give it exactly the reference (T1) geometry."""
        if not Path(path).is_file():
            raise IPMNError(f"the engine did not write {Path(path).name}")
        storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
        storage.SetFileName(str(path))
        if not storage.ReadData(node):
            raise IPMNError(f"cannot read {Path(path).name} written by the engine")
        dims, refDims = node.GetImageData().GetDimensions(), reference.GetImageData().GetDimensions()
        if tuple(dims) != tuple(refDims):
            raise IPMNError(f"{Path(path).name} has dimensions {dims}, the T1 volume {refDims}")
        difference = np.abs(_matrix(node) - _matrix(reference)).max()
        if difference > GEOMETRY_TOLERANCE_MM:
            raise IPMNError(f"{Path(path).name} is not in the T1 volume's geometry (differs by {difference:.3g} mm)")
        _copyGeometryExactly(node, reference)
        node.SetAndObserveTransformNodeID(reference.GetTransformNodeID())

    def heatmapColorNodeID(self) -> str:
        for nodeID in HEATMAP_COLOR_IDS:
            if self.scene.GetNodeByID(nodeID) is not None:
                return nodeID
        return "vtkMRMLColorTableNodeRainbow"

    def attentionLevelsColorNode(self, levelNames: dict | None = None):
        """The colour table of the attention label map: 1/2/3 = top 20/10/5 % (names from the prediction)."""
        names = dict(DEFAULT_LEVEL_NAMES)
        for key, value in (levelNames or {}).items():
            try:
                names[int(key)] = str(value)
            except ValueError:
                continue
        node = None
        nodes = self.scene.GetNodesByClass("vtkMRMLColorTableNode")
        for i in range(nodes.GetNumberOfItems()):
            candidate = nodes.GetItemAsObject(i)
            if candidate.GetAttribute(ATTR_ROLE) == ROLE_LEVELS_COLORS:
                node = candidate
                break
        if node is None:
            node = self.scene.AddNewNodeByClass("vtkMRMLColorTableNode", "IPMN attention levels")
            node.SetAttribute(ATTR_ROLE, ROLE_LEVELS_COLORS)
            node.SetTypeToUser()
            node.SetHideFromEditors(False)
        levels = max(names)
        node.SetNumberOfColors(levels + 1)
        node.GetLookupTable().SetTableRange(0, levels)
        node.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for level in range(1, levels + 1):
            r, g, b = LEVEL_COLORS.get(level, (1.0, 0.0, 1.0))
            node.SetColor(level, f"{names.get(level, f'level {level}')} attention", r, g, b, 1.0)
        return node

    def attentionSegments(self, segmentationNode, labelNode, levelNames: dict | None = None):
        """The attention levels as nested, coded segments (segment n = label >= n), for Slicer's DICOM export."""
        names = dict(DEFAULT_LEVEL_NAMES)
        names.update({int(k): str(v) for k, v in (levelNames or {}).items() if str(k).isdigit()})
        segmentation = segmentationNode.GetSegmentation()
        segmentation.RemoveAllSegments()
        segmentationNode.SetAndObserveTransformNodeID(labelNode.GetTransformNodeID())
        labels = slicer.util.arrayFromVolume(labelNode)
        level = self.scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "IPMN attention level (temporary)")
        try:
            level.CopyOrientation(labelNode)
            level.SetAndObserveTransformNodeID(labelNode.GetTransformNodeID())
            for value in sorted(names):
                slicer.util.updateVolumeFromArray(level, (labels >= value).astype(np.uint8))
                before = set(segmentation.GetSegmentIDs())
                slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(level, segmentationNode)
                segment = segmentation.GetSegment(next(iter(set(segmentation.GetSegmentIDs()) - before)))
                segment.SetName(f"{names[value]} attention")
                segment.SetColor(*LEVEL_COLORS.get(value, (1.0, 0.0, 1.0)))
                pct = "".join(c for c in names[value] if c.isdigit() or c == ".") or str(value)
                segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), ATTENTION_TERMINOLOGY.format(pct=pct))
        finally:
            self.scene.RemoveNode(level)
        segmentationNode.CreateDefaultDisplayNodes()
        return segmentationNode

    def _fillTable(self, table, prediction: dict, t1Name: str) -> None:
        classes = list(prediction.get("classes") or prediction["probabilities"].keys())
        probs = prediction["probabilities"]
        uncertainty = prediction.get("uncertainty") or {}
        model = prediction.get("model") or {}
        windows = prediction.get("windows") or {}
        explanation = prediction.get("explanation") or {}
        rows = [("Case (T1)", t1Name)]
        rows += [(f"P({c})", f"{float(probs.get(c, 0.0)):.4f}") for c in classes]
        rows.append(("Predicted class", str(prediction.get("predicted_class", ""))))
        if uncertainty.get("entropy") is not None:
            rows.append(("Uncertainty (entropy)", f"{float(uncertainty['entropy']):.4f}"))
        spread = uncertainty.get("ensemble_std")
        if isinstance(spread, dict):
            rows += [(f"Ensemble std P({c})", f"{float(v):.4f}") for c, v in spread.items()]
        rows += [("Model", str(model.get("name", ""))), ("Model id", str(model.get("id", ""))),
                 ("Architecture", str(model.get("arch", ""))), ("Model card", str(model.get("card", ""))),
                 ("Trained on", str(model.get("trained_on", "")))]
        if windows:
            rows.append(("Windows", f"{windows.get('mode', '')} (k={windows.get('k', '')}, "
                                    f"{len(windows.get('starts') or [])} window(s))"))
        if explanation:
            text = str(explanation.get("method", ""))
            if explanation.get("deletion_auc") is not None and explanation.get("random_deletion_auc") is not None:
                text += (f"; deletion AUC {float(explanation['deletion_auc']):.3f} vs random "
                         f"{float(explanation['random_deletion_auc']):.3f} (lower = more faithful)")
            rows.append(("Explanation", text))
        if prediction.get("device"):
            rows.append(("Computed on", f"{prediction['device']}, "
                                        f"{prediction.get('precision') or 'precision not recorded'}"))
        items, values = vtk.vtkStringArray(), vtk.vtkStringArray()
        items.SetName("Item")
        values.SetName("Value")
        for item, value in rows:
            items.InsertNextValue(item)
            values.InsertNextValue(value)
        wasModifying = table.StartModify()
        table.RemoveAllColumns()
        table.AddColumn(items)
        table.AddColumn(values)
        table.SetUseColumnTitleAsColumnHeader(True)
        for c in classes:
            table.SetAttribute(f"IPMN.Probability.{c}", repr(float(probs.get(c, 0.0))))
        table.SetAttribute("IPMN.PredictedClass", str(prediction.get("predicted_class", "")))
        table.EndModify(wasModifying)

    @staticmethod
    def tableProbabilities(table) -> dict:
        """Class probabilities as stored in a result table (rows ``P(<class>)``)."""
        vtable = table.GetTable()
        items, values = vtable.GetColumnByName("Item"), vtable.GetColumnByName("Value")
        out = {}
        for row in range(vtable.GetNumberOfRows()):
            match = re.fullmatch(r"P\((.+)\)", items.GetValue(row))
            if match:
                out[match.group(1)] = float(values.GetValue(row))
        return out

    def placeInSubjectHierarchy(self, nodes, reference, key: str):
        """Put the output nodes in a folder under the reference (T1) volume's study; returns the folder item."""
        sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(self.scene)
        if sh is None:
            return 0
        refItem = sh.GetItemByDataNode(reference)
        parent = sh.GetSceneItemID()
        if refItem:
            study = sh.GetItemAncestorAtLevel(refItem, slicer.vtkMRMLSubjectHierarchyConstants.GetDICOMLevelStudy())
            parent = study or sh.GetItemParent(refItem) or parent
        folder = 0
        children = vtk.vtkIdList()
        sh.GetItemChildren(parent, children, False)
        for i in range(children.GetNumberOfIds()):
            child = children.GetId(i)
            if sh.GetItemAttribute(child, ATTR_KEY) == key:
                folder = child
                break
        if not folder:
            folder = sh.CreateFolderItem(parent, f"IPMN - {reference.GetName()}")
            sh.SetItemAttribute(folder, ATTR_KEY, key)
        for node in nodes:
            item = sh.GetItemByDataNode(node)
            if not item:
                item = sh.CreateItem(folder, node)
            else:
                sh.SetItemParent(item, folder)
        return folder

    def _keepFiles(self, task: PredictTask, t1Name: str) -> Path:
        """Copy grid.png and prediction.json out of the temporary folder (it is removed after loading)."""
        digest = hashlib.sha1(task.key.encode("utf-8")).hexdigest()[:10]
        dest = self._defaultResultsRoot() / f"{_safeName(t1Name)}-{digest}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("prediction.json", "grid.png"):
            src = task.outDir / name
            if src.is_file():
                shutil.copy2(src, dest / name)
        return dest

    def loadResults(self, task: PredictTask) -> PredictResult:
        """Read the engine's outputs into the scene (re-using the nodes of an earlier run on the same inputs)."""
        t1 = self.scene.GetNodeByID(task.t1NodeID)
        if t1 is None:
            raise IPMNError("the T1 volume was removed from the scene while the engine was running")
        prediction = readPrediction(task.outDir / "prediction.json")
        outputs = prediction.get("outputs") or {}
        name = t1.GetName()

        heatmap = self._outputNode("vtkMRMLScalarVolumeNode", ROLE_HEATMAP, task.key, f"{name} IPMN attention")
        self._readVolumeInto(heatmap, task.outDir / outputs.get("attention", "attention.nii.gz"), t1)
        heatmap.CreateDefaultDisplayNodes()
        display = heatmap.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.heatmapColorNodeID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetApplyThreshold(1)
        display.SetLowerThreshold(HEATMAP_THRESHOLD)
        display.SetUpperThreshold(1.0)

        labels = self._outputNode("vtkMRMLLabelMapVolumeNode", ROLE_LABELS, task.key, f"{name} IPMN attention levels")
        self._readVolumeInto(labels, task.outDir / outputs.get("attention_labels", "attention_labels.nii.gz"), t1)
        labels.CreateDefaultDisplayNodes()
        colors = self.attentionLevelsColorNode(prediction.get("attention_levels"))
        labels.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())

        segments = self._outputNode("vtkMRMLSegmentationNode", ROLE_SEGMENTS, task.key, f"{name} IPMN attention")
        self.attentionSegments(segments, labels, prediction.get("attention_levels"))

        table = self._outputNode("vtkMRMLTableNode", ROLE_TABLE, task.key, f"{name} IPMN result")
        self._fillTable(table, prediction, name)

        resultDir = self._keepFiles(task, name)
        grid = resultDir / "grid.png"
        table.SetAttribute("IPMN.ResultFolder", str(resultDir))
        self.placeInSubjectHierarchy([table, heatmap, labels, segments], t1, task.key)
        return PredictResult(prediction=prediction, tableNode=table, heatmapNode=heatmap, labelNode=labels,
                             gridPng=grid if grid.is_file() else None, resultDir=resultDir)

    # --------------------------------------------------------------------------------- ROI
    def createRoi(self, center=None, size=None, referenceVolume=None, name: str = "IPMN ROI", roiNode=None):
        """A box of pancreas size (default 100 x 70 x 60 mm) centred at ``center`` (world RAS).

        Without a centre the box is centred on the reference volume. The ROI goes under the reference's
        parent transform so that it stays in the volume's space.
        """
        size = tuple(float(s) for s in (size or DEFAULT_ROI_SIZE_MM))
        if min(size) <= 0:
            raise IPMNError("the ROI size must be positive")
        transformNode = referenceVolume.GetParentTransformNode() if referenceVolume is not None else None
        if center is None:
            if referenceVolume is None:
                raise IPMNError("select a T1 volume (or give a centre) to create the ROI")
            bounds = [0.0] * 6
            referenceVolume.GetRASBounds(bounds)
            center = [(bounds[2 * i] + bounds[2 * i + 1]) / 2.0 for i in range(3)]
        local = _transformPoints([center], None, transformNode)[0]
        roi = roiNode or self.scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", self.scene.GenerateUniqueName(name))
        roi.SetAndObserveTransformNodeID(transformNode.GetID() if transformNode is not None else None)
        roi.SetCenter(*[float(v) for v in local])
        roi.SetSize(*size)
        roi.CreateDefaultDisplayNodes()
        return roi

    def segmentBoundsRAS(self, segmentationNode, segmentID: str) -> np.ndarray:
        """World RAS axis-aligned bounds (6 numbers) of a segment's voxels (voxel edges included)."""
        if segmentationNode is None or not segmentID:
            raise IPMNError("select a segmentation and a segment (e.g. the pancreas)")
        segment = segmentationNode.GetSegmentation().GetSegment(segmentID)
        if segment is None:
            raise IPMNError(f"segment {segmentID} not found in '{segmentationNode.GetName()}'")
        image = slicer.vtkOrientedImageData()
        ok = slicer.vtkSlicerSegmentationsModuleLogic.GetSegmentBinaryLabelmapRepresentation(
            segmentationNode, segmentID, image)
        if not ok or image.GetPointData() is None or image.GetPointData().GetScalars() is None:
            raise IPMNError(f"cannot get a labelmap of segment '{segment.GetName()}'")
        from vtk.util.numpy_support import vtk_to_numpy

        dims = image.GetDimensions()
        voxels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[2], dims[1], dims[0])
        # Segments share labelmap layers: keep only this segment's label value.
        nonzero = np.argwhere(voxels == segment.GetLabelValue())
        if nonzero.size == 0:
            raise IPMNError(f"segment '{segment.GetName()}' is empty")
        extent = image.GetExtent()
        lo = nonzero.min(axis=0)[::-1] + np.array(extent[0::2]) - 0.5
        hi = nonzero.max(axis=0)[::-1] + np.array(extent[0::2]) + 0.5
        matrix = vtk.vtkMatrix4x4()
        image.GetImageToWorldMatrix(matrix)
        m = np.array([[matrix.GetElement(i, j) for j in range(4)] for i in range(4)])
        corners = np.array([[x, y, z, 1.0] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        points = (m @ corners.T).T[:, :3]
        points = _transformPoints(points, segmentationNode.GetParentTransformNode(), None)
        return np.array([points[:, 0].min(), points[:, 0].max(), points[:, 1].min(), points[:, 1].max(),
                         points[:, 2].min(), points[:, 2].max()])

    def roiFromSegment(self, segmentationNode, segmentID: str, marginMm: float = 10.0, roiNode=None,
                       referenceVolume=None, name: str = "IPMN ROI"):
        """An ROI = the segment's bounding box plus ``marginMm`` on every side (axis-aligned in RAS)."""
        bounds = self.segmentBoundsRAS(segmentationNode, segmentID)
        center = [(bounds[2 * i] + bounds[2 * i + 1]) / 2.0 for i in range(3)]
        size = [bounds[2 * i + 1] - bounds[2 * i] + 2.0 * float(marginMm) for i in range(3)]
        transformNode = referenceVolume.GetParentTransformNode() if referenceVolume is not None else None
        if transformNode is not None:
            # Box corners into the reference's space, then their bounds there.
            corners = np.array([[x, y, z] for x in bounds[0:2] for y in bounds[2:4] for z in bounds[4:6]])
            local = _transformPoints(corners, None, transformNode)
            lo, hi = local.min(axis=0), local.max(axis=0)
            center = _transformPoints([(lo + hi) / 2.0], transformNode, None)[0]
            size = list(hi - lo + 2.0 * float(marginMm))
        return self.createRoi(center=center, size=size, referenceVolume=referenceVolume, name=name, roiNode=roiNode)


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
        self._done_event = None

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
        source = self.worker if self.worker is not None else self.run
        for kind, payload in source.poll():
            if self.finished:
                break
            if kind == "event":
                name = payload.get("event")
                if name == "stage":
                    out.append(self._progress(payload))
                elif name == "ready":
                    out.append(("progress", (None, "engine ready")))
                elif name == "done":
                    self._done_event = payload
                elif name == "error":
                    self._finish(out, error=eng.EngineError(str(payload.get("message") or "engine error"),
                                                            log_tail=self.run.log_tail if self.run else ()))
            elif kind == "log":
                out.append(("log", payload))
            elif kind == "done":  # worker: request finished
                self._load(out)
            elif kind == "failed":  # worker: request failed or worker died
                self._finish(out, error=payload)
            elif kind == "exit" and self.run is not None:  # one-shot process ended
                if payload == 0 and not self.run.cancelled:
                    self._load(out)
                else:
                    self._finish(out, error=self.run.error())
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
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished:
            for item in self.poll():
                if onItem:
                    onItem(item)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                deadline = None
            time.sleep(0.05)
        if self.error is not None:
            raise self.error
        return self.result
