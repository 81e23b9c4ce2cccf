"""The engine's outputs in the scene: prediction.json read and checked, the attention map and its
levels as volumes in T1's exact geometry, the result table, the subject hierarchy folder, and the
copies of prediction.json / grid.png kept after the temporary folder is removed.

:class:`ResultLoader` is a part of :class:`IPMNClassifierLib.logic.ClassifierLogic` (a mixin).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import slicer
import vtk

from ipmn.errors import IPMNError
from ipmn.vocab import (
    ATTENTION_FILE,
    ATTENTION_LABELS_FILE,
    CLASS_TITLES,
    GRID_PNG_FILE,
    PREDICTION_FILE,
    PREDICTION_SCHEMA,
)
from IPMNClassifierLib.roitools import _copyGeometryExactly, _matrix

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
HEATMAP_COLOR_IDS = (
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat",
    "vtkMRMLColorTableNodeIron",
)
HEATMAP_THRESHOLD = 1e-3  # voxels below this are transparent in the foreground layer
LEVEL_COLORS = {1: (1.0, 0.9, 0.25), 2: (1.0, 0.55, 0.0), 3: (0.85, 0.0, 0.0)}
DEFAULT_LEVEL_NAMES = {1: "top 20%", 2: "top 10%", 3: "top 5%"}
GEOMETRY_TOLERANCE_MM = 1e-3


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


def _safeName(text: str, limit: int = 40) -> str:
    return (re.sub(r"[^A-Za-z0-9_-]+", "_", str(text)).strip("_") or "case")[:limit]


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


def _windowsShortPath(path: str) -> str | None:
    """The 8.3 short form of an existing Windows path (ASCII where short names are enabled), or None."""
    try:
        import ctypes

        buffer = ctypes.create_unicode_buffer(1024)
        length = ctypes.windll.kernel32.GetShortPathNameW(str(path), buffer, len(buffer))
    except (AttributeError, OSError):
        return None
    return buffer.value if 0 < length < len(buffer) else None


def asciiTempPath(base: str, windows: bool, shortPath=_windowsShortPath) -> str:
    """The temporary folder for patient images: the user's own, never a machine-wide folder.

    On Windows a non-ASCII user name in the temporary path can trip native libraries; the same folder's
    8.3 short name is used when it is ASCII. Otherwise the folder is kept as it is (set IPMN_TMPDIR to
    choose another): patient images must not go to a folder that other users of the machine can read.
    """
    if not windows or base.isascii():
        return base
    short = shortPath(base)
    return short if short and short.isascii() else base


RESULTS_KEEP = 20  # result folders (prediction.json + grid.png copies) kept under the results root


RESULTS_MAX_AGE_S = 7 * 24 * 3600


def pruneResultFolders(root, keep=None, maxCount: int = RESULTS_KEEP, maxAgeS: float = RESULTS_MAX_AGE_S) -> list:
    """Remove old result copies: all but the ``maxCount`` newest, and any older than ``maxAgeS``.

    Only folders holding nothing but ``prediction.json`` / ``grid.png`` are touched (never ``keep``).
    Returns the removed folders.
    """
    root = Path(root)
    if not root.is_dir():
        return []
    folders = []
    for child in root.iterdir():
        names = {p.name for p in child.iterdir()} if child.is_dir() else None
        if names is not None and names <= {PREDICTION_FILE, GRID_PNG_FILE} and child != keep:
            folders.append((child.stat().st_mtime, child))
    folders.sort(reverse=True)
    now = time.time()
    removed = [f for i, (mtime, f) in enumerate(folders) if i >= maxCount - 1 or now - mtime > maxAgeS]
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


class ResultLoader:
    """Loading the engine's outputs for :class:`~IPMNClassifierLib.logic.ClassifierLogic`."""

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

    def _keepFiles(self, task, t1Name: str) -> Path:
        """Copy grid.png and prediction.json out of the temporary folder (it is removed after loading)."""
        digest = hashlib.sha1(task.key.encode("utf-8")).hexdigest()[:10]
        dest = self._defaultResultsRoot() / f"{_safeName(t1Name)}-{digest}"
        dest.mkdir(parents=True, exist_ok=True)
        for name in (PREDICTION_FILE, GRID_PNG_FILE):
            src = task.outDir / name
            if src.is_file():
                shutil.copy2(src, dest / name)
        pruneResultFolders(dest.parent, keep=dest)
        return dest

    def loadResults(self, task) -> PredictResult:
        """Read the engine's outputs into the scene (re-using the nodes of an earlier run on the same inputs)."""
        t1 = self.scene.GetNodeByID(task.t1NodeID)
        if t1 is None:
            raise IPMNError("the T1 volume was removed from the scene while the engine was running")
        prediction = readPrediction(task.outDir / PREDICTION_FILE)
        outputs = prediction.get("outputs") or {}
        name = t1.GetName()

        heatmap = self._outputNode("vtkMRMLScalarVolumeNode", ROLE_HEATMAP, task.key, f"{name} IPMN attention")
        self._readVolumeInto(heatmap, task.outDir / outputs.get("attention", ATTENTION_FILE), t1)
        heatmap.CreateDefaultDisplayNodes()
        display = heatmap.GetDisplayNode()
        display.SetAndObserveColorNodeID(self.heatmapColorNodeID())
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
        display.SetApplyThreshold(1)
        display.SetLowerThreshold(HEATMAP_THRESHOLD)
        display.SetUpperThreshold(1.0)

        labels = self._outputNode("vtkMRMLLabelMapVolumeNode", ROLE_LABELS, task.key, f"{name} IPMN attention levels")
        self._readVolumeInto(labels, task.outDir / outputs.get("attention_labels", ATTENTION_LABELS_FILE), t1)
        labels.CreateDefaultDisplayNodes()
        colors = self.attentionLevelsColorNode(prediction.get("attention_levels"))
        labels.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())

        segments = self._outputNode("vtkMRMLSegmentationNode", ROLE_SEGMENTS, task.key, f"{name} IPMN attention")
        self.attentionSegments(segments, labels, prediction.get("attention_levels"))

        table = self._outputNode("vtkMRMLTableNode", ROLE_TABLE, task.key, f"{name} IPMN result")
        self._fillTable(table, prediction, name)

        resultDir = self._keepFiles(task, name)
        grid = resultDir / GRID_PNG_FILE
        table.SetAttribute("IPMN.ResultFolder", str(resultDir))
        self.placeInSubjectHierarchy([table, heatmap, labels, segments], t1, task.key)
        return PredictResult(prediction=prediction, tableNode=table, heatmapNode=heatmap, labelNode=labels,
                             gridPng=grid if grid.is_file() else None, resultDir=resultDir)

